"""Size limits checked before any work: no file, header, resampling or config may ask for more memory than allowed.

The voxel budget is ``MEDANOMALY_MAX_VOXELS`` (environment variable, default ``512**3`` = 134,217,728 voxels, 0.5 GiB
as float32). Readers check the size a header claims before decoding anything (NIfTI dims, DICOM Rows x Columns x
frames x files, the PIL image size), and presets check the shape a resampling implies before allocating it, so a
2 MB ``.nii.gz`` that claims 2000x2000x400 voxels is refused in milliseconds instead of exhausting memory.

2D images have a budget of their own, ``MEDANOMALY_MAX_PIXELS`` (default ``8192**2`` = 67,108,864 pixels): the 2D
presets' foreground and resizing steps need 18-37 bytes per input pixel (tracemalloc), so a 9000x9000 PNG (81 M
pixels, under the 3D budget) took 7.3 GB and 40 s. Shapes with two dimensions use the 2D budget.

This module is the bottom of ``medanomaly.data``: it imports nothing from the package. :class:`DataError` lives here
so that every layer can raise it; :mod:`medanomaly.data.io` re-exports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

__all__ = ["DataError", "VoxelBudgetError", "ENV_MAX_VOXELS", "ENV_MAX_PIXELS", "DEFAULT_MAX_VOXELS", "DEFAULT_MAX_PIXELS",
           "max_voxels", "max_pixels", "check_voxel_budget"]

ENV_MAX_VOXELS = "MEDANOMALY_MAX_VOXELS"
ENV_MAX_PIXELS = "MEDANOMALY_MAX_PIXELS"
DEFAULT_MAX_VOXELS = 512**3
DEFAULT_MAX_PIXELS = 8192**2


class DataError(ValueError):
    """A problem with input data: the message names the file (when there is one) and the problem."""


class VoxelBudgetError(DataError):
    """A file, header or resampling asks for more voxels than ``MEDANOMALY_MAX_VOXELS`` allows."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    try:
        value = int(float(raw)) if any(c in raw for c in ".eE") else int(raw)
    except (ValueError, OverflowError):
        raise ValueError(f"{name}={os.environ[name]!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{name}={value} must be positive")
    return value


def max_voxels() -> int:
    """The voxel budget: ``$MEDANOMALY_MAX_VOXELS`` (read at each call, so it can be changed at run time) or 512**3."""
    return _env_int(ENV_MAX_VOXELS, DEFAULT_MAX_VOXELS)


def max_pixels() -> int:
    """The 2D pixel budget: ``$MEDANOMALY_MAX_PIXELS`` or 8192**2 (never more than the voxel budget)."""
    return min(_env_int(ENV_MAX_PIXELS, DEFAULT_MAX_PIXELS), max_voxels())


def check_voxel_budget(shape: Iterable[int | float], where: str, *, what: str = "image") -> int:
    """Raise :class:`VoxelBudgetError` if an array of ``shape`` exceeds the voxel budget; return its voxel count.

    ``where`` names the file or the step (``"x.nii.gz"``, ``"x.nii.gz: resampling to 0.1 mm"``); the GiB in the
    message are for float32, what the pipeline turns every image into. Negative or non-finite sizes are refused.
    """
    shape = tuple(shape)
    dims = []
    for s in shape:
        f = float(s)
        if not math.isfinite(f) or f < 0:
            raise DataError(f"{where}: {what} has an invalid size {tuple(shape)} (dimension {s})")
        dims.append(int(round(f)))
    n = math.prod(dims)
    two_d = len(dims) == 2
    limit, env, unit = (max_pixels(), ENV_MAX_PIXELS, "pixels") if two_d else (max_voxels(), ENV_MAX_VOXELS, "voxels")
    if n > limit:
        gib = n * 4 / 2**30
        raise VoxelBudgetError(
            f"{where}: {what} of shape {tuple(dims)} is {n:,} {unit} ({gib:,.2f} GiB as float32), over the limit of "
            f"{limit:,} {unit}; if this is intended and the memory is there, raise it with {env}={n}"
            + (f" (and {ENV_MAX_VOXELS})" if two_d and n > max_voxels() else ""))
    return n
