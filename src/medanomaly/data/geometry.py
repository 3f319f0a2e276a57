"""Geometry steps of the presets, each beside its inverse, and the record that lets a map go back.

Every forward step returns (or the preset stores) a record ``{"op", "in_shape", "out_shape", ...}`` in
``meta["steps"]``; :func:`invert_steps` walks the records in reverse and calls each step's inverse, so a map on a
preset's output grid goes back onto the input's own grid. Pairs:

===============================  =====================================
forward                          inverse
===============================  =====================================
:func:`fit_2d` (resize + pad)    :func:`unfit_2d` (crop + resize back)
:func:`resize`                   :func:`resize_back`
:func:`reorient`                 :func:`reorient_back`
:func:`resample`                 :func:`resample_back`
:func:`crop_or_pad`              :func:`uncrop_or_pad`
:func:`volume_to_slices`         :func:`slices_to_volume`
===============================  =====================================

``mode``: ``"linear"`` for continuous maps (bi/trilinear), ``"nearest"`` for masks. The inverses sample the map at
each input voxel's centre (no anti-aliasing): a map keeps its values, e.g. the peak of a small hot spot, when it is
shrunk back onto a smaller input. Forward resizing of images anti-aliases when it shrinks (2D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from medanomaly.data.arrays import to_numpy

__all__ = [
    "MODES",
    "resize",
    "resize_back",
    "fit_2d",
    "unfit_2d",
    "reorient",
    "reorient_back",
    "resample",
    "resample_back",
    "crop_or_pad",
    "uncrop_or_pad",
    "volume_to_slices",
    "slices_to_volume",
    "invert_steps",
]

MODES = ("linear", "nearest")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'linear' (continuous maps) or 'nearest' (masks), got {mode!r}")


def _ints(xs: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in xs)


# ------------------------------------------------------------------------------------------------- resize (2D/3D)
def resize(x: np.ndarray, size: Sequence[int], mode: str = "linear", antialias: bool = True) -> np.ndarray:
    """Resize (N, C, *S) arrays to spatial ``size`` with torch (``align_corners=False``): ``linear`` (bi/trilinear;
    anti-aliased when shrinking 2D and ``antialias``) or ``nearest`` (``nearest-exact``). Returns float32."""
    _check_mode(mode)
    size = _ints(size)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if tuple(t.shape[2:]) == size:
        return t.numpy()
    if mode == "nearest":
        out = F.interpolate(t, size=size, mode="nearest-exact")
    else:
        shrink = any(s < o for s, o in zip(size, t.shape[2:], strict=True))
        out = F.interpolate(t, size=size, mode="bilinear" if t.ndim == 4 else "trilinear", align_corners=False,
                            antialias=antialias and shrink and t.ndim == 4)
    return out.numpy()


def resize_back(x: np.ndarray, orig: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Inverse of :func:`resize`: (..., *S) maps back to spatial ``orig``, sampled at the original voxel centres."""
    x = np.asarray(x, np.float32)
    nd = len(orig)
    lead = x.shape[: x.ndim - nd]
    out = resize(x.reshape(-1, 1, *x.shape[x.ndim - nd:]), orig, mode, antialias=False)
    return out.reshape(*lead, *_ints(orig))


def fit_2d(x: np.ndarray, size: int, mode: str = "linear", keep_aspect: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Resize (N, C, H, W) so the longer side is ``size`` (aspect kept) and zero-pad (centred) to ``size x size``.

    ``keep_aspect=False`` stretches to ``size x size``. Returns the array and the step record (``resized`` (h, w),
    ``pad`` (top, left), ``orig`` (H, W)) that :func:`unfit_2d` reads."""
    h, w = (int(v) for v in x.shape[-2:])
    size = int(size)
    if keep_aspect:
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
    else:
        nh, nw = size, size
    r = resize(x, (nh, nw), mode)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((*x.shape[:-2], size, size), np.float32)
    out[..., top : top + nh, left : left + nw] = r
    rec = {"op": "fit_2d", "in_shape": (h, w), "out_shape": (size, size), "size": size, "resized": (nh, nw),
           "pad": (top, left), "orig": (h, w)}
    return out, rec


def unfit_2d(x: np.ndarray, geometry: dict[str, Any], mode: str = "linear") -> np.ndarray:
    """Inverse of :func:`fit_2d`: (..., size, size) maps -> (..., H, W): crop the padding, resize back."""
    nh, nw = _ints(geometry["resized"])
    top, left = _ints(geometry["pad"])
    crop = np.asarray(x, np.float32)[..., top : top + nh, left : left + nw]
    return resize_back(crop, _ints(geometry["orig"]), mode)


# ----------------------------------------------------------------------------------------------------- reorient
def _ornt_transform(source_affine: np.ndarray, target: str) -> np.ndarray:
    from nibabel import orientations as nio

    return nio.ornt_transform(nio.io_orientation(np.asarray(source_affine, float)), nio.axcodes2ornt(tuple(target)))


def reorient(arr: np.ndarray, affine: np.ndarray, target: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose a 3D array to the axis codes ``target`` (nibabel orientation maths); returns array, affine."""
    import nibabel as nib
    from nibabel import orientations as nio

    tr = _ornt_transform(affine, target)
    out = nio.apply_orientation(arr, tr)
    new_aff = np.asarray(affine, float) @ nio.inv_ornt_aff(tr, arr.shape)
    if "".join(nib.aff2axcodes(new_aff)) != target:  # pragma: no cover - nibabel guarantees it
        raise ValueError(f"reorient: could not reach orientation {target!r}")
    return np.ascontiguousarray(out), new_aff


def reorient_back(arr: np.ndarray, source_affine: np.ndarray, target: str = "RAS") -> np.ndarray:
    """Inverse of :func:`reorient`: an array in orientation ``target`` back to the voxel order of ``source_affine``."""
    from nibabel import orientations as nio

    back = nio.ornt_transform(nio.axcodes2ornt(tuple(target)), nio.io_orientation(np.asarray(source_affine, float)))
    return np.ascontiguousarray(nio.apply_orientation(arr, back))


# ----------------------------------------------------------------------------------------------------- resample
def resample(arr: np.ndarray, affine: np.ndarray, factors: np.ndarray, order: int = 1,
             out_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D array so voxel steps grow by ``factors`` (new spacing = old x factor), keeping the field of view
    centred; returns the array and the matching affine. ``order=1`` trilinear; masks: resample as float and
    threshold at 0.5."""
    factors = np.asarray(factors, dtype=np.float64)
    if out_shape is None:
        out_shape = tuple(max(1, int(round(n / f))) for n, f in zip(arr.shape, factors, strict=True))
    offset = (factors - 1.0) / 2.0  # output voxel j sits at input coordinate j * f + (f - 1) / 2
    out = ndi.affine_transform(np.asarray(arr, np.float32), factors, offset=offset, output_shape=out_shape,
                               order=order, mode="nearest")
    m = np.eye(4)
    m[:3, :3] = np.diag(factors)
    m[:3, 3] = offset
    return out, np.asarray(affine, float) @ m


def resample_back(arr: np.ndarray, factors: Sequence[float], shape: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Inverse of :func:`resample`: a 3D array on the resampled grid back onto the original grid of ``shape``
    (input voxel i sits at resampled coordinate ``(i - (f - 1) / 2) / f``); edges extend the nearest value."""
    _check_mode(mode)
    f = np.asarray(factors, dtype=np.float64)
    return ndi.affine_transform(np.asarray(arr, np.float32), 1.0 / f, offset=-(f - 1.0) / (2.0 * f),
                                output_shape=_ints(shape), order=1 if mode == "linear" else 0, mode="nearest")


# --------------------------------------------------------------------------------------------------- crop / pad
def crop_or_pad(arr: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The box ``[start, start + shape)`` of the last ``len(shape)`` axes; outside the array is zero."""
    nd = len(shape)
    out = np.zeros((*arr.shape[: arr.ndim - nd], *_ints(shape)), dtype=arr.dtype)
    src, dst = [], []
    for s0, n, full in zip(_ints(start), _ints(shape), arr.shape[arr.ndim - nd:], strict=True):
        a, b = max(s0, 0), min(s0 + n, full)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s0, b - s0))
    out[(..., *dst)] = arr[(..., *src)]
    return out


def uncrop_or_pad(arr: np.ndarray, start: Sequence[int], orig: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: put the box back at ``start`` in an array of shape ``orig`` (zero elsewhere)."""
    return crop_or_pad(arr, tuple(-s for s in _ints(start)), orig)


# --------------------------------------------------------------------------------------------- axial slice stacks
def _squeeze_3d(arr: np.ndarray) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def volume_to_slices(arr: np.ndarray, affine: np.ndarray, *, return_meta: bool = False) -> Any:
    """Axial slices (S, rows, cols) of a 3D volume: reoriented to RAS, each slice rotated so anterior is up.

    ``return_meta=True`` returns ``(slices, {"slicing": record})``; merge that into the preset's meta (or use
    ``BrainMRI2D.apply_volume``) and :func:`slices_to_volume` puts maps back on the volume's grid."""
    src = to_numpy(arr)
    a3 = _squeeze_3d(src)
    if a3.ndim != 3:
        raise ValueError(f"volume_to_slices needs a 3D volume, got shape {src.shape}")
    a, _ = reorient(a3, affine, "RAS")
    out = np.ascontiguousarray(np.rot90(np.moveaxis(a, 2, 0), k=1, axes=(1, 2)))
    if not return_meta:
        return out
    rec = {"op": "volume_to_slices", "in_shape": tuple(src.shape), "out_shape": tuple(out.shape),
           "source_affine": np.asarray(affine, float).tolist(), "orientation": "RAS"}
    return out, {"slicing": rec}


def slices_to_volume(maps: np.ndarray, meta: dict[str, Any], mode: str = "linear") -> np.ndarray:
    """Inverse of :func:`volume_to_slices` + ``BrainMRI2D.apply_slices``: maps (S, size, size) (or (S, 1, size,
    size), or only the kept slices) -> the map on the input volume's own voxel grid (write it with the input's
    affine). Slices the preset dropped (``meta["keep"]`` False, listed in ``meta["dropped"]``) get 0.

    Without a ``meta["slicing"]`` record (slices given to ``apply_slices`` directly) returns (S, rows, cols)."""
    m = to_numpy(maps)
    dtype = m.dtype
    steps = meta.get("steps") or []
    grid = _ints(steps[-1]["out_shape"]) if steps else tuple(m.shape[-2:])
    if m.ndim == len(grid) + 2 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == len(grid):
        m = m[None]
    keep = np.asarray(meta.get("keep", np.ones(len(m), bool)), bool)
    if m.ndim != len(grid) + 1 or tuple(m.shape[1:]) != grid:
        raise ValueError(f"slices_to_volume: maps shape {to_numpy(maps).shape} does not match the preset's slices "
                         f"({len(keep)}, {', '.join(map(str, grid))})")
    if len(m) != len(keep):
        if len(m) != int(keep.sum()):
            raise ValueError(f"slices_to_volume: {len(m)} maps for {len(keep)} slices ({int(keep.sum())} kept); give one "
                             "map per slice or one per kept slice")
        full = np.zeros((len(keep), *grid), np.float32)
        full[keep] = m
        m = full
    back = invert_steps(m.astype(np.float32), steps, mode)
    back[~keep] = 0.0
    rec = meta.get("slicing")
    if rec is not None:
        ras = np.moveaxis(np.rot90(back, k=-1, axes=(1, 2)), 0, 2)
        back = reorient_back(ras, np.asarray(rec["source_affine"], float), rec.get("orientation", "RAS"))
        back = back.reshape(_ints(rec["in_shape"]))
    return _cast(back, dtype, mode)


# -------------------------------------------------------------------------------------------------- inversion
def _cast(a: np.ndarray, dtype: np.dtype, mode: str) -> np.ndarray:
    if mode == "nearest" and np.dtype(dtype).kind == "b":
        return a > 0.5
    return np.ascontiguousarray(a, dtype=np.float32)


def _invert_step(x: np.ndarray, rec: dict[str, Any], mode: str) -> np.ndarray:
    """One step's inverse on a (N, *out_shape) batch -> (N, *in_shape)."""
    op = rec["op"]
    if op == "fit_2d":
        return unfit_2d(x, rec, mode)
    if op == "reshape":
        return x.reshape(len(x), *_ints(rec["in_shape"]))
    if op == "crop_or_pad":
        return uncrop_or_pad(x, rec["start"], rec["in_shape"])
    if op == "resample":
        return np.stack([resample_back(v, rec["factors"], rec["in_shape"], mode) for v in x])
    if op == "reorient":
        aff = np.asarray(rec["source_affine"], float)
        return np.stack([reorient_back(v, aff, rec["target"]) for v in x])
    raise ValueError(f"invert: unknown geometry step {op!r}")


def invert_steps(amap: np.ndarray, steps: Sequence[dict[str, Any]], mode: str = "linear") -> np.ndarray:
    """Undo the geometry ``steps`` (forward order, as in a preset's ``meta["steps"]``) on a map.

    ``amap``: (..., *out_shape of the last step); leading axes are kept (a batch of slices, say). Returns the map on
    the first step's input grid: float32 for ``mode="linear"``; ``"nearest"`` keeps bool masks bool."""
    _check_mode(mode)
    m = to_numpy(amap)
    dtype = m.dtype
    if not steps:
        return _cast(m, dtype, mode)
    out_shape = _ints(steps[-1]["out_shape"])
    nd = len(out_shape)
    if m.ndim < nd or tuple(m.shape[m.ndim - nd:]) != out_shape:
        raise ValueError(f"invert: map shape {m.shape} does not end with the preset's output grid {out_shape}")
    lead = m.shape[: m.ndim - nd]
    x = np.asarray(m, np.float32).reshape(-1, *out_shape)
    for rec in reversed(steps):
        if tuple(x.shape[1:]) != _ints(rec["out_shape"]):  # pragma: no cover - records are written by the presets
            raise ValueError(f"invert: step {rec['op']!r} expects {tuple(rec['out_shape'])}, got {tuple(x.shape[1:])}")
        x = _invert_step(x, rec, mode)
    return _cast(x.reshape(*lead, *x.shape[1:]), dtype, mode)
