"""3D image files as dataset entries: read an image (+ mask), check they share one grid, slice or preprocess.

Used by the built-in datasets (:mod:`medanomaly.data.samples`) and by manifests (:mod:`medanomaly.data.manifest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.geometry import volume_to_slices
from medanomaly.data.io import DataError, Loaded, read_image, read_mask
from medanomaly.data.presets import Preprocessed, Preset

__all__ = ["check_geometry", "read_volume_slices", "read_volume_item"]


def check_geometry(img: Loaded, mask: Loaded, img_path: Path | str, mask_path: Path | str) -> None:
    """Raise a :class:`DataError` naming both files when the mask's shape or (3D) affine differs from the image's."""
    if img.shape != mask.shape:
        raise DataError(f"{mask_path}: mask shape {mask.shape} does not match image {img_path} shape {img.shape}")
    if img.ndim == 3 and not np.allclose(img.affine, mask.affine, atol=1e-3):
        raise DataError(f"{mask_path}: mask geometry (affine) differs from image {img_path}: "
                        f"{np.round(mask.affine, 3).tolist()} vs {np.round(img.affine, 3).tolist()}")


def _read_pair(img_path: Path, mask_path: Path | None) -> tuple[Loaded, Loaded | None]:
    img = read_image(img_path, expect_dims=3)
    if mask_path is None:
        return img, None
    mk = read_mask(mask_path, expect_dims=3)
    check_geometry(img, mk, img_path, mask_path)
    return img, mk


def read_volume_slices(img_path: Path, mask_path: Path | None,
                       label: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """``(slices (S, rows, cols), mask slices or None, slice numbers, label)`` of a volume file (a ``SliceDataset``
    case loader; axial RAS slices as :func:`~medanomaly.data.geometry.volume_to_slices` cuts them)."""
    img, mk = _read_pair(img_path, mask_path)
    sl = volume_to_slices(img.array, img.affine)
    m = None if mk is None else volume_to_slices(mk.array, mk.affine)
    return sl, m, np.arange(sl.shape[0]), label


def read_volume_item(img_path: Path, mask_path: Path | None, pre: Preset) -> Preprocessed | Any:
    """A volume file (+ mask) through a 3D preset (an ``ItemDataset`` item loader)."""
    img, mk = _read_pair(img_path, mask_path)
    return pre(img, mk)
