"""The images multitask synthesises from: the healthy training pool, and the external images of the inter-dataset
blending task (another data set, or contrast-inverted training images)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from medanomaly.data.fingerprint import Fingerprinter

__all__ = ["HealthyPool", "INTER_DEFAULT", "INTER_MAX_IMAGES", "inter_source_images", "inverted_images"]


class HealthyPool:
    """Healthy training images held in memory as numpy arrays (C, *S) with their foreground (*S)."""

    def __init__(self, images: list[np.ndarray], foregrounds: list[np.ndarray], case_ids: list[str]) -> None:
        if not images:
            raise ValueError("multitask: the training set is empty")
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"multitask: training images must share one shape, got {sorted(shapes)[:4]}")
        self.images, self.foregrounds, self.case_ids = images, foregrounds, case_ids
        self.fingerprint = ""  # of the data set the pool was read from (from_dataset)
        self.channels = int(images[0].shape[0])
        self.spatial_dims = images[0].ndim - 1
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"multitask: images must be (C, H, W) or (C, D, H, W), got {images[0].shape}")

    def foreground_std(self, max_values: int = 2_000_000) -> float:
        """Standard deviation of the foreground intensities (all channels), from an even subsample."""
        step = max(1, len(self.images) * self.images[0][0].size // max_values)
        vals = np.concatenate([im[:, fg].ravel() for im, fg in zip(self.images, self.foregrounds, strict=True)])[::step]
        std = float(vals.std()) if vals.size > 1 else 0.0
        if not std > 0:
            raise ValueError("multitask: the training images have constant foreground intensity; cannot scale label_sigma "
                             "(set tasks.label_sigma_units: absolute)")
        return std

    @classmethod
    def from_dataset(cls, ds: Any, quiet: bool = True) -> HealthyPool:
        from tqdm.auto import tqdm

        n = len(ds)
        if n == 0:
            raise ValueError("multitask: the training set is empty")
        imgs, fgs, cases = [], [], []
        fingerprint = Fingerprinter()  # == dataset_fingerprint(ds), in the same pass
        for i in tqdm(range(n), desc="multitask: loading training images", disable=quiet or n < 64, leave=False):
            s = ds[i]
            fingerprint.add_item(s)
            im = s["image"].numpy() if isinstance(s["image"], torch.Tensor) else np.asarray(s["image"])
            im = np.ascontiguousarray(im, dtype=np.float32)
            if not np.isfinite(im).all():
                raise ValueError(f"multitask: training image {i} ({s.get('case_id', '?')}) contains NaN or Inf")
            fg = s.get("foreground")
            fg = np.ones(im.shape[1:], bool) if fg is None else np.asarray(fg.numpy() if isinstance(fg, torch.Tensor) else fg)[0]
            imgs.append(im)
            fgs.append(fg.astype(bool))
            cases.append(str(s.get("case_id", f"sample_{i}")))
        pool = cls(imgs, fgs, cases)
        pool.fingerprint = fingerprint.hexdigest()
        return pool



#: default external data set for the inter-dataset blending task (a different modality and anatomy, as the paper's
#: abdominal CT for brain MRI and ImageNet for chest X-rays)
INTER_DEFAULT = "pneumoniamnist"
INTER_MAX_IMAGES = {2: 512, 3: 24}


def inter_source_images(setting: Any, pool: HealthyPool, needed: bool, ds: Any | None) -> list[np.ndarray] | None:
    """External images for the inter-dataset blending task.

    ``"auto"``: the normal training images of ``pneumoniamnist`` (chest X-rays; for 3D each is extruded into a
    volume), or, when the pipeline could not load it (``ds`` None), the contrast-inverted training images (with a
    warning); ``"inverted"``: always the latter; any other string: a data set name the pipeline loads (its ``train``
    split) and passes as ``ds``. Images are rescaled by the task to the target's intensity range.
    """
    if not needed:
        return None
    dims = pool.spatial_dims
    if setting in (None, "inverted"):
        if setting is None:
            raise ValueError("multitask: tasks.inter_source is null but the inter-blend task is used")
        return inverted_images(pool)
    name = INTER_DEFAULT if setting == "auto" else str(setting)
    if ds is None:
        if setting != "auto":
            raise ValueError(f"multitask: tasks.inter_source={setting!r} names a data set; pass its healthy images as "
                             "fit(..., inter_source=dataset) (the pipeline does this)")
        warnings.warn(f"multitask: external data set '{name}' not given; inter-blend uses contrast-inverted "
                      "training images instead", stacklevel=3)
        return inverted_images(pool)
    n = min(len(ds), INTER_MAX_IMAGES[dims])
    idx = np.random.default_rng(12345).choice(len(ds), size=n, replace=False)
    out = []
    for i in sorted(idx.tolist()):
        im = ds[int(i)]["image"].numpy().astype(np.float32)
        im = im.mean(axis=0, keepdims=True) if im.shape[0] != pool.channels else im
        if im.ndim - 1 < dims:  # 2D image for a 3D target: extrude along the first spatial axis
            im = np.repeat(im[:, None], im.shape[-1], axis=1)
        elif im.ndim - 1 > dims:
            raise ValueError(f"multitask: tasks.inter_source={name!r} is {im.ndim - 1}D but the training data is {dims}D")
        if im.shape[0] != pool.channels:
            im = np.repeat(im, pool.channels, axis=0)
        out.append(np.ascontiguousarray(im))
    return out


def inverted_images(pool: HealthyPool) -> list[np.ndarray]:
    """Contrast-inverted training images (a stand-in 'other data set' when no external data is available)."""
    step = max(1, len(pool.images) // INTER_MAX_IMAGES[pool.spatial_dims])
    return [(im.max() + im.min() - im).astype(np.float32) for im in pool.images[::step]]
