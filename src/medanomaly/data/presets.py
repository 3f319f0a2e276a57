"""Preprocessing presets: named, documented pipelines with their parameters in a config dict, and their inverse.

``get_preset(name, **params)`` builds one; ``list_presets()`` lists them with a description. Each preset maps raw
arrays (plus optional lesion masks) to a :class:`Preprocessed` (image ``(C, *S)`` float32, ``foreground`` and
``mask`` bool ``(1, *S)``, the output affine, and a ``meta`` dict recording what was done). Lesion masks follow the
image through every geometric step (resize: nearest; crop/pad: same box) and never influence any parameter.

Every preset has ``invert(map, meta, mode="linear")``: a map on the preset's output grid plus the ``meta`` of the
forward call -> the map on the input's own grid (the array ``read_image`` returned; for 3D its voxel grid, so the
input's affine is right for it). ``meta["steps"]`` records the geometry steps; :mod:`medanomaly.data.geometry`
holds each step beside its inverse. For a volume through ``brain-mri-2d`` as axial slices use
``BrainMRI2D.apply_volume`` and ``invert`` (= :func:`~medanomaly.data.geometry.slices_to_volume`): dropped slices
get 0 (``meta["dropped"]``). ``mode="nearest"`` for masks.

Parameters are checked when a preset is built (wrong types, a ``size`` of 0), and so is the output shape a fixed
``size`` implies, against the budget of :mod:`medanomaly.data.limits`: ``size=100000`` is refused in the constructor,
not after allocating. The grid a 3D ``spacing`` implies depends on the input; it is checked before resampling.

Presets
-------
``brain-mri-2d``
    For 2D slices of brain MRI (MIM-OOD setting). Foreground = voxels above ``fg_threshold`` x the 99th percentile
    of the non-zero values, holes filled, only connected components with at least ``min_component`` of the largest
    kept (3D components over a stack of contiguous slices). Intensities clipped at the ``clip_percentile`` (98) of the
    foreground -- computed over the whole VOLUME when slices of one volume are processed together -- and scaled to
    [0, 1]; background set to 0. Each slice is resized (aspect kept, bilinear with anti-aliasing) so that its longer
    side is ``size`` (default 160) and zero-padded to ``size x size``. Slices whose foreground covers less than
    ``min_fg_fraction`` (0.10) of the output area are flagged (``keep`` = False): datasets drop them from every split.
    ``foreground="brain"`` (default ``"head"``) replaces that head mask by :func:`brain_mask` (an unsupervised
    morphological skull strip, for heads that are not skull-stripped); the clip percentile and the zeroed background
    use the brain mask; the slice filter keeps reading the HEAD fraction (``min_fg_fraction``, so the same slices are
    kept as with ``"head"``) and also drops slices whose brain mask covers less than ``min_brain_fraction`` (0.01).
``brain-mri-3d``
    For brain volumes. Reorient to RAS, resample to ``spacing`` mm (default 2.0; ``None`` keeps the spacing) and then
    optionally by an integer ``downsample`` factor (2 = the MTMLW setting); same foreground and intensity handling as
    the 2D preset (including ``foreground="brain"``, axial slices = last RAS axis); crop to the foreground box
    (+``margin`` voxels); zero-pad (centred) to a multiple of ``multiple`` (16), or centre
    crop/pad to the fixed ``size`` when given (needed to batch volumes of different subjects). The output affine is
    updated at every step, so a map written with it overlays the input in world coordinates.
``cxr``
    For chest X-rays. Clip to the DICOM window (when the input carries one and ``window`` is True), histogram
    equalisation (exact, by rank, for up to 4096 distinct values; 4096-bin histogram otherwise), scale to [-1, 1],
    resize to ``size x size`` (default 256; bilinear with anti-aliasing). Foreground = the whole image.

Why not MONAI transforms here: the presets need the output affine of every step (to write maps back in the input's
world coordinates) and must treat a stack of 2D slices as one volume for the percentile; a few lines of nibabel
orientation maths, ``scipy.ndimage.affine_transform`` and ``torch.nn.functional.interpolate`` keep that bookkeeping
explicit and numpy-only, whereas MONAI's Orientation/Spacing/Resize work on MetaTensors one image at a time.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from medanomaly.data.arrays import to_numpy
from medanomaly.data.geometry import (
    crop_or_pad,
    fit_2d,
    invert_steps,
    reorient,
    resample,
    slices_to_volume,
    volume_to_slices,
)
from medanomaly.data.intensity import equalize_histogram, normalise_intensity
from medanomaly.data.io import DataError, Loaded, apply_window, check_array
from medanomaly.data.limits import check_voxel_budget
from medanomaly.data.masks import FOREGROUND_KINDS, scan_foreground

__all__ = [
    "Preprocessed",
    "SliceStack",
    "Preset",
    "BrainMRI2D",
    "BrainMRI3D",
    "ChestXRay",
    "PRESETS",
    "prep_summary",
    "get_preset",
    "list_presets",
]


@dataclass
class Preprocessed:
    """One preprocessed image: ``image`` (C, *S) float32, ``foreground``/``mask`` bool (1, *S)."""

    image: np.ndarray
    foreground: np.ndarray
    mask: np.ndarray | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceStack:
    """Slices of one volume after ``brain-mri-2d``: arrays (S, 1, size, size), per-slice fraction and keep flag."""

    images: np.ndarray
    foreground: np.ndarray
    masks: np.ndarray | None
    fg_fraction: np.ndarray
    keep: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class Preset:
    """Base class: ``defaults`` holds every parameter; unknown parameters raise."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    spatial_dims: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"preset {self.name!r}: unknown parameters {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self._check_params()

    def _check_params(self) -> None:
        """Refuse wrong types up front (a bool where a bool is the default, a finite number where a number is);
        subclasses add the shapes their sizes imply, checked against the voxel budget before any work."""
        for key, default in self.defaults.items():
            v = self.params[key]
            if key == "size":  # a shape: the subclass checks it
                continue
            if isinstance(default, bool):
                if not isinstance(v, bool | np.bool_):
                    raise ValueError(f"preset {self.name!r}: {key} = {v!r} is not true or false")
            elif isinstance(default, int | float) and not _is_number(v):
                raise ValueError(f"preset {self.name!r}: {key} = {v!r} is not a finite number")

    def _size_2d(self) -> None:
        """``size`` (the output side) must be a positive whole number and size x size within the pixel budget."""
        size = _whole(self.params["size"], f"preset {self.name!r}: size")
        check_voxel_budget((size, size), f"preset {self.name!r} with size={size}", what="its output image")

    @property
    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None) -> Preprocessed:  # pragma: no cover
        raise NotImplementedError

    def invert(self, amap: Any, meta: dict[str, Any], mode: str = "linear") -> np.ndarray:
        """A map on this preset's output grid ((*S), (1, *S), or a batch (N, *S)) -> the map on the input's own grid
        (``meta`` from the forward call). ``mode``: ``"linear"`` (continuous maps) or ``"nearest"`` (masks)."""
        steps = meta.get("steps") if isinstance(meta, dict) else None
        if not steps:
            raise ValueError(f"preset {self.name!r}: invert needs the meta of a forward call (no 'steps' record in it)")
        m = to_numpy(amap)
        nd = len(steps[-1]["out_shape"])
        while m.ndim > nd and m.shape[0] == 1:  # a channel (or batch of one) axis
            m = m[0]
        return invert_steps(m, steps, mode)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and math.isfinite(float(v))


def _whole(v: Any, what: str, lo: int = 1) -> int:
    """``v`` as an int >= ``lo`` (an integral float is fine), else a ValueError naming ``what`` and the value."""
    if not _is_number(v) or float(v) != int(v) or int(v) < lo:
        raise ValueError(f"{what} = {v!r} is not a whole number >= {lo}")
    return int(v)


def _triple(v: Any, what: str, conv: Any) -> tuple[Any, ...]:
    """A number or a list of three, each through ``conv(value, what)``."""
    vals = list(v) if isinstance(v, list | tuple | np.ndarray) else [v] * 3
    if len(vals) != 3:
        raise ValueError(f"{what} = {v!r} must be one number or three")
    return tuple(conv(x, what) for x in vals)


def _positive(v: Any, what: str) -> float:
    if not _is_number(v) or float(v) <= 0:
        raise ValueError(f"{what} = {v!r} is not a positive number")
    return float(v)


def _check_fg_kind(kind: Any) -> None:
    if kind not in FOREGROUND_KINDS:
        raise ValueError(f"preset parameter foreground must be 'head' or 'brain' (or 'mask': a given brain mask, 'all': "
                         f"every voxel), got {kind!r}")


def _low(a: np.ndarray, fg: np.ndarray, rec: dict[str, Any]) -> float | None:
    """The intensity mapped to 0: the volume's minimum (None), except on a skull-stripped scan whose constant
    background is not the minimum (z-scored data, a few negative voxels): the lower of the background value and the
    foreground's minimum, so that the brain, not a stray voxel, sets the scale."""
    det = rec.get("skull_stripped") or {}
    v = det.get("background")
    if not det.get("skull_stripped") or v is None or v == float(a.min()) or not fg.any():
        return None
    return float(min(v, float(a[fg].min())))


def _as_loaded(image: Loaded | np.ndarray | Any) -> Loaded:
    if isinstance(image, Loaded):
        return image
    a = to_numpy(image)
    return Loaded(a, np.eye(4), (1.0,) * min(a.ndim, 3), {})


def _check_mask(mask: Any, shape: tuple[int, ...], where: str) -> np.ndarray | None:
    if mask is None:
        return None
    m = to_numpy(mask.array if isinstance(mask, Loaded) else mask)
    if m.shape != shape:
        raise DataError(f"{where}mask shape {m.shape} does not match image shape {shape}")
    if m.dtype != bool:
        bad = (m != 0) & (m != 1) & (m != 255)
        if bad.any():
            raise DataError(f"{where}mask is not binary (values {np.unique(m)[:6].tolist()})")
    return m > 0


def _reshape_step(src: tuple[int, ...], work: tuple[int, ...]) -> list[dict[str, Any]]:
    """The record of a squeeze from the input's shape to the working shape (none when they agree)."""
    return [] if tuple(src) == tuple(work) else [{"op": "reshape", "in_shape": tuple(src), "out_shape": tuple(work)}]


class BrainMRI2D(Preset):
    name = "brain-mri-2d"
    description = "2D brain MRI slices: 98th-percentile clip of the (volume) foreground, [0,1], foreground mask, " \
                  "resize+pad to size x size (160), slice filter by foreground fraction"
    spatial_dims = 2
    defaults = {"size": 160, "clip_percentile": 98.0, "fg_threshold": 0.05, "fill_holes": True, "min_component": 0.1,
                "min_fg_fraction": 0.10, "zero_background": True, "keep_aspect": True,
                "foreground": "head", "min_brain_fraction": 0.01}

    def _check_params(self) -> None:
        super()._check_params()
        self._size_2d()
        _check_fg_kind(self.params["foreground"])

    def apply_slices(self, slices: np.ndarray, masks: np.ndarray | None = None, *, contiguous: bool = True,
                     where: str = "", brain: np.ndarray | None = None) -> SliceStack:
        """Process the slices (S, H, W) of ONE volume together: the clip percentile and the foreground components
        are computed over the volume (``contiguous=False``: per-slice components, for unrelated 2D images).
        ``brain``: a brain mask on the same slices (used by ``foreground="brain"``/``"mask"``).
        ``meta``: ``steps`` (the per-slice geometry), ``keep`` (per slice), ``dropped`` (indices) and
        ``foreground`` (:func:`~medanomaly.data.masks.scan_foreground`'s record, with the voxel counts of the head
        and the foreground on the input grid)."""
        p = self.params
        a = to_numpy(slices)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3:
            raise DataError(f"{where}brain-mri-2d expects slices (S, H, W) or one (H, W) image, got shape {a.shape}")
        check_array(a, where.rstrip(": ") or None)
        a = a.astype(np.float32)
        mk = None if masks is None else to_numpy(masks)
        m = _check_mask(mk[None] if mk is not None and mk.ndim == 2 else mk, a.shape, where)
        _check_fg_kind(p["foreground"])
        bk = None if brain is None else to_numpy(brain)
        bm = _check_mask(bk[None] if bk is not None and bk.ndim == 2 else bk, a.shape, f"{where}brain ")
        fg, head, fg_rec = scan_foreground(a, p["foreground"], brain=bm, threshold=p["fg_threshold"],
                                           fill_holes=p["fill_holes"], min_component=p["min_component"],
                                           slice_axis=0 if contiguous else None, contiguous=contiguous)
        norm, bounds = normalise_intensity(a, fg, p["clip_percentile"], p["zero_background"], low=_low(a, fg, fg_rec))
        size, aspect = int(p["size"]), p["keep_aspect"]
        img, geo = fit_2d(norm[:, None], size, "linear", aspect)
        img = np.clip(img, 0.0, 1.0)
        fg_r = fit_2d(fg[:, None].astype(np.float32), size, "nearest", aspect)[0] > 0.5
        if p["zero_background"]:
            img = np.where(fg_r, img, 0.0).astype(np.float32)
        m_r = None if m is None else fit_2d(m[:, None].astype(np.float32), size, "nearest", aspect)[0] > 0.5
        frac = fg_r.reshape(len(a), -1).mean(axis=1)
        fg_rec.update(head_voxels=int(head.sum()), foreground_voxels=int(fg.sum()))
        meta: dict[str, Any] = {"preset": self.config, "intensity": bounds, "geometry": geo, "steps": [geo],
                                "foreground": fg_rec}
        if p["foreground"] != "head":  # the slice filter reads the HEAD fraction (the same slices as with "head")
            head_r = fit_2d(head[:, None].astype(np.float32), size, "nearest", aspect)[0] > 0.5
            meta["brain_fraction"] = frac
            frac = head_r.reshape(len(a), -1).mean(axis=1)
            keep = (frac >= p["min_fg_fraction"]) & (meta["brain_fraction"] >= p["min_brain_fraction"])
            if keep.any():  # the share of the head the foreground covers in the slices that are scored
                fg_rec["kept_coverage"] = round(float(meta["brain_fraction"][keep].sum() / max(frac[keep].sum(), 1e-12)), 4)
        else:
            keep = frac >= p["min_fg_fraction"]
        meta.update(n_slices=len(a), keep=keep.tolist(), dropped=np.flatnonzero(~keep).tolist())
        return SliceStack(img, fg_r, m_r, frac, keep, meta)

    def apply_volume(self, image: Loaded | np.ndarray, mask: Loaded | np.ndarray | None = None, *,
                     affine: np.ndarray | None = None, where: str = "",
                     brain: Loaded | np.ndarray | None = None) -> SliceStack:
        """A 3D volume as axial slices (:func:`~medanomaly.data.geometry.volume_to_slices`) through
        :meth:`apply_slices`; ``meta["slicing"]`` lets :meth:`invert` put maps back on the volume's grid.
        ``brain``: a brain mask on the volume's grid."""
        ld = _as_loaded(image) if affine is None else Loaded(to_numpy(image), affine)
        where = where or (f"{ld.meta['path']}: " if "path" in ld.meta else "")
        try:
            slices, smeta = volume_to_slices(ld.array, ld.affine, return_meta=True)
        except ValueError as e:
            raise DataError(f"{where}brain-mri-2d apply_volume: {e}") from None
        msl = None
        if mask is not None:
            mk = _check_mask(mask, tuple(ld.array.shape), where)
            msl = volume_to_slices(mk, ld.affine)
        bsl = None
        if brain is not None:
            bsl = volume_to_slices(_check_mask(brain, tuple(ld.array.shape), f"{where}brain "), ld.affine)
        st = self.apply_slices(slices, msl, where=where, brain=bsl)
        st.meta.update(smeta)
        return st

    def invert(self, amap: Any, meta: dict[str, Any], mode: str = "linear") -> np.ndarray:
        """As :meth:`Preset.invert`; for a stack (``apply_slices``/``apply_volume``) maps (S, size, size) go back
        through :func:`~medanomaly.data.geometry.slices_to_volume` (dropped slices get 0)."""
        if isinstance(meta, dict) and "n_slices" in meta:
            return slices_to_volume(amap, meta, mode)
        return super().invert(amap, meta, mode)

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None, *,
                 brain: np.ndarray | None = None) -> Preprocessed:
        ld = _as_loaded(image)
        a = np.squeeze(ld.array)
        if a.ndim != 2:
            raise DataError(f"{ld.meta.get('path', 'image')}: brain-mri-2d on one image needs a 2D array, got {a.shape}"
                            " (use apply_slices for a stack of slices)")
        st = self.apply_slices(a, None if mask is None else np.squeeze(to_numpy(mask)), contiguous=False,
                               brain=None if brain is None else np.squeeze(to_numpy(brain)))
        meta = {k: v for k, v in st.meta.items() if k not in ("n_slices", "dropped")}
        meta.update(fg_fraction=float(st.fg_fraction[0]), keep=bool(st.keep[0]),
                    steps=_reshape_step(ld.array.shape, a.shape) + st.meta["steps"])
        return Preprocessed(st.images[0], st.foreground[0], None if st.masks is None else st.masks[0], np.eye(4), meta)


class BrainMRI3D(Preset):
    name = "brain-mri-3d"
    description = "3D brain MRI: RAS, resample to 2 mm (optional 2x downsampling), 98th-percentile clip, [0,1], " \
                  "crop to the foreground box, pad to a multiple of 16 (or a fixed size)"
    spatial_dims = 3
    defaults = {"orientation": "RAS", "spacing": 2.0, "downsample": 1, "clip_percentile": 98.0, "fg_threshold": 0.05,
                "fill_holes": True, "min_component": 0.1, "zero_background": True, "crop_foreground": True, "margin": 2,
                "multiple": 16, "size": None, "foreground": "head"}

    def _check_params(self) -> None:
        """Types, and the fixed ``size`` against the voxel budget; the grid a ``spacing`` implies depends on the
        input and is checked (before resampling) for each volume."""
        p, w = self.params, f"preset {self.name!r}: "
        for key in ("clip_percentile", "fg_threshold", "min_component"):
            if not _is_number(p[key]):
                raise ValueError(f"{w}{key} = {p[key]!r} is not a finite number")
        for key in ("fill_holes", "zero_background", "crop_foreground"):
            if not isinstance(p[key], bool | np.bool_):
                raise ValueError(f"{w}{key} = {p[key]!r} is not true or false")
        if p["spacing"] is not None:
            _triple(p["spacing"], f"{w}spacing", _positive)
        _whole(p["downsample"], f"{w}downsample")
        _whole(p["multiple"], f"{w}multiple")
        _whole(p["margin"], f"{w}margin", lo=0)
        if p["orientation"] is not None and not isinstance(p["orientation"], str):
            raise ValueError(f"{w}orientation = {p['orientation']!r} is not a string such as 'RAS'")
        _check_fg_kind(p["foreground"])
        if p["size"] is not None:
            size = _triple(p["size"], f"{w}size", _whole)
            check_voxel_budget(size, f"preset {self.name!r} with size={list(size)}", what="its output volume")

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | Loaded | None = None, *,
                 brain: np.ndarray | Loaded | None = None) -> Preprocessed:
        """``brain``: a brain mask on the input's grid (used by ``foreground="brain"``/``"mask"``); it follows the
        image through reorientation and resampling like the lesion mask."""
        p = self.params
        ld = _as_loaded(image)
        where = f"{ld.meta['path']}: " if "path" in ld.meta else ""
        a = ld.array
        while a.ndim > 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 3:
            raise DataError(f"{where}brain-mri-3d expects a 3D volume, got shape {ld.array.shape}")
        check_array(a, where.rstrip(": ") or None)
        steps = _reshape_step(ld.array.shape, a.shape)
        m = mask.array if isinstance(mask, Loaded) else mask
        if m is not None:
            m = to_numpy(m)
            while m.ndim > 3 and m.shape[-1] == 1:
                m = m[..., 0]
        m = _check_mask(m, a.shape, where)
        if isinstance(mask, Loaded) and not np.allclose(mask.affine, ld.affine, atol=1e-3):
            raise DataError(f"{where}mask {mask.meta.get('path', '')} has a different affine from the image")
        b = brain.array if isinstance(brain, Loaded) else brain
        if b is not None:
            b = to_numpy(b)
            while b.ndim > 3 and b.shape[-1] == 1:
                b = b[..., 0]
        b = _check_mask(b, a.shape, f"{where}brain ")
        if isinstance(brain, Loaded) and not np.allclose(brain.affine, ld.affine, atol=1e-3):
            raise DataError(f"{where}brain mask {brain.meta.get('path', '')} has a different affine from the image")
        aff = ld.affine
        a = a.astype(np.float32)
        if p["orientation"]:
            shape0 = a.shape
            a, aff0 = reorient(a, aff, p["orientation"])
            if m is not None:
                m = reorient(m, aff, p["orientation"])[0]
            if b is not None:
                b = reorient(b, aff, p["orientation"])[0]
            steps.append({"op": "reorient", "in_shape": shape0, "out_shape": a.shape, "source_affine": aff.tolist(),
                          "target": p["orientation"]})
            aff = aff0
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        target = spacing.copy() if p["spacing"] is None else np.broadcast_to(np.asarray(p["spacing"], float), (3,))
        factors = target / spacing * float(p["downsample"])
        check_voxel_budget(np.maximum(np.round(np.divide(a.shape, factors)), 1), f"{where}resampling to {target.tolist()} mm")
        if not np.allclose(factors, 1.0, atol=1e-3):
            a_r, aff_r = resample(a, aff, factors, order=1)
            if m is not None:
                m = resample(m.astype(np.float32), aff, factors, order=1)[0] >= 0.5
            if b is not None:
                b = resample(b.astype(np.float32), aff, factors, order=1)[0] >= 0.5
            steps.append({"op": "resample", "in_shape": a.shape, "out_shape": a_r.shape, "factors": factors.tolist()})
            a, aff = a_r, aff_r
        _check_fg_kind(p["foreground"])
        # RAS: axial slices along the last axis; brain_mask's pixel parameters scaled from ~1 mm to the in-plane spacing
        sp = float(np.sqrt((aff[:3, :2] ** 2).sum(axis=0)).mean())
        fg, head, fg_rec = scan_foreground(a, p["foreground"], brain=b, threshold=p["fg_threshold"],
                                           fill_holes=p["fill_holes"], min_component=p["min_component"],
                                           scale=1.0 / max(sp, 1e-3), brain_slice_axis=2)
        if not fg.any():
            raise DataError(f"{where}no foreground found (image is empty after thresholding)")
        fg_rec.update(head_voxels=int(head.sum()), foreground_voxels=int(fg.sum()))
        norm, bounds = normalise_intensity(a, fg, p["clip_percentile"], p["zero_background"], low=_low(a, fg, fg_rec))
        shape = np.array(norm.shape)
        if p["crop_foreground"]:
            idx = np.argwhere(fg)
            lo = np.maximum(idx.min(axis=0) - p["margin"], 0)
            hi = np.minimum(idx.max(axis=0) + 1 + p["margin"], shape)
        else:
            lo, hi = np.zeros(3, int), shape
        box = hi - lo
        if p["size"] is not None:
            out_shape = np.broadcast_to(np.asarray(p["size"], int), (3,))
        else:
            mult = int(p["multiple"])
            out_shape = -(-box // mult) * mult
        start = lo - (out_shape - box) // 2  # centre the box in the output (crop symmetrically when too big)
        clipped = bool(np.any(out_shape < box))
        out_shape_t = tuple(int(s) for s in out_shape)
        start_t = tuple(int(s) for s in start)
        img = crop_or_pad(norm, start_t, out_shape_t)
        fg_o = crop_or_pad(fg, start_t, out_shape_t)
        m_o = None if m is None else crop_or_pad(m, start_t, out_shape_t)
        steps.append({"op": "crop_or_pad", "in_shape": norm.shape, "out_shape": out_shape_t, "start": start_t})
        shift = np.eye(4)
        shift[:3, 3] = start
        aff = aff @ shift
        meta = {"preset": self.config, "intensity": bounds, "crop_start": start_t, "foreground_box": (lo.tolist(), hi.tolist()),
                "foreground_clipped": clipped, "source_affine": ld.affine.tolist(), "source_shape": list(ld.array.shape),
                "steps": steps, "foreground": fg_rec}
        if m is not None:  # evaluation bookkeeping only (guards): lesion voxels the crop to a fixed size loses
            meta["lesion_voxels_cropped"] = int(m.sum()) - int(m_o.sum())
        return Preprocessed(img[None], fg_o[None], None if m_o is None else m_o[None], aff, meta)


class ChestXRay(Preset):
    name = "cxr"
    description = "chest X-ray: DICOM window, histogram equalisation, [-1,1], resize to size x size (256)"
    spatial_dims = 2
    defaults = {"size": 256, "window": True, "equalize": True, "keep_aspect": False}

    def _check_params(self) -> None:
        super()._check_params()
        self._size_2d()

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None) -> Preprocessed:
        """An RGB(A) input (H, W, 3|4) is averaged to grey; its grid (for :meth:`invert`) is (H, W)."""
        p = self.params
        ld = _as_loaded(image)
        where = f"{ld.meta['path']}: " if "path" in ld.meta else ""
        src = to_numpy(ld.array)
        a = np.squeeze(src).astype(np.float32)
        grid = tuple(src.shape)
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].mean(axis=-1)
            grid = grid[:-1]
        if a.ndim != 2:
            raise DataError(f"{where}cxr preset needs a 2D image, got shape {ld.array.shape}")
        check_array(a, where.rstrip(": ") or None)
        m = _check_mask(None if mask is None else np.squeeze(to_numpy(mask)), a.shape, where)
        windowed = False
        if p["window"] and "window_center" in ld.meta:
            a = apply_window(a, ld.meta["window_center"], ld.meta["window_width"])
            windowed = True
        if p["equalize"]:
            u = equalize_histogram(a)
        else:
            lo, hi = float(a.min()), float(a.max())
            u = (a - lo) / max(hi - lo, 1e-12)
        size = int(p["size"])
        img, geo = fit_2d((u * 2.0 - 1.0)[None, None], size, "linear", p["keep_aspect"])
        img = np.clip(img[0], -1.0, 1.0)
        fg = np.ones_like(img, dtype=bool)
        m_o = None
        if m is not None:
            m_o = fit_2d(m[None, None].astype(np.float32), size, "nearest", p["keep_aspect"])[0][0] > 0.5
        meta = {"preset": self.config, "windowed": windowed, "geometry": geo, "steps": _reshape_step(grid, a.shape) + [geo]}
        return Preprocessed(img, fg, m_o, np.eye(4), meta)


PRESETS: dict[str, type[Preset]] = {c.name: c for c in (BrainMRI2D, BrainMRI3D, ChestXRay)}


def prep_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of one forward call's ``meta`` that say what preprocessing did (for guards and reports):
    foreground kind and source, skull-stripped detection, head / foreground voxels, slices and dropped slices."""
    rec = meta.get("foreground") or {}
    det = rec.get("skull_stripped") or {}
    out: dict[str, Any] = {"foreground": rec.get("foreground"), "source": rec.get("source")}
    if "n_images" in det:  # a stack of unrelated images
        out["skull_stripped"] = det["n_skull_stripped"] > det["n_images"] / 2
    elif det:
        out["skull_stripped"] = bool(det.get("skull_stripped"))
        out["background"] = det.get("background")
    for k in ("head_voxels", "foreground_voxels", "kept_coverage"):
        if k in rec:
            out[k] = rec[k] if k == "kept_coverage" else int(rec[k])
    if "n_slices" in meta:
        out.update(n_slices=int(meta["n_slices"]), n_dropped=len(meta.get("dropped") or []))
    if "lesion_voxels_cropped" in meta:
        out["lesion_voxels_cropped"] = int(meta["lesion_voxels_cropped"])
    return out


def get_preset(name: str | Preset, **params: Any) -> Preset:
    """Build a preset by name (``brain-mri-2d``, ``brain-mri-3d``, ``cxr``) with parameter overrides."""
    if isinstance(name, Preset):
        return type(name)(**{**name.params, **params}) if params else name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name](**params)


def list_presets() -> dict[str, str]:
    """Preset names with one-line descriptions."""
    return {n: c.description for n, c in PRESETS.items()}
