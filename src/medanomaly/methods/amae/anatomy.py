"""Unsupervised lung mask for tightly cropped chest X-rays (PneumoniaMNIST-like), for AMAE's AnatPaste.

Written here because :func:`medanomaly.synth.tasks.anatomy_mask` (``cxr``) drops dark components that touch the
image border (to skip the air outside the body). In tightly cropped radiographs the lungs themselves reach the
border, so that rule removes them and the mask falls back to a central box (mostly mediastinum) or to a few pixels,
which made most AnatPaste draws near-invisible on 64 px PneumoniaMNIST.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["lung_mask", "lung_masks"]


def lung_mask(image: Any, min_area: float = 0.03, max_area: float = 0.6, top_band: float = 0.15) -> np.ndarray:
    """Lungs of a 2D chest radiograph (H, W) or (1, H, W) as a bool (H, W) mask.

    Dark components (Otsu threshold of the image smoothed at 1/64 of its size) with ``min_area`` to ``max_area`` of
    the image whose centroid lies below the top ``top_band`` (the air beside the neck); the two largest are kept,
    holes filled. Border contact is allowed. Falls back to the central half of the image when nothing qualifies.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"lung_mask: need a 2D image (H, W) or (1, H, W), got shape {np.shape(image)}")
    if not np.isfinite(img).all():
        raise ValueError("lung_mask: image contains NaN or Inf")
    from medanomaly.data.masks import otsu_threshold  # here: importing the method does not load medanomaly.data

    h, w = img.shape
    x = (img - img.min()) / max(float(np.ptp(img)), 1e-8)
    xs = ndimage.gaussian_filter(x, sigma=max(1.0, min(h, w) / 64))
    lab, n = ndimage.label(xs < otsu_threshold(xs, bins=128))
    keep: list[tuple[float, int]] = []
    if n:
        idx = np.arange(1, n + 1)
        sizes = np.asarray(ndimage.sum(np.ones_like(lab), lab, index=idx), dtype=float) / (h * w)
        rows = np.asarray([c[0] for c in ndimage.center_of_mass(np.ones_like(lab), lab, idx)], dtype=float)
        keep = sorted(((s, i) for s, i, r in zip(sizes, idx, rows, strict=True)
                       if min_area <= s <= max_area and r >= top_band * h), reverse=True)[:2]
    if not keep:
        m = np.zeros((h, w), dtype=bool)
        m[h // 4: h - h // 4, w // 4: w - w // 4] = True
        return m
    return ndimage.binary_fill_holes(np.isin(lab, [i for _, i in keep]))


def lung_masks(x: Any) -> np.ndarray:
    """:func:`lung_mask` of every image of a batch (B, 1, H, W) -> bool (B, 1, H, W)."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.ndim != 4:
        raise ValueError(f"lung_masks: need a batch (B, C, H, W), got shape {a.shape}")
    return np.stack([lung_mask(a[i].mean(axis=0))[None] for i in range(a.shape[0])])
