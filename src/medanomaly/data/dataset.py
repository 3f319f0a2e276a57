"""Datasets: every image a method sees is a ``Sample`` dict from an :class:`ImageDataset`.

A sample is a dict with:

- ``image``: float32 tensor (C, *spatial), already preprocessed (brain MRI in [0, 1], chest X-ray in [-1, 1])
- ``foreground``: bool tensor (1, *spatial), the brain/body
- ``mask``: bool tensor (1, *spatial), the lesion mask (all False when none is known)
- ``has_mask``: bool, whether ``mask`` is known
- ``label``: int, 1 abnormal, 0 normal, -1 unknown
- ``case_id``: str, the patient/case
- ``slice_index``: int, the slice number for 2D slices of volumes, -1 otherwise

Methods read only ``image`` and ``foreground`` in ``fit``; masks and labels are for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "ArrayDataset", "stack_dataset", "collate_samples"]

SAMPLE_KEYS = ("image", "foreground", "mask", "has_mask", "label", "case_id", "slice_index")


class ImageDataset(Dataset):
    """Base class. Subclasses implement ``__len__`` and ``get(i) -> Sample``."""

    spatial_dims: int = 2
    preset: str = ""
    name: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self, i: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return self.get(i % n)

    @property
    def labels(self) -> np.ndarray:
        """Per-sample labels (for evaluation only; methods must not read them in ``fit``)."""
        return np.array([int(self[i]["label"]) for i in range(len(self))])

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        return _Subset(self, list(indices))


class _Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices
        self.spatial_dims, self.preset, self.name = base.spatial_dims, base.preset, base.name

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int) -> dict[str, Any]:
        return self.base[self.indices[i]]


class ArrayDataset(ImageDataset):
    """A dataset held in memory: images (N, C, *spatial), optional foreground/masks/labels/case ids."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        foreground: np.ndarray | torch.Tensor | None = None,
        masks: np.ndarray | torch.Tensor | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        case_ids: Sequence[str] | None = None,
        slice_indices: Sequence[int] | None = None,
        name: str = "arrays",
        preset: str = "",
    ) -> None:
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if images.ndim not in (4, 5):
            raise ValueError(f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values")
        n, spatial = images.shape[0], tuple(images.shape[2:])
        self.images = images
        self.spatial_dims = images.ndim - 2
        self.name, self.preset = name, preset

        def _check(a: Any, what: str) -> torch.Tensor | None:
            if a is None:
                return None
            t = torch.as_tensor(np.asarray(a))
            if t.ndim == images.ndim - 1:
                t = t.unsqueeze(1)
            if t.shape[0] != n or tuple(t.shape[2:]) != spatial or t.shape[1] != 1:
                raise ValueError(f"{what} shape {tuple(t.shape)} does not match images {tuple(images.shape)}")
            return t.bool()

        self.foreground = _check(foreground, "foreground")
        self.masks = _check(masks, "masks")
        self._labels = np.full(n, -1, dtype=int) if labels is None else np.asarray(labels, dtype=int)
        if self._labels.shape != (n,):
            raise ValueError(f"labels must have {n} entries, got {self._labels.shape}")
        self.case_ids = list(case_ids) if case_ids is not None else [f"case_{i}" for i in range(n)]
        self.slice_indices = list(slice_indices) if slice_indices is not None else [-1] * n

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def get(self, i: int) -> dict[str, Any]:
        img = self.images[i]
        fg = self.foreground[i] if self.foreground is not None else torch.ones((1, *img.shape[1:]), dtype=torch.bool)
        has_mask = self.masks is not None
        mask = self.masks[i] if has_mask else torch.zeros((1, *img.shape[1:]), dtype=torch.bool)
        return {
            "image": img,
            "foreground": fg,
            "mask": mask,
            "has_mask": has_mask,
            "label": int(self._labels[i]),
            "case_id": self.case_ids[i],
            "slice_index": int(self.slice_indices[i]),
        }


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: tensors stacked, the rest as lists/tensors."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    out: dict[str, Any] = {}
    for k in ("image", "foreground", "mask"):
        out[k] = torch.stack([s[k] for s in samples])
    out["has_mask"] = torch.tensor([bool(s["has_mask"]) for s in samples])
    out["label"] = torch.tensor([int(s["label"]) for s in samples])
    out["case_id"] = [s["case_id"] for s in samples]
    out["slice_index"] = torch.tensor([int(s["slice_index"]) for s in samples])
    return out


def stack_dataset(ds: ImageDataset, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Load (part of) a dataset into one batch dict; for small 2D sets and tests."""
    idx = range(len(ds)) if indices is None else indices
    return collate_samples([ds[i] for i in idx])
