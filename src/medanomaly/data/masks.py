"""Unsupervised masks computed from the image only: the head/body foreground, Otsu's threshold, a brain mask.

Lesion masks are never read here. :func:`foreground_mask` is the body mask every preset uses; :func:`brain_mask` an
unsupervised morphological skull strip (for heads that are not skull-stripped); :func:`detect_skull_stripped` tells
the two kinds of input apart and :func:`scan_foreground` picks the foreground a preset asks for (``head``,
``brain``, ``mask``, ``all``) accordingly; :func:`otsu_threshold` the one Otsu of the package; :func:`fill_mask_holes`
a fast per-slice hole filling. :func:`lesion_labels` / :func:`select_lesion` turn a multi-class lesion mask into the
binary one evaluation needs (``--lesion-labels 1,2,4`` or ``>0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medanomaly.data.io import DataError

__all__ = ["foreground_mask", "brain_mask", "detect_skull_stripped", "scan_foreground", "FOREGROUND_KINDS",
           "lesion_labels", "select_lesion", "otsu_threshold", "fill_mask_holes"]

#: what a preset's ``foreground`` parameter may say
FOREGROUND_KINDS = ("head", "brain", "mask", "all")
#: skull-stripped input: at least this fraction of the voxels is one exact value touching the border ...
STRIPPED_MIN_BACKGROUND = 0.15
#: ... and the voxels just inside that background are tissue: their median distance from the background value is
#: at least this fraction of the interior's (measured: raw skull-on LGG/IXI <= 0.33, skull-stripped BraTS >= 0.6)
STRIPPED_MIN_EDGE_RATIO = 0.45
#: ... but not much brighter than the interior: a bright rim is a scalp (fat) on a skull-on head whose background
#: was zeroed (BraTS FLAIR/T1: <= 1.05)
STRIPPED_MAX_EDGE_RATIO = 1.5


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
    if a.size >= 1000:  # a few outlying low voxels (interpolation ringing) must not set the background level
        flat = a.ravel()
        p = np.partition(flat, a.size // 1000)[a.size // 1000]  # the 0.1th percentile
        if p > base and p - base > 0.05 * (float(np.percentile(flat, 99)) - base):
            base = p
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
        fg = fill_mask_holes(fg, slice_axis)
    return fg


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a sample (any shape): the bin centre that maximises the between-class variance of a
    ``bins``-bin histogram. The one Otsu of the package: the masks here, and (``bins=128``) the anatomy masks of
    :func:`medanomaly.synth.tasks.anatomy_mask` and :func:`medanomaly.methods.amae.anatomy.lung_mask`."""
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
    t0 = float(np.expm1(otsu_threshold(np.log1p(np.clip(s, 0, None)).ravel())))
    head = fill_mask_holes(head & (s > t0), 0 if slice_axis is not None else None)  # drop noisy background
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"brain_mask: threshold must be 'otsu' or a number, got {threshold!r}")
        thr = otsu_threshold(s[head]) if head.any() else t0
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
        keep = fill_mask_holes(keep, 0 if inplane else None)
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


def fill_mask_holes(fg: np.ndarray, slice_axis: int | None = None) -> np.ndarray:
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


def _border_values(a: np.ndarray, slice_axis: int | None) -> np.ndarray:
    """The voxels on the array's border (in-plane border only when ``slice_axis`` is given)."""
    axes = [ax for ax in range(a.ndim) if ax != slice_axis]
    return np.concatenate([np.take(a, i, axis=ax).ravel() for ax in axes for i in (0, -1)])


def detect_skull_stripped(arr: np.ndarray, slice_axis: int | None = None) -> dict[str, Any]:
    """Is this scan already skull-stripped (or otherwise masked to the brain)? Computed from the image only.

    Skull-stripped input has a large, exactly constant background (any value: 0, or a negative constant after
    z-scoring) that touches the border, and the voxels just inside it are tissue, not noise. Raw skull-on scans may
    also hold many exact zeros (8-bit LGG slices, IXI), but there the region inside the constant background starts
    with noise; a skull-on head whose background was zeroed exactly starts with a bright scalp (an edge much
    brighter than the interior is not taken as skull-stripped). Heuristic: a scan it gets wrong needs a brain mask
    or ``--foreground``. Returns ``{"skull_stripped", "background" (the value or None), "background_fraction",
    "edge_ratio", "below_background"}``: the median distance from the background value of the voxels within 2
    voxels of the background (in-plane when ``slice_axis`` is given) over that of the deeper interior;
    ``below_background`` the fraction of non-background voxels below it (z-scored or interpolated data).
    """
    a = np.asarray(arr, dtype=np.float32)
    if a.size > 2_000_000:  # a decision, not a mask: a strided copy (<= ~1M voxels) answers it 8x+ faster
        step = int(np.ceil((a.size / 1_000_000) ** (1 / a.ndim)))
        a = a[(slice(None, None, step),) * a.ndim]
    out: dict[str, Any] = {"skull_stripped": False, "background": None, "background_fraction": 0.0, "edge_ratio": None,
                           "below_background": 0.0}
    if a.ndim < 2 or a.size < 64:
        return out
    vals, counts = np.unique(_border_values(a, slice_axis), return_counts=True)
    v = vals[int(np.argmax(counts))]
    if counts.max() < 0.5 * counts.sum():  # the border is not mostly one value
        return out
    is_bg = a == v
    frac = float(is_bg.mean())
    out.update(background=float(v), background_fraction=round(frac, 4))
    if frac < STRIPPED_MIN_BACKGROUND or frac > 0.995:
        return out
    # the constant region touching the border is the background; specks off it (noise) are not the object
    inside = _clean(~is_bg, 0.1, True, slice_axis)
    box = _box(inside)
    inside, d = inside[box], np.abs(a[box] - v)
    out["below_background"] = round(float((a[box][inside] < v).mean()), 4)
    if slice_axis is not None:
        inside, d = np.moveaxis(inside, slice_axis, 0), np.moveaxis(d, slice_axis, 0)
    dist = _edt(inside, slice_axis is not None, pad=True)  # the array border is not background
    shell, deep = inside & (dist <= 2), dist > 6
    if shell.sum() < 16 or deep.sum() < 16:
        return out
    ref = float(np.median(d[deep]))
    ratio = float(np.median(d[shell])) / ref if ref > 0 else 0.0
    out["edge_ratio"] = round(ratio, 3)
    out["skull_stripped"] = bool(STRIPPED_MIN_EDGE_RATIO <= ratio <= STRIPPED_MAX_EDGE_RATIO)
    return out


def scan_foreground(
    arr: np.ndarray,
    kind: str = "head",
    *,
    brain: np.ndarray | None = None,
    threshold: float = 0.05,
    fill_holes: bool = True,
    min_component: float = 0.1,
    slice_axis: int | None = None,
    contiguous: bool = True,
    scale: float = 1.0,
    brain_slice_axis: int | None = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The foreground a preset asks for, fitted to the scan: ``(foreground, head, record)``.

    ``kind``: ``"head"`` (thresholded head/body, :func:`foreground_mask`), ``"brain"`` (the given ``brain`` mask;
    else the head itself when the scan is skull-stripped (:func:`detect_skull_stripped`); else the unsupervised
    skull strip :func:`brain_mask`), ``"mask"`` (the given ``brain`` mask, required), ``"all"`` (every voxel). On a
    skull-stripped scan the head is thresholded on the distance from the constant background value, so a negative
    or mid-range background (z-scored data) is background, not tissue. ``contiguous=False``: ``arr`` is a stack of
    unrelated 2D images (one detection and one mask each). ``scale``/``brain_slice_axis`` go to :func:`brain_mask`.
    The record: ``foreground`` (kind), ``source`` (how it was made), ``skull_stripped`` (the detection).
    """
    if kind not in FOREGROUND_KINDS:
        raise ValueError(f"foreground must be one of {', '.join(FOREGROUND_KINDS)}, got {kind!r}")
    a = np.asarray(arr, dtype=np.float32)
    if brain is not None:
        brain = np.asarray(brain, bool)
        if brain.shape != a.shape:
            raise DataError(f"brain mask shape {brain.shape} does not match the image {a.shape}")
    if kind == "mask" and brain is None:
        raise DataError("foreground 'mask' needs a brain mask (a brain_mask column in the manifest, or --brain-mask)")
    if not contiguous:
        parts = [scan_foreground(x, kind, brain=None if brain is None else brain[i], threshold=threshold,
                                 fill_holes=fill_holes, min_component=min_component, scale=scale, brain_slice_axis=None)
                 for i, x in enumerate(a)]
        rec = dict(parts[0][2]) if len(parts) == 1 else {
            "foreground": kind, "source": sorted({p[2]["source"] for p in parts}),
            "skull_stripped": {"n_images": len(parts), "n_skull_stripped": sum(p[2]["skull_stripped"]["skull_stripped"]
                                                                                for p in parts)}}
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), rec
    det = detect_skull_stripped(a, slice_axis)
    kw = {"fill_holes": fill_holes, "min_component": min_component, "slice_axis": slice_axis}
    v = np.float32(det["background"]) if det["skull_stripped"] else None
    if v is not None and v != a.min():
        # the background is not the minimum (a few negative voxels, z-scored data): the head is every voxel off the
        # constant background (holes filled, small specks dropped), not a threshold above the minimum
        head = _clean(a != v, min_component, fill_holes, slice_axis)
    else:  # raw data, or skull-stripped with the background at the minimum (BraTS): the plain head threshold
        head = foreground_mask(a, threshold, **kw)
    rec: dict[str, Any] = {"foreground": kind, "skull_stripped": det}
    if kind == "all":
        fg, rec["source"] = np.ones(a.shape, bool), "every voxel"
    elif kind == "head":
        fg, rec["source"] = head, "head threshold"
    elif brain is not None:
        fg, rec["source"] = brain, "given brain mask"
    elif det["skull_stripped"]:
        fg, rec["source"] = head, "skull-stripped input: the head is the brain"
    else:
        fg = brain_mask(a, head=head, slice_axis=brain_slice_axis, scale=scale) if head.any() else head
        rec["source"] = "unsupervised skull strip"
    return fg, head, rec


def _clean(fg: np.ndarray, min_component: float, fill_holes: bool, slice_axis: int | None) -> np.ndarray:
    """Components under ``min_component`` x the largest dropped, holes filled (as :func:`foreground_mask`)."""
    if min_component > 0 and fg.any():
        lab, n = ndi.label(fg)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            fg = np.concatenate([[False], sizes >= min_component * sizes.max()])[lab]
    return fill_mask_holes(fg, slice_axis) if fill_holes else fg


def lesion_labels(spec: str | int | list[int] | tuple[int, ...] | None) -> tuple[int, ...] | str | None:
    """Parse ``--lesion-labels``: ``"1,2,4"`` (or a list of ints) -> ``(1, 2, 4)``; ``">0"`` -> ``">0"``; None ->
    None (masks must be binary). A ValueError names what is wrong."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise ValueError(f"lesion labels must be whole numbers such as 1,2,4 or '>0', got {spec!r}")
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, list | tuple):
        items = list(spec)
    else:
        text = str(spec).strip().replace(" ", "")
        if text in (">0", "nonzero", "any"):
            return ">0"
        items = [t for t in text.strip("[]").split(",") if t]
    try:
        out = tuple(sorted({int(t) for t in items if float(t) == int(t)}))
    except (TypeError, ValueError):
        out = ()
    if not out or len(out) != len(items):
        raise ValueError(f"lesion labels must be whole numbers such as 1,2,4 or '>0', got {spec!r}")
    return out


def select_lesion(arr: np.ndarray, labels: tuple[int, ...] | str, where: str = "") -> np.ndarray:
    """A multi-class label map -> the bool lesion mask of ``labels`` (``">0"``: every positive label)."""
    a = np.asarray(arr)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise DataError(f"{where}lesion mask holds NaN or Inf values")
    if a.dtype.kind == "f" and np.any(a != np.round(a)):
        raise DataError(f"{where}lesion mask holds non-integer values; --lesion-labels needs a label map")
    if labels == ">0":
        return a > 0
    return np.isin(a, np.asarray(labels, dtype=a.dtype if a.dtype.kind in "iu" else np.float64))
