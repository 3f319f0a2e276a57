"""Synthetic anomaly tasks: pure, seeded, N-D functions ``task(image, foreground, rng, **params) -> SynthResult``.

Contract of every task (tested with hypothesis):

- ``image``: (*S) or (C, *S) array/tensor with 2 or 3 spatial dims; ``foreground``: (*S) or (1, *S) bool or ``None``
  (everything); ``rng``: ``numpy.random.Generator`` or an int seed.
- returns ``SynthResult(image, label, mask, info)``: ``image`` float32 with the input's shape, within the input's
  intensity range ``[min, max]``; ``label`` float32 in [0, 1] and ``mask`` bool, both (*S) for (*S) input and
  (1, *S) for (C, *S) input; ``label`` is 0 outside ``mask``.
- inputs are never modified; the same seed gives the same result.

A 3-D input is read as (C, H, W) when its first axis has fewer than 3 entries (a volume needs >= 3 slices), when
``foreground`` has shape (1, H, W) or (H, W) with a different leading size, or when ``channels=True`` is passed;
otherwise a 3-D array is a volume (D, H, W).

Tasks that need a second image (``intra-blend``, ``inter-blend``, ``fpi``) take it as ``source_image`` (+ optional
``source_foreground``) or as ``source_sampler(rng) -> image | (image, foreground)``; it may have another size but
must have the same number of spatial dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medanomaly.synth.labelling import get_labeller, intensity_change
from medanomaly.synth.poisson import poisson_blend
from medanomaly.synth.shapes import Shape, anomaly_count, make_shape, mtmlw_sizes, random_rotation, random_shape

__all__ = ["SynthResult", "get_task", "list_tasks", "task_defaults", "TASKS", "anatomy_mask", "prepare_input"]


@dataclass
class SynthResult:
    """A synthetic anomaly: the new ``image``, its per-voxel ``label`` in [0, 1] and the anomaly ``mask``."""

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        """Whether the sample counts as anomalous (``info['positive']`` when the task sets it, else any label > 0)."""
        return bool(self.info.get("positive", bool(self.label.max() > 0) if self.label.size else False))


@dataclass
class _Task:
    name: str
    fn: Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]]
    defaults: dict[str, Any]
    doc: str


TASKS: dict[str, _Task] = {}

_COMMON = {"labeller": "flipped-gaussian", "labeller_params": None, "p_more": 0.5, "max_count": 4,
           "size_range": (0.06, 0.8), "min_inside": 0.5, "channels": None}


def _register(name: str, doc: str, **defaults: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        TASKS[name] = _Task(name, fn, {**_COMMON, **defaults}, doc)
        return fn

    return deco


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return list(TASKS)


def task_defaults(name: str) -> dict[str, Any]:
    """All parameters of a task with their defaults."""
    return dict(_lookup(name).defaults)


def _lookup(name: str) -> _Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {list_tasks()}") from None


def prepare_input(image: Any, foreground: Any, channels: bool | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate and copy: returns (image (C, *S) float32, foreground (*S) bool, whether the input had channels)."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    if foreground is not None and hasattr(foreground, "detach"):
        foreground = foreground.detach().cpu().numpy()
    img = np.array(image, dtype=np.float32, copy=True)
    if img.size == 0:
        raise ValueError("image is empty")
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or Inf values")
    fg = None if foreground is None else np.asarray(foreground).astype(bool)
    if channels is None:
        if img.ndim == 2:
            channels = False
        elif img.ndim == 4:
            channels = True
        elif img.ndim == 3:
            channels = img.shape[0] < 3 or (fg is not None and fg.shape != img.shape
                                             and fg.shape in ((1, *img.shape[1:]), img.shape[1:]))
        else:
            raise ValueError(f"image must be (H, W), (C, H, W), (D, H, W) or (C, D, H, W); got shape {img.shape}")
    if not channels:
        img = img[None]
    spatial = img.shape[1:]
    if len(spatial) not in (2, 3):
        raise ValueError(f"synthetic tasks support 2 or 3 spatial dims; got image shape {tuple(np.shape(image))}")
    if min(spatial) < 3:
        raise ValueError(f"image spatial size {spatial} too small (need >= 3 voxels per axis)")
    if fg is None:
        fg = np.ones(spatial, dtype=bool)
    elif fg.shape == (1, *spatial):
        fg = fg[0]
    if fg.shape != spatial:
        raise ValueError(f"foreground shape {fg.shape} does not match image spatial shape {spatial}")
    return img, np.array(fg, dtype=bool), bool(channels)


def get_task(name: str) -> Callable[..., SynthResult]:
    """The task ``name`` as ``f(image, foreground=None, rng=None, **params) -> SynthResult`` (unknown params raise)."""
    spec = _lookup(name)

    def task(image: Any, foreground: Any = None, rng: np.random.Generator | int | None = None, **params: Any) -> SynthResult:
        unknown = set(params) - set(spec.defaults)
        if unknown:
            raise ValueError(f"task {name!r}: unknown parameters {sorted(unknown)}; known: {sorted(spec.defaults)}")
        p = {**spec.defaults, **params}
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        img, fg, channels = prepare_input(image, foreground, p["channels"])
        lo, hi = float(img.min()), float(img.max())
        out, mask, info = spec.fn(img, fg, gen, p, lo, hi)  # tasks never modify ``img`` (they work on copies)
        np.clip(out, lo, hi, out=out)
        out = out.astype(np.float32, copy=False)
        own = info.pop("label", None)
        label = np.zeros(mask.shape, dtype=np.float32)
        box = _bbox(mask)
        if box is not None:  # labels are 0 outside the mask: compute them on its bounding box only
            sub = (slice(None), *box)
            if own is not None and p["labeller"] == "factor":  # the task's own label (FPI: the interpolation factor)
                lab = np.where(mask[box], own[box], 0.0)
            else:
                d = intensity_change(img[sub], out[sub], channels=True)[0]
                lab = get_labeller(p["labeller"])(d, mask[box], **(p["labeller_params"] or {}))
            label[box] = np.clip(lab, 0.0, 1.0)
        info.setdefault("task", name)
        if not channels:
            out = out[0]
        else:
            label, mask = label[None], mask[None]
        return SynthResult(out, label, mask.astype(bool), info)

    task.__name__ = name.replace("-", "_")
    task.__doc__ = spec.doc
    return task


# ------------------------------------------------------------------------------------------------ helpers
def _shapes(img: np.ndarray, fg: np.ndarray, rng: np.random.Generator, p: dict[str, Any], kind: str | None = None) -> list[Shape]:
    n = anomaly_count(rng, p["p_more"], p["max_count"])
    fg_index = np.flatnonzero(fg)
    return [random_shape(img.shape[1:], rng, fg, kind=kind, size_range=p["size_range"], min_inside=p["min_inside"],
                         fg_index=fg_index) for _ in range(n)]


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a bool array (``None`` when empty)."""
    if not mask.any():
        return None
    box = []
    for d in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != d)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _grow(box: tuple[slice, ...], spatial: tuple[int, ...], by: int = 1) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(box, spatial, strict=False))


def _box_points(box: tuple[slice, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box], indexing="ij")
    return np.stack(grids, axis=-1)


def _sample(img: np.ndarray, coords: np.ndarray, order: int = 1, mode: str = "nearest") -> np.ndarray:
    """Sample every channel of ``img`` (C, *S) at ``coords`` (..., D) -> (C, ...)."""
    c = np.moveaxis(coords, -1, 0)
    return np.stack([ndimage.map_coordinates(ch, c, order=order, mode=mode) for ch in img]).astype(np.float32)


def _get_source(p: dict[str, Any], rng: np.random.Generator, n_channels: int, ndim: int) -> tuple[np.ndarray, np.ndarray] | None:
    src: Any = None
    sfg: Any = p.get("source_foreground")
    if p.get("source_sampler") is not None:
        got = p["source_sampler"](rng)
        if isinstance(got, dict):
            src, sfg = got["image"], got.get("foreground")
        elif isinstance(got, tuple):
            src, sfg = got
        else:
            src, sfg = got, None
    elif p.get("source_image") is not None:
        src = p["source_image"]
    if src is None:
        return None
    if hasattr(src, "detach"):
        src = src.detach().cpu().numpy()
    if sfg is not None and hasattr(sfg, "detach"):
        sfg = sfg.detach().cpu().numpy()
    src = np.asarray(src, dtype=np.float32)
    if src.ndim == ndim:
        src = src[None]
    if src.ndim != ndim + 1:
        raise ValueError(f"source image has shape {src.shape}; expected {ndim} spatial dims (optionally with channels)")
    if not np.isfinite(src).all():
        raise ValueError("source image contains NaN or Inf values")
    if src.shape[0] != n_channels:
        src = np.repeat(src.mean(axis=0, keepdims=True), n_channels, axis=0)
    if sfg is None:
        sfg = np.ones(src.shape[1:], dtype=bool)
    sfg = np.asarray(sfg, dtype=bool)
    if sfg.shape == (1, *src.shape[1:]):
        sfg = sfg[0]
    if sfg.shape != src.shape[1:]:
        raise ValueError(f"source foreground shape {sfg.shape} does not match source image {src.shape}")
    return src, sfg


def _random_voxel(fg: np.ndarray, rng: np.random.Generator, idx: np.ndarray | None = None) -> np.ndarray:
    idx = np.flatnonzero(fg) if idx is None else idx
    if idx.size == 0:
        return np.array([rng.uniform(0, s - 1) for s in fg.shape])
    return np.array(np.unravel_index(idx[rng.integers(idx.size)], fg.shape), dtype=np.float64)


# ------------------------------------------------------------------------------------------- MTMLW tasks
def _blend(img: np.ndarray, fg: np.ndarray, rng: np.random.Generator, p: dict[str, Any], lo: float, hi: float,
           need_source: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    spatial = img.shape[1:]
    total = np.zeros(spatial, dtype=bool)
    out = img
    n_src = 0
    for shape in _shapes(img, fg, rng, p):
        got = _get_source(p, rng, img.shape[0], len(spatial))
        if got is None:
            if need_source:
                raise ValueError("inter-blend needs a second data set: pass source_image=... or source_sampler=...")
            got = (img, fg)  # intra-blend without a source: a patch from elsewhere in the same image
        src, sfg = got
        n_src += 1
        # the crop holds the box and its boundary ring, with room to grow the box to fast DST sizes
        margin = 1 if p["poisson_box"] == "tight" else 2 + max(s.stop - s.start for s in shape.box) // 10
        ext = _grow(shape.box, spatial, margin)
        pts = _box_points(ext)
        c_src = _random_voxel(sfg, rng)
        # patch size proportional to the source's size (1 for sources of the same data set)
        ratio = float(np.exp(np.mean(np.log(np.asarray(src.shape[1:], float) / np.asarray(spatial, float)))))
        scale = rng.uniform(*p["scale_range"]) * ratio
        rot = random_rotation(len(spatial), rng)
        q = c_src + scale * (pts - shape.centre) @ rot.T
        patch = _sample(src, q, order=1, mode="reflect")
        if p["match_range"] and src is not img:  # map the source's intensity range onto the target's
            s_lo, s_hi = float(src.min()), float(src.max())
            patch = (patch - s_lo) * ((hi - lo) / max(s_hi - s_lo, 1e-8)) + lo
        sub_mask = shape.mask[ext]
        out_ext = poisson_blend(out[(slice(None), *ext)], patch, sub_mask, mix_gradients=p["mix_gradients"],
                                box=p["poisson_box"])
        out = out.copy() if out is img else out
        out[(slice(None), *ext)] = out_ext
        total |= shape.mask
    return out, total, {"n_anomalies": n_src}


_BLEND = {"source_image": None, "source_foreground": None, "source_sampler": None, "scale_range": (0.75, 1.33),
          "mix_gradients": False, "match_range": True, "poisson_box": "fast"}


@_register("intra-blend", "Patch from another image of the same data set (randomly rotated/scaled), Poisson-blended.",
           **_BLEND)
def _intra_blend(img, fg, rng, p, lo, hi):
    return _blend(img, fg, rng, p, lo, hi, need_source=False)


@_register("inter-blend", "Patch from an image of another data set (source_image/source_sampler), Poisson-blended.",
           **_BLEND)
def _inter_blend(img, fg, rng, p, lo, hi):
    return _blend(img, fg, rng, p, lo, hi, need_source=True)


def ray_fraction(shape: Shape, u_c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """For rays from local point ``u_c`` (inside) through ``u_c + w``: the fraction of the way to the shape border."""
    if shape.kind == "ellipse":
        a = (w * w).sum(-1)
        b = (w * u_c).sum(-1)
        c = float((u_c * u_c).sum()) - 1.0
        t = (-b + np.sqrt(np.maximum(b * b - a * c, 0.0))) / np.maximum(a, 1e-300)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            tt = np.where(w > 0, (1.0 - u_c) / w, np.where(w < 0, (-1.0 - u_c) / w, np.inf))
        t = tt.min(-1)
    with np.errstate(divide="ignore"):
        r = np.where(np.isfinite(t) & (t > 0), 1.0 / t, 0.0)
    return np.clip(r, 0.0, 1.0)


def _deform(img: np.ndarray, fg: np.ndarray, rng: np.random.Generator, p: dict[str, Any], sink: bool) -> tuple:
    spatial = img.shape[1:]
    total = np.zeros(spatial, dtype=bool)
    out = img.copy()
    shapes = _shapes(img, fg, rng, p)
    for shape in shapes:
        f = rng.uniform(*p["factor_range"])
        if f <= 1:
            raise ValueError(f"deformation exponent must be > 1, got factor_range {p['factor_range']}")
        direction = rng.standard_normal(len(spatial))
        direction /= np.linalg.norm(direction) + 1e-12
        u_c = direction * rng.uniform(0, p["centre_spread"])
        c = shape.centre + shape.matrix @ u_c
        idx = shape.indices()
        pts = np.stack(idx, axis=-1).astype(np.float64)
        w = shape.local(pts) - u_c
        r = ray_fraction(shape, u_c, w)
        if sink:
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.where(r > 0, (1.0 - (1.0 - r) ** f) / r, f)
        else:
            k = r ** (f - 1.0)
        q = c + (pts - c) * k[:, None]
        vals = _sample(out, q, order=1, mode="nearest")
        out[(slice(None), *idx)] = vals
        total |= shape.mask
    return out, total, {"n_anomalies": len(shapes)}


_DEFORM = {"factor_range": (1.5, 4.0), "centre_spread": 0.5}


@_register("sink", "Radial re-mapping pulling intensities towards a centre (MTMLW eq. 1), exponent f > 1.", **_DEFORM)
def _sink(img, fg, rng, p, lo, hi):
    return _deform(img, fg, rng, p, sink=True)


@_register("source", "Radial re-mapping pushing intensities away from a centre (MTMLW eq. 2), exponent f > 1.", **_DEFORM)
def _source(img, fg, rng, p, lo, hi):
    return _deform(img, fg, rng, p, sink=False)


@_register("smooth-intensity", "Add or subtract an intensity over the shape, damped over a random margin at its border.",
           intensity_range=(0.1, 0.4), margin_range=(0.05, 1.0))
def _smooth_intensity(img, fg, rng, p, lo, hi):
    spatial = img.shape[1:]
    total = np.zeros(spatial, dtype=bool)
    out = img.copy()
    shapes = _shapes(img, fg, rng, p)
    for shape in shapes:
        ext = _grow(shape.box, spatial)
        sub = shape.mask[ext]
        dist = ndimage.distance_transform_edt(np.pad(sub, 1))[tuple(slice(1, -1) for _ in spatial)]
        d_s = rng.uniform(*p["margin_range"]) * max(float(dist.max()), 1.0)
        weight = np.clip(dist / d_s, 0.0, 1.0) * sub
        amp = rng.uniform(*p["intensity_range"]) * (hi - lo) * rng.choice([-1.0, 1.0])
        out[(slice(None), *ext)] += (amp * weight).astype(np.float32)
        np.clip(out, lo, hi, out=out)
        total |= shape.mask
    return out, total, {"n_anomalies": len(shapes)}


# ------------------------------------------------------------------------------- CutPaste, FPI, AnatPaste
def _cut_shape(spatial: tuple[int, ...], rng: np.random.Generator, centre: np.ndarray, scar: bool, p: dict[str, Any]) -> Shape:
    nd = len(spatial)
    if scar:
        m = min(spatial)
        width = max(rng.uniform(*p["scar_width"]) * m, 1.0)
        length = max(rng.uniform(*p["scar_length"]) * m, 2.0)
        half = np.full(nd, width / 2)
        half[rng.integers(nd)] = length / 2
        matrix = random_rotation(nd, rng) @ np.diag(half)
    else:
        vol = rng.uniform(*p["area_range"]) * float(np.prod(spatial))
        log_ar = rng.uniform(np.log(p["aspect_range"][0]), np.log(p["aspect_range"][1]), size=nd)
        log_ar -= log_ar.mean()
        sides = np.minimum(vol ** (1.0 / nd) * np.exp(log_ar), np.asarray(spatial) * 0.9)
        matrix = np.diag(np.maximum(sides / 2, 1.0))
    return make_shape(spatial, "box", centre, matrix)


def _paste(img: np.ndarray, fg: np.ndarray, rng: np.random.Generator, p: dict[str, Any], scar: bool,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    spatial = img.shape[1:]
    total = np.zeros(spatial, dtype=bool)
    out = img.copy()
    n = anomaly_count(rng, p["p_more"], p["max_count"])
    lo, hi = float(img.min()), float(img.max())
    fg_index = np.flatnonzero(fg)
    for _ in range(n):
        shape = None
        for _try in range(20):
            shape = _cut_shape(spatial, rng, _random_voxel(fg, rng, fg_index), scar, p)
            if shape.inside_fraction(fg) >= p["min_inside"]:
                break
        assert shape is not None
        half = np.abs(shape.matrix).sum(1)
        src_c = np.array([rng.uniform(min(h, s - 1 - h), max(h, s - 1 - h)) for h, s in zip(half, spatial, strict=False)])
        shift = np.round(src_c - shape.centre)
        idx = shape.indices()
        pts = np.stack(idx, axis=-1).astype(np.float64)
        vals = _sample(img, pts + shift, order=0, mode="reflect")
        if p["jitter"] > 0:
            vals = vals * rng.uniform(1 - p["jitter"], 1 + p["jitter"]) + rng.uniform(-p["jitter"], p["jitter"]) * (hi - lo)
        m = shape.mask if allowed is None else shape.mask & allowed
        sel = m[idx]
        out[(slice(None), *(i[sel] for i in idx))] = vals[:, sel]
        total |= m
    return out, total, n


_CUT = {"labeller": "binary", "area_range": (0.02, 0.15), "aspect_range": (0.3, 3.3), "scar_width": (0.008, 0.0625),
        "scar_length": (0.04, 0.1), "jitter": 0.1}


@_register("cutpaste", "CutPaste: a box cut from the image (brightness-jittered) pasted elsewhere on the foreground.",
           **{**_CUT, "max_count": 1})
def _cutpaste(img, fg, rng, p, lo, hi):
    out, mask, n = _paste(img, fg, rng, p, scar=False)
    return out, mask, {"n_anomalies": n}


@_register("cutpaste-scar", "CutPaste-scar: a thin rotated strip cut from the image pasted elsewhere on the foreground.",
           **{**_CUT, "max_count": 1})
def _cutpaste_scar(img, fg, rng, p, lo, hi):
    out, mask, n = _paste(img, fg, rng, p, scar=True)
    return out, mask, {"n_anomalies": n}


@_register("fpi", "Foreign patch interpolation: (1-a) x + a x' in a box, label = a ~ U(0,1) (source = another image).",
           labeller="factor", source_image=None, source_foreground=None, source_sampler=None, max_count=1,
           alpha_range=(0.0, 1.0))
def _fpi(img, fg, rng, p, lo, hi):
    spatial = img.shape[1:]
    out = img.copy()
    total = np.zeros(spatial, dtype=bool)
    label = np.zeros(spatial, dtype=np.float32)
    n = anomaly_count(rng, p["p_more"], p["max_count"])
    for _ in range(n):
        got = _get_source(p, rng, img.shape[0], len(spatial))
        if got is None:  # no second image given: the image mirrored along a random axis
            src = np.flip(img, axis=1 + int(rng.integers(len(spatial))))
        else:
            src = got[0]
            if src.shape[1:] != spatial:
                zoom = [a / b for a, b in zip(spatial, src.shape[1:], strict=True)]
                src = np.stack([ndimage.zoom(ch, zoom, order=1) for ch in src])
        half = np.maximum(mtmlw_sizes(spatial, rng, *p["size_range"]) / 2, 1.0)
        shape = make_shape(spatial, "box", _random_voxel(fg, rng), np.diag(half))
        alpha = rng.uniform(*p["alpha_range"])
        sl = (slice(None), *shape.box)
        m = shape.mask[shape.box]
        out[sl] = np.where(m, (1 - alpha) * out[sl] + alpha * src[sl], out[sl])
        label[shape.box] = np.where(m, alpha, label[shape.box])
        total |= shape.mask
    return out, total, {"n_anomalies": n, "label": label}


def anatomy_mask(image: Any, kind: str = "brain", foreground: Any = None) -> np.ndarray:
    """Unsupervised anatomical mask of a 2D/3D image (*S) or (1, *S).

    ``brain``: the given foreground if any, else voxels above 5% of the intensity range, holes filled, largest
    component. ``cxr``: the lungs as dark regions inside the body: Otsu threshold of the smoothed image, dark
    components that do not touch the image border, the two largest kept, holes filled and opened. Falls back to the
    central half of the image when nothing is found. Returns a bool array (*S).
    """
    img = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float64)
    if img.ndim in (3, 4) and img.shape[0] == 1:
        img = img[0]
    if not np.isfinite(img).all():
        raise ValueError("anatomy_mask: image contains NaN or Inf")
    lo, hi = img.min(), img.max()
    x = (img - lo) / max(hi - lo, 1e-8)
    if kind == "brain":
        if foreground is not None:
            fg = np.asarray(foreground, dtype=bool).reshape(img.shape)
            if fg.any() and not fg.all():
                return fg.copy()
        m = ndimage.binary_fill_holes(x > 0.05)
    elif kind == "cxr":
        xs = ndimage.gaussian_filter(x, sigma=max(1.0, min(x.shape) / 100))
        from medanomaly.data.masks import otsu_threshold  # here: importing medanomaly.synth stays free of data/

        t = otsu_threshold(xs, bins=128)
        dark = xs < t
        lab, n = ndimage.label(dark)
        border = np.unique(np.concatenate([np.ravel(np.take(lab, [0, -1], axis=a)) for a in range(lab.ndim)]))
        sizes = ndimage.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        keep = [i + 1 for i in np.argsort(sizes)[::-1] if (i + 1) not in border][:2]
        m = np.isin(lab, keep)
        m = ndimage.binary_fill_holes(m)
        m = ndimage.binary_opening(m, iterations=max(1, min(x.shape) // 64))
    else:
        raise ValueError(f"anatomy_mask: unknown kind {kind!r}; choose 'brain' or 'cxr'")
    if m.any():
        lab, n = ndimage.label(m)
        if kind == "brain" and n > 1:
            sizes = ndimage.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1))
            m = lab == (int(np.argmax(sizes)) + 1)
        return m
    m = np.zeros(img.shape, dtype=bool)
    m[tuple(slice(s // 4, s - s // 4) for s in img.shape)] = True
    return m


@_register("anatpaste", "AnatPaste: a CutPaste patch kept only inside an unsupervised anatomical mask (lungs / brain).",
           **{**_CUT, "max_count": 1, "anatomy": "brain", "patch": "random"})
def _anatpaste(img, fg, rng, p, lo, hi):
    anat = anatomy_mask(img.mean(axis=0), p["anatomy"], foreground=fg)
    scar = {"normal": False, "scar": True}.get(p["patch"], None)
    if scar is None:
        if p["patch"] != "random":
            raise ValueError(f"anatpaste: patch must be 'normal', 'scar' or 'random', got {p['patch']!r}")
        scar = bool(rng.random() < 0.5)
    out, mask, n = _paste(img, anat, rng, p, scar=scar, allowed=anat)
    return out, mask, {"n_anomalies": n}


@_register("pseudo-abnormal", "Georgescu's module: 1-9 boxes whose intensity is multiplied by U(0,1); positive when a "
           "box changed the foreground (label = changed foreground voxels).",
           labeller="binary", n_boxes=(1, 9), box_size=(0.05, 0.3))
def _pseudo_abnormal(img, fg, rng, p, lo, hi):
    spatial = img.shape[1:]
    out = img.copy()
    n = int(rng.integers(p["n_boxes"][0], p["n_boxes"][1] + 1))
    changed = np.zeros(spatial, dtype=bool)
    for _ in range(n):
        side = np.maximum(np.round(rng.uniform(*p["box_size"], size=len(spatial)) * np.asarray(spatial)), 1).astype(int)
        start = [int(rng.integers(0, s - w + 1)) for s, w in zip(spatial, side, strict=False)]
        sl = tuple(slice(a, a + w) for a, w in zip(start, side, strict=False))
        factor = rng.uniform(0.0, 1.0)
        region = out[(slice(None), *sl)]
        new = lo + (region - lo) * factor
        changed[sl] |= (np.abs(new - region) > 0).any(axis=0)
        out[(slice(None), *sl)] = new
    mask = changed & fg
    return out, mask, {"n_anomalies": n, "positive": bool(mask.any())}
