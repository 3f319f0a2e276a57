"""Preprocessing presets: named, documented pipelines with their parameters in a config dict.

``get_preset(name, **params)`` builds one; ``list_presets()`` lists them with a description. Each preset maps raw
arrays (plus optional lesion masks) to a :class:`Preprocessed` (image ``(C, *S)`` float32, ``foreground`` and
``mask`` bool ``(1, *S)``, the output affine, and a ``meta`` dict recording what was done). Lesion masks follow the
image through every geometric step (resize: nearest; crop/pad: same box) and never influence any parameter.

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

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from medanomaly.data.io import DataError, Loaded, apply_window, check_array

__all__ = [
    "Preprocessed",
    "SliceStack",
    "Preset",
    "BrainMRI2D",
    "BrainMRI3D",
    "ChestXRay",
    "get_preset",
    "list_presets",
    "foreground_mask",
    "brain_mask",
    "normalise_intensity",
    "fit_2d",
    "unfit_2d",
    "reorient",
    "resample",
    "crop_or_pad",
    "equalize_histogram",
    "to_numpy",
]


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)


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


# ------------------------------------------------------------------------------------------------ building blocks
def foreground_mask(
    arr: np.ndarray,
    threshold: float = 0.05,
    ref_percentile: float = 99.0,
    fill_holes: bool = True,
    min_component: float = 0.1,
    slice_axis: int | None = None,
) -> np.ndarray:
    """Unsupervised body/brain mask: ``arr > threshold * P_ref(non-zero values)``, holes filled, small components
    (< ``min_component`` x the largest) removed. Components are found in ``arr.ndim`` dimensions; holes are filled in
    2D per slice along ``slice_axis`` when given (and in N-D otherwise)."""
    a = np.asarray(arr, dtype=np.float32)
    base = a.min()
    nz = a[a > base]
    if nz.size == 0:
        return np.zeros(a.shape, bool)
    fg = a > base + threshold * (np.percentile(nz, ref_percentile) - base)
    if min_component > 0 and fg.any():
        lab, n = ndi.label(fg)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            table = np.concatenate([[False], sizes >= min_component * sizes.max()])
            fg = table[lab]
    if fill_holes:
        fg = _fill_holes(fg, slice_axis)
    return fg


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance of a ``bins``-bin histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def brain_mask(
    volume: np.ndarray,
    *,
    head: np.ndarray | None = None,
    threshold: str | float = 0.6,
    threshold_scale: float = 1.0,
    smooth: float = 1.0,
    erode: int = 6,
    dilate: int | None = None,
    min_depth: float = 8.0,
    component: str = "3d",
    min_slice_area: float = 0.02,
    fill_holes: bool = True,
    slice_axis: int | None = 0,
    scale: float = 1.0,
) -> np.ndarray:
    """Unsupervised, label-free skull strip for FLAIR/T1 slices of one volume (or one 2D slice / a 3D volume).

    Steps (everything computed from the image only; lesion masks are never read):

    1. ``head``: the head mask (default :func:`foreground_mask` with its defaults).
    2. Gaussian smoothing (``smooth`` pixels, in-plane only when ``slice_axis`` is given) and a tissue threshold:
       a float = that fraction of the median of the voxels above the volume's Otsu threshold of log intensities
       (the "tissue" median; robust to noisy background and to a very bright scalp), or ``"otsu"`` = Otsu's
       threshold of the head voxels (too high when the scalp is very bright); multiplied by ``threshold_scale``.
       Brain parenchyma (and bright FLAIR lesions) lie above it, the dark skull bone and CSF rim below, which leaves
       the bright scalp as a separate ring joined by thin bridges. The head is also cut to the voxels above the
       log-Otsu threshold (holes filled), which drops noisy background.
    3. Tissue closer than ``min_depth`` pixels to the head surface (in-plane) is dropped (scalp shell), then in-plane
       erosion with a disk of radius ``erode`` pixels cuts those bridges.
    4. Keep ONE object: ``component="3d"`` = the largest connected component over the slice stack (slices of one
       volume are contiguous), ``"2d"`` = per slice, the component with the most area nearest the head centre
       (largest area / (1 + distance of its centroid to the head centroid in head radii)).
    5. Dilation back by ``dilate`` (default ``erode + 1``) pixels, restricted to the head; per-slice objects smaller
       than ``min_slice_area`` x the largest slice's object are dropped (skull-base fragments).
    6. Holes filled per slice (dark ventricles, necrotic cores inside the brain).

    The pixel parameters (``smooth``, ``erode``, ``dilate``, ``min_depth``) are tuned for the LGG slices (256 px
    over a ~22-24 cm field of view, ~0.9 mm pixels) and are multiplied by ``scale`` (e.g. 0.5 for 2 mm voxels).
    Returns a bool array shaped like ``volume``. ``slice_axis=None`` treats the input as one N-D image.
    """
    a = np.asarray(volume, dtype=np.float32)
    if a.ndim not in (2, 3):
        raise DataError(f"brain_mask expects a 2D slice or a 3D stack/volume, got shape {a.shape}")
    single = a.ndim == 2
    if single:
        a = a[None]
        if head is not None:
            head = np.asarray(head, bool)[None]
        slice_axis = 0
    if slice_axis is not None:
        a = np.moveaxis(a, slice_axis, 0)
        if head is not None:
            head = np.moveaxis(np.asarray(head, bool), slice_axis, 0)
    if head is None:
        head = foreground_mask(a, slice_axis=0 if slice_axis is not None else None)
    head = np.asarray(head, bool)
    if head.shape != a.shape:
        raise DataError(f"brain_mask: head mask shape {head.shape} does not match the volume {a.shape}")
    if not head.any():
        out = np.zeros(a.shape, bool)
        return out[0] if single else (np.moveaxis(out, 0, slice_axis) if slice_axis is not None else out)
    smooth, min_depth = smooth * scale, min_depth * scale
    dilate = int(round((erode + 1 if dilate is None else dilate) * scale))
    erode = int(round(erode * scale))
    sig = (0.0, smooth, smooth) if slice_axis is not None else smooth
    s = ndi.gaussian_filter(a, sig) if smooth > 0 else a
    # background noise vs tissue over the whole volume: Otsu on log intensities (on linear ones a very bright
    # scalp pulls the split between brain and scalp)
    t0 = float(np.expm1(_otsu(np.log1p(np.clip(s, 0, None)).ravel())))
    head = _fill_holes(head & (s > t0), 0 if slice_axis is not None else None)  # drop noisy background
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"brain_mask: threshold must be 'otsu' or a number, got {threshold!r}")
        thr = _otsu(s[head]) if head.any() else t0
    else:
        thr = float(threshold) * float(np.median(s[s > t0]))
    tissue = (s > thr * threshold_scale) & head
    inplane = slice_axis is not None
    # work inside the head's box (+1 voxel): same result, far fewer voxels for the distance transforms
    box = _box(head, skip=1 if inplane else 0)
    full_shape = head.shape
    head, tissue = head[box], tissue[box]
    if min_depth > 0:  # the scalp is a thin shell at the head surface: keep tissue at least min_depth px inside
        tissue &= _edt(head, inplane) >= min_depth
    # erosion / dilation by a disk (in-plane) through distance transforms: exact and much faster than
    # binary_erosion with a large structuring element
    core = _edt(tissue, inplane) > erode if erode > 0 else tissue
    keep = _pick_component(core, head, component if inplane else "3d")
    if dilate > 0 and keep.any():
        keep = _edt(~keep, inplane, pad=True) <= dilate
    keep &= head
    if inplane and min_slice_area > 0:
        area = keep.reshape(len(keep), -1).sum(axis=1)
        keep[area < min_slice_area * max(area.max(), 1)] = False
    if fill_holes:
        keep = _fill_holes(keep, 0 if inplane else None)
    out = np.zeros(full_shape, bool)
    out[box] = keep
    keep = out
    if single:
        return keep[0]
    return np.moveaxis(keep, 0, slice_axis) if slice_axis is not None else keep


def _box(mask: np.ndarray, skip: int = 0) -> tuple[slice, ...]:
    """The bounding box of ``mask`` (+1 voxel each side) over all axes but the first ``skip``."""
    sl: list[slice] = [slice(None)] * mask.ndim
    if mask.any():
        for ax in range(skip, mask.ndim):
            hit = np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != ax)))
            sl[ax] = slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2)
    return tuple(sl)


def _edt(mask: np.ndarray, inplane: bool, pad: bool = False) -> np.ndarray:
    """Distance of each True voxel to the nearest False one (outside the array counts as False unless ``pad``);
    ``inplane``: in 2D per slice of an (S, H, W) stack (a loop of 2D transforms: ~5x faster than one 3D transform
    with a huge step across slices)."""
    if inplane:
        return np.stack([_edt(m, False, pad) for m in mask])
    m = np.pad(mask, 1, constant_values=pad)
    if not (~m).any():
        return np.full(mask.shape, np.inf)
    return ndi.distance_transform_edt(m)[(slice(1, -1),) * mask.ndim]


def _pick_component(core: np.ndarray, head: np.ndarray, how: str) -> np.ndarray:
    """The object kept by :func:`brain_mask` (``core`` and ``head`` are (S, H, W) stacks)."""
    if how == "3d":
        struct = np.zeros((3, 3, 3), bool)
        struct[1] = ndi.generate_binary_structure(2, 1)
        struct[:, 1, 1] = True
        lab, n = ndi.label(core, structure=struct)
        if n == 0:
            return core
        sizes = np.bincount(lab.ravel())[1:]
        return lab == (int(np.argmax(sizes)) + 1)
    if how != "2d":
        raise ValueError(f"brain_mask: component must be '3d' or '2d', got {how!r}")
    out = np.zeros_like(core)
    for i in range(len(core)):
        lab, n = ndi.label(core[i])
        if n == 0:
            continue
        hy, hx = np.argwhere(head[i]).mean(axis=0) if head[i].any() else np.array(core[i].shape) / 2
        rad = max(np.sqrt(head[i].sum() / np.pi), 1.0)
        idx = np.arange(1, n + 1)
        sizes = ndi.sum(np.ones_like(lab), lab, idx)
        cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(lab), lab, idx)).T
        score = sizes / (1.0 + np.hypot(cy - hy, cx - hx) / rad)
        out[i] = lab == idx[int(np.argmax(score))]
    return out


def _fill_holes(fg: np.ndarray, slice_axis: int | None = None) -> np.ndarray:
    """Fill background regions that do not touch the border (per 2D slice along ``slice_axis`` when given); a
    labelling-based equivalent of ``scipy.ndimage.binary_fill_holes``, several times faster on slice stacks."""
    bg = ~fg
    if slice_axis is not None:
        bg = np.moveaxis(bg, slice_axis, 0)
        struct = np.zeros((3,) * bg.ndim, bool)
        struct[1] = ndi.generate_binary_structure(bg.ndim - 1, 1)  # no connection across slices
        axes = range(1, bg.ndim)
    else:
        struct = ndi.generate_binary_structure(bg.ndim, 1)
        axes = range(bg.ndim)
    lab, n = ndi.label(bg, structure=struct)
    if n == 0:
        return fg
    border = np.zeros(n + 1, bool)
    for ax in axes:
        border[np.take(lab, 0, axis=ax).ravel()] = True
        border[np.take(lab, -1, axis=ax).ravel()] = True
    border[0] = True  # label 0 = foreground
    filled = ~border[lab]
    if slice_axis is not None:
        filled = np.moveaxis(filled, 0, slice_axis)
    return fg | filled


def normalise_intensity(arr: np.ndarray, foreground: np.ndarray, clip_percentile: float = 98.0,
                        zero_background: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """Scale to [0, 1]: ``(x - min) / (P_clip(foreground) - min)``, clipped; returns the array and the two bounds."""
    a = np.asarray(arr, dtype=np.float32)
    vals = a[foreground] if foreground.any() else a.ravel()
    lo = float(a.min())
    hi = float(np.percentile(vals, clip_percentile))
    if hi <= lo:
        hi = float(vals.max()) if vals.max() > lo else lo + 1.0
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    if zero_background:
        out = np.where(foreground, out, 0.0)
    return out.astype(np.float32), {"low": lo, "high": hi}


def _interp(x: np.ndarray, size: tuple[int, ...], kind: str) -> np.ndarray:
    """Resize (N, C, *S) arrays with torch: ``linear`` (anti-aliased when shrinking 2D) or ``nearest``."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if tuple(t.shape[2:]) == tuple(size):
        return t.numpy()
    if kind == "nearest":
        out = F.interpolate(t, size=size, mode="nearest-exact")
    else:
        mode = "bilinear" if t.ndim == 4 else "trilinear"
        shrink = any(s < o for s, o in zip(size, t.shape[2:], strict=True))
        out = F.interpolate(t, size=size, mode=mode, align_corners=False, antialias=shrink and t.ndim == 4)
    return out.numpy()


def fit_2d(x: np.ndarray, size: int, kind: str = "linear", keep_aspect: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Resize (N, C, H, W) so the longer side is ``size`` (aspect kept) and zero-pad to ``size x size``.

    With ``keep_aspect=False`` the image is stretched to ``size x size``. Returns the array and the geometry
    (``resized``: (h, w), ``pad``: (top, left)) so maps can be mapped back."""
    h, w = x.shape[-2:]
    if not keep_aspect:
        return _interp(x, (size, size), kind), {"resized": (size, size), "pad": (0, 0), "orig": (h, w)}
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    r = _interp(x, (nh, nw), kind)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((*x.shape[:-2], size, size), np.float32)
    out[..., top : top + nh, left : left + nw] = r
    return out, {"resized": (nh, nw), "pad": (top, left), "orig": (h, w)}


def unfit_2d(x: np.ndarray, geometry: dict[str, Any], kind: str = "linear") -> np.ndarray:
    """Undo :func:`fit_2d`: crop the padding and resize (N, C, size, size) maps back to the original (H, W)."""
    nh, nw = geometry["resized"]
    top, left = geometry["pad"]
    crop = np.asarray(x, np.float32)[..., top : top + nh, left : left + nw]
    return _interp(crop, tuple(geometry["orig"]), kind)


def reorient(arr: np.ndarray, affine: np.ndarray, target: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose a 3D array to the axis codes ``target`` (nibabel orientation maths); returns array, affine."""
    import nibabel as nib
    from nibabel import orientations as nio

    cur = nio.io_orientation(affine)
    tgt = nio.axcodes2ornt(tuple(target))
    tr = nio.ornt_transform(cur, tgt)
    out = nio.apply_orientation(arr, tr)
    new_aff = affine @ nio.inv_ornt_aff(tr, arr.shape)
    assert "".join(nib.aff2axcodes(new_aff)) == target
    return np.ascontiguousarray(out), new_aff


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
    return out, affine @ m


def crop_or_pad(arr: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The box ``[start, start + shape)`` of the last ``len(shape)`` axes; outside the array is zero."""
    nd = len(shape)
    out = np.zeros((*arr.shape[: arr.ndim - nd], *shape), dtype=arr.dtype)
    src, dst = [], []
    for s0, n, full in zip(start, shape, arr.shape[-nd:], strict=True):
        a, b = max(s0, 0), min(s0 + n, full)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s0, b - s0))
    out[(..., *dst)] = arr[(..., *src)]
    return out


def equalize_histogram(arr: np.ndarray, max_levels: int = 4096) -> np.ndarray:
    """Histogram equalisation to [0, 1]: each value maps to its empirical CDF (exact by rank for up to
    ``max_levels`` distinct values, binned otherwise), rescaled so the lowest value maps to 0."""
    a = np.asarray(arr, dtype=np.float64)
    vals, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    if vals.size == 1:
        return np.zeros(a.shape, np.float32)
    if vals.size <= max_levels:
        cdf = np.cumsum(counts) / a.size
        mapped = cdf[inv.reshape(a.shape)]
        c0 = cdf[0]
    else:
        hist, edges = np.histogram(a, bins=max_levels)
        cdf = np.cumsum(hist) / a.size
        mapped = np.interp(a, edges[1:], cdf)
        c0 = cdf[0]
    return ((mapped - c0) / max(1.0 - c0, 1e-12)).clip(0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- presets
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

    @property
    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None) -> Preprocessed:  # pragma: no cover
        raise NotImplementedError


def _check_fg_kind(kind: Any) -> None:
    if kind not in ("head", "brain"):
        raise ValueError(f"preset parameter foreground must be 'head' or 'brain', got {kind!r}")


def _as_loaded(image: Loaded | np.ndarray | torch.Tensor) -> Loaded:
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


class BrainMRI2D(Preset):
    name = "brain-mri-2d"
    description = "2D brain MRI slices: 98th-percentile clip of the (volume) foreground, [0,1], foreground mask, " \
                  "resize+pad to size x size (160), slice filter by foreground fraction"
    spatial_dims = 2
    defaults = {"size": 160, "clip_percentile": 98.0, "fg_threshold": 0.05, "fill_holes": True, "min_component": 0.1,
                "min_fg_fraction": 0.10, "zero_background": True, "keep_aspect": True,
                "foreground": "head", "min_brain_fraction": 0.01}

    def apply_slices(self, slices: np.ndarray, masks: np.ndarray | None = None, *, contiguous: bool = True,
                     where: str = "") -> SliceStack:
        """Process the slices (S, H, W) of ONE volume together: the clip percentile and the foreground components
        are computed over the volume (``contiguous=False``: per-slice components, for unrelated 2D images)."""
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
        if contiguous:
            fg = foreground_mask(a, p["fg_threshold"], fill_holes=p["fill_holes"], min_component=p["min_component"],
                                 slice_axis=0)
        else:
            fg = np.stack([foreground_mask(s, p["fg_threshold"], fill_holes=p["fill_holes"],
                                           min_component=p["min_component"]) for s in a])
        head = fg
        if p["foreground"] == "brain":
            if contiguous:
                fg = brain_mask(a, head=head, slice_axis=0)
            else:
                fg = np.stack([brain_mask(s, head=f) for s, f in zip(a, head, strict=True)])
        norm, bounds = normalise_intensity(a, fg, p["clip_percentile"], p["zero_background"])
        size = int(p["size"])
        img, geo = fit_2d(norm[:, None], size, "linear", p["keep_aspect"])
        img = np.clip(img, 0.0, 1.0)
        fg_r = fit_2d(fg[:, None].astype(np.float32), size, "nearest", p["keep_aspect"])[0] > 0.5
        if p["zero_background"]:
            img = np.where(fg_r, img, 0.0).astype(np.float32)
        m_r = None if m is None else fit_2d(m[:, None].astype(np.float32), size, "nearest", p["keep_aspect"])[0] > 0.5
        frac = fg_r.reshape(len(a), -1).mean(axis=1)
        meta = {"preset": self.config, "intensity": bounds, "geometry": geo}
        if p["foreground"] == "brain":  # the slice filter reads the HEAD fraction (the same slices as with "head")
            head_r = fit_2d(head[:, None].astype(np.float32), size, "nearest", p["keep_aspect"])[0] > 0.5
            meta["brain_fraction"] = frac
            frac = head_r.reshape(len(a), -1).mean(axis=1)
            keep = (frac >= p["min_fg_fraction"]) & (meta["brain_fraction"] >= p["min_brain_fraction"])
        else:
            keep = frac >= p["min_fg_fraction"]
        return SliceStack(img, fg_r, m_r, frac, keep, meta)

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None) -> Preprocessed:
        ld = _as_loaded(image)
        a = np.squeeze(ld.array)
        if a.ndim != 2:
            raise DataError(f"{ld.meta.get('path', 'image')}: brain-mri-2d on one image needs a 2D array, got {a.shape}"
                            " (use apply_slices for a stack of slices)")
        st = self.apply_slices(a, None if mask is None else np.squeeze(to_numpy(mask)), contiguous=False)
        meta = {**st.meta, "fg_fraction": float(st.fg_fraction[0]), "keep": bool(st.keep[0])}
        return Preprocessed(st.images[0], st.foreground[0], None if st.masks is None else st.masks[0], np.eye(4), meta)


class BrainMRI3D(Preset):
    name = "brain-mri-3d"
    description = "3D brain MRI: RAS, resample to 2 mm (optional 2x downsampling), 98th-percentile clip, [0,1], " \
                  "crop to the foreground box, pad to a multiple of 16 (or a fixed size)"
    spatial_dims = 3
    defaults = {"orientation": "RAS", "spacing": 2.0, "downsample": 1, "clip_percentile": 98.0, "fg_threshold": 0.05,
                "fill_holes": True, "min_component": 0.1, "zero_background": True, "crop_foreground": True, "margin": 2,
                "multiple": 16, "size": None, "foreground": "head"}

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | Loaded | None = None) -> Preprocessed:
        p = self.params
        ld = _as_loaded(image)
        where = f"{ld.meta['path']}: " if "path" in ld.meta else ""
        a = ld.array
        while a.ndim > 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 3:
            raise DataError(f"{where}brain-mri-3d expects a 3D volume, got shape {ld.array.shape}")
        check_array(a, where.rstrip(": ") or None)
        m = mask.array if isinstance(mask, Loaded) else mask
        if m is not None:
            m = to_numpy(m)
            while m.ndim > 3 and m.shape[-1] == 1:
                m = m[..., 0]
        m = _check_mask(m, a.shape, where)
        if isinstance(mask, Loaded) and not np.allclose(mask.affine, ld.affine, atol=1e-3):
            raise DataError(f"{where}mask {mask.meta.get('path', '')} has a different affine from the image")
        aff = ld.affine
        a = a.astype(np.float32)
        if p["orientation"]:
            a, aff0 = reorient(a, aff, p["orientation"])
            if m is not None:
                m = reorient(m, aff, p["orientation"])[0]
            aff = aff0
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        target = spacing.copy() if p["spacing"] is None else np.broadcast_to(np.asarray(p["spacing"], float), (3,))
        factors = target / spacing * float(p["downsample"])
        if not np.allclose(factors, 1.0, atol=1e-3):
            a_r, aff_r = resample(a, aff, factors, order=1)
            if m is not None:
                m = resample(m.astype(np.float32), aff, factors, order=1)[0] >= 0.5
            a, aff = a_r, aff_r
        _check_fg_kind(p["foreground"])
        fg = foreground_mask(a, p["fg_threshold"], fill_holes=p["fill_holes"], min_component=p["min_component"])
        if p["foreground"] == "brain" and fg.any():
            # RAS: axial slices along the last axis; pixel parameters scaled from ~1 mm to the in-plane spacing
            sp = float(np.sqrt((aff[:3, :2] ** 2).sum(axis=0)).mean())
            fg = brain_mask(a, head=fg, slice_axis=2, scale=1.0 / max(sp, 1e-3))
        if not fg.any():
            raise DataError(f"{where}no foreground found (image is empty after thresholding)")
        norm, bounds = normalise_intensity(a, fg, p["clip_percentile"], p["zero_background"])
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
        shift = np.eye(4)
        shift[:3, 3] = start
        aff = aff @ shift
        meta = {"preset": self.config, "intensity": bounds, "crop_start": start_t, "foreground_box": (lo.tolist(), hi.tolist()),
                "foreground_clipped": clipped, "source_affine": ld.affine.tolist(), "source_shape": list(ld.array.shape)}
        return Preprocessed(img[None], fg_o[None], None if m_o is None else m_o[None], aff, meta)


class ChestXRay(Preset):
    name = "cxr"
    description = "chest X-ray: DICOM window, histogram equalisation, [-1,1], resize to size x size (256)"
    spatial_dims = 2
    defaults = {"size": 256, "window": True, "equalize": True, "keep_aspect": False}

    def __call__(self, image: Loaded | np.ndarray, mask: np.ndarray | None = None) -> Preprocessed:
        p = self.params
        ld = _as_loaded(image)
        where = f"{ld.meta['path']}: " if "path" in ld.meta else ""
        a = np.squeeze(to_numpy(ld.array)).astype(np.float32)
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].mean(axis=-1)
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
        img = fit_2d((u * 2.0 - 1.0)[None, None], int(p["size"]), "linear", p["keep_aspect"])[0]
        img = np.clip(img[0], -1.0, 1.0)
        fg = np.ones_like(img, dtype=bool)
        m_o = None
        if m is not None:
            m_o = fit_2d(m[None, None].astype(np.float32), int(p["size"]), "nearest", p["keep_aspect"])[0][0] > 0.5
        geo = {"resized": (int(p["size"]),) * 2, "pad": (0, 0), "orig": a.shape} if not p["keep_aspect"] else \
            fit_2d(np.zeros((1, 1, *a.shape), np.float32), int(p["size"]))[1]
        return Preprocessed(img, fg, m_o, np.eye(4), {"preset": self.config, "windowed": windowed, "geometry": geo})


PRESETS: dict[str, type[Preset]] = {c.name: c for c in (BrainMRI2D, BrainMRI3D, ChestXRay)}


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
