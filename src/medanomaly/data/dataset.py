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

__all__ = ["ImageDataset", "ArrayDataset", "SliceDataset", "ItemDataset", "stack_dataset", "collate_samples"]

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

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.base.labels)[self.indices]


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


# --------------------------------------------------------------------------------------------- lazy file datasets
#: bytes of preprocessed arrays a lazy dataset keeps beyond its ``cache_size`` entries (the cache always holds its
#: ``cache_size`` most recent entries; smaller ones beyond that are kept while they fit in this budget)
CACHE_BYTES = 512 * 2**20


def _nbytes(value: Any, depth: int = 0) -> int:
    """The bytes of the numpy arrays and tensors in ``value`` (tuples/lists/dicts and dataclass fields, 3 levels)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.Tensor):
        return int(value.element_size() * value.nelement())
    if depth >= 3:
        return 0
    if isinstance(value, dict):
        return sum(_nbytes(v, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v, depth + 1) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f), depth + 1) for f in value.__dataclass_fields__)
    return 0


class _LRU:
    """A least-recently-used cache: the ``size`` most recent entries, and older ones while all entries together
    take at most ``max_bytes`` (so a data set of small preprocessed volumes stays cached whole and is preprocessed
    once, while large volumes are limited to ``size``); ``size`` 0 disables caching."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        from collections import OrderedDict

        self.size, self.data = int(size), OrderedDict()
        self.max_bytes = CACHE_BYTES if max_bytes is None else int(max_bytes)
        self.sizes: dict[Any, int] = {}
        self.made = 0  # entries computed (a test hook: how often the cache missed)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def get(self, key: Any, make: Any) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = make()
        self.made += 1
        if self.size > 0:
            self.data[key], self.sizes[key] = value, _nbytes(value)
            while len(self.data) > self.size and self.nbytes > self.max_bytes:
                old, _ = self.data.popitem(last=False)
                del self.sizes[old]
        return value


def _sample(image: np.ndarray, fg: np.ndarray, mask: np.ndarray | None, label: int, case_id: str, slice_index: int,
            has_mask: bool | None = None) -> dict[str, Any]:
    # copies: a caller editing a sample in place must not change the cached volume
    img = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
    shape = (1, *img.shape[1:])
    m = torch.zeros(shape, dtype=torch.bool) if mask is None else torch.from_numpy(np.array(mask, dtype=bool, copy=True))
    return {
        "image": img,
        "foreground": torch.from_numpy(np.array(fg, dtype=bool, copy=True)),
        "mask": m,
        "has_mask": bool(mask is not None) if has_mask is None else has_mask,
        "label": int(label),
        "case_id": str(case_id),
        "slice_index": int(slice_index),
    }


class SliceDataset(ImageDataset):
    """2D slices of volumes, read and preprocessed one volume at a time (lazily, with a small LRU cache).

    ``cases``: list of ``(case_id, load)`` where ``load()`` returns ``(slices (S, H, W), masks (S, H, W) or None,
    slice_numbers (S,), case_label)``; ``preset`` is a ``brain-mri-2d`` preset, applied per volume (the percentile
    clip uses the whole volume). Building the index reads every volume once (to apply the unsupervised slice filter
    and find the slice labels); the preprocessed arrays are then dropped except for the cache.
    ``normal_only`` keeps only slices whose original mask is empty (requires masks or a normal case label).
    """

    spatial_dims = 2

    def __init__(self, cases: Sequence[tuple[str, Any]], preset: Any, *, normal_only: bool = False, name: str = "",
                 cache_size: int = 8, quiet: bool = True, filter_slices: bool = True) -> None:
        from tqdm.auto import tqdm

        self.name, self.preset_obj = name, preset
        self.preset = preset.name
        self.cases = list(cases)
        self._cache = _LRU(cache_size)
        self.index: list[tuple[int, int, int, int]] = []  # (case position, slice position, label, slice number)
        self.n_dropped = 0
        self._has_mask: list[bool] = []
        #: per case: what preprocessing did (presets.prep_summary; lesion voxels on the output grid, for guards only)
        self.prep_records: dict[str, dict[str, Any]] = {}
        for ci in tqdm(range(len(self.cases)), desc=f"indexing {name or 'slices'}", disable=quiet):
            st, numbers, case_label, has_mask = self._volume(ci)
            self._has_mask.append(has_mask)
            self.prep_records[self.cases[ci][0]] = _slice_record(st, filter_slices)
            for s in range(st.images.shape[0]):
                if filter_slices and not st.keep[s]:
                    self.n_dropped += 1
                    continue
                if has_mask:
                    label = int(st.meta["orig_lesion"][s])
                else:
                    label = int(case_label)
                if normal_only and label != 0:
                    continue
                self.index.append((ci, s, label, int(numbers[s])))
            del st
        if not self.index:
            raise ValueError(f"dataset {name!r}: no slices left (normal_only={normal_only}, {len(self.cases)} cases)")

    def _volume(self, ci: int) -> tuple[Any, np.ndarray, int, bool]:
        def make() -> tuple[Any, np.ndarray, int, bool]:
            got = self.cases[ci][1]()  # (slices, masks, numbers, label[, brain mask slices])
            slices, masks, numbers, case_label = got[:4]
            kw = {"brain": got[4]} if len(got) > 4 and got[4] is not None else {}
            st = self.preset_obj.apply_slices(slices, masks, where=f"{self.cases[ci][0]}: ", **kw)
            if masks is not None:
                st.meta["orig_lesion"] = np.asarray(masks).reshape(len(masks), -1).any(axis=1)
            return st, np.asarray(numbers), int(case_label), masks is not None

        return self._cache.get(ci, make)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return np.array([lab for _, _, lab, _ in self.index], dtype=int)

    @property
    def case_ids(self) -> list[str]:
        return [self.cases[ci][0] for ci, _, _, _ in self.index]

    def get(self, i: int) -> dict[str, Any]:
        ci, s, label, number = self.index[i]
        st, _, _, has_mask = self._volume(ci)
        mask = st.masks[s] if st.masks is not None else None
        return _sample(st.images[s], st.foreground[s], mask, label, self.cases[ci][0], number,
                       has_mask=has_mask or label == 0)


def _slice_record(st: Any, filtered: bool) -> dict[str, Any]:
    from medanomaly.data.presets import prep_summary

    rec = prep_summary(st.meta)
    if not filtered:
        rec["n_dropped"] = 0
    if st.masks is not None:
        keep = np.asarray(st.keep, bool) if filtered else np.ones(len(st.masks), bool)
        rec["lesion_voxels"] = int(st.masks.sum())
        rec["lesion_voxels_dropped"] = int(st.masks[~keep].sum())
    return rec


class ItemDataset(ImageDataset):
    """One preprocessed image per item (2D images or 3D volumes), computed lazily with an LRU cache.

    ``items``: list of ``(case_id, load, label)`` where ``load()`` returns a ``Preprocessed`` (image (C, *S),
    foreground, mask or None, affine, meta). ``geometry(i)`` gives the affine/meta (to write maps back).
    """

    def __init__(self, items: Sequence[tuple[str, Any, int]], *, spatial_dims: int, name: str = "", preset: str = "",
                 cache_size: int = 4, known_normal_mask: bool = False) -> None:
        self.items = list(items)
        self.spatial_dims, self.name, self.preset = spatial_dims, name, preset
        self._cache = _LRU(cache_size)
        #: per item: what preprocessing did (presets.prep_summary), filled as items are computed
        self.prep_records: dict[str, dict[str, Any]] = {}
        self.known_normal_mask = known_normal_mask
        if not self.items:
            raise ValueError(f"dataset {name!r} is empty")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(lab) for _, _, lab in self.items], dtype=int)

    @property
    def case_ids(self) -> list[str]:
        return [cid for cid, _, _ in self.items]

    def preprocessed(self, i: int) -> Any:
        return self._cache.get(i, lambda: self._make(i))

    def _make(self, i: int) -> Any:
        from medanomaly.data.presets import prep_summary

        p = self.items[i][1]()
        if isinstance(getattr(p, "meta", None), dict):
            self.prep_records[self.items[i][0]] = prep_summary(p.meta)
        return p

    def geometry(self, i: int) -> dict[str, Any]:
        """The output affine and the preprocessing record of item ``i`` (for writing maps in world coordinates)."""
        p = self.preprocessed(i)
        return {"affine": p.affine, **p.meta}

    def invert(self, i: int, amap: Any, mode: str = "linear") -> np.ndarray:
        """A map on item ``i``'s preprocessed grid -> the map on its input file's own grid (the preset's ``invert``;
        for 3D the input's voxel grid, so the input's affine is right for it). ``mode="nearest"`` for masks."""
        from medanomaly.data.presets import get_preset

        p = self.preprocessed(i)
        cfg = dict(p.meta.get("preset") or {})
        if "name" not in cfg:
            raise ValueError(f"dataset {self.name!r}: item {i} records no preset; cannot invert its map")
        return get_preset(cfg.pop("name"), **cfg).invert(amap, p.meta, mode)

    def get(self, i: int) -> dict[str, Any]:
        cid, _, label = self.items[i]
        p = self.preprocessed(i)
        has_mask = p.mask is not None or (self.known_normal_mask and int(label) == 0)
        return _sample(p.image, p.foreground, p.mask, int(label), cid, -1, has_mask=has_mask)
