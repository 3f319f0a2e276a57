"""Overlays a clinician reads: one figure per case with the slice that holds the most anomaly, a montage of
slices, the lesion contour when known, the calibrated mask contour, L/R and slice position, and a labelled colour bar.

Map colours are comparable across images: with the run's healthy calibration (``calibration.json``, written at the
end of ``fit``) a score is drawn by *how rare it is on healthy validation voxels*: the colour position is
``-log10`` of the share of healthy voxels scoring higher (1 = 10 %, 2 = 1 %, 3 = 0.1 %, ...), interpolated between
the recorded quantiles. Scores below the healthy 90th percentile are not coloured. Without a calibration the scale
falls back to the image's own 90th..99.9th percentile, and the colour bar says that colours are not comparable.

Volumes with a known affine are shown as axial slices of the closest RAS orientation in radiological convention
(patient's right on the screen's left, anterior at the top), with the slice position in world millimetres.

numpy only at import; matplotlib is imported when a figure is drawn. :func:`colour_lut` and
:meth:`MapScale.to_json` give the same colours to the viewer (:mod:`medanomaly.viewer`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MapScale", "SCORE_MEANING", "SliceView", "colour_lut", "composite", "grey_range", "healthy_scale", "image_scale",
           "map_scale", "render_case", "score_meaning", "slice_view",
           "write_report_cases"]

#: what the pixel score of each method is, in words (shown under the colour bar)
SCORE_MEANING: dict[str, str] = {
    "intensity": "normalised image intensity (brighter than the image's brain = higher)",
    "autoencoder": "reconstruction error of a healthy-trained autoencoder",
    "zscore": "voxel-wise z-score against the healthy training images",
    "mae": "reconstruction error of a masked autoencoder",
    "mae-pseudo": "residual classifier on masked-autoencoder reconstructions",
    "amae": "anomaly head of the adapted masked autoencoder",
    "patchcore": "distance of local features to the healthy memory bank",
    "multitask": "anomaly output of the synthetic-anomaly U-Net",
    "mim-ood": "restoration error of the masked-token model",
    "ar-restoration": "restoration error of the auto-regressive token model",
    "token-critic": "restoration error of the token-critic model",
}

_ALPHA = 0.6  # opacity of the map colours
_MAX_DRAWN = 1600  # pixels along the longer side of a drawn slice (more than the figure shows)
_MASK_COLOUR, _LESION_COLOUR = "#00e5ff", "#39ff14"  # calibrated mask (cyan), known lesion (green)


def score_meaning(method: str | None) -> str:
    """The meaning of a method's pixel score, in words."""
    if not method:
        return "anomaly score (higher = more anomalous)"
    return SCORE_MEANING.get(method, f"anomaly score of {method} (higher = more anomalous)")


def colour_lut(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours from dark red through orange and yellow to pale yellow (a cut of 'hot')."""
    u = np.linspace(0.36, 0.92, n)
    rgb = np.stack([np.clip(3 * u, 0, 1), np.clip(3 * u - 1, 0, 1), np.clip(3 * u - 2, 0, 1)], axis=1)
    return np.round(rgb * 255).astype(np.uint8)


@dataclass
class MapScale:
    """How scores become colour positions: ``level(score)`` (piecewise linear through the knots ``xp`` -> ``yp``);
    levels ``lo_level``..``hi_level`` span the colour bar, below ``lo_level`` nothing is drawn."""

    kind: str  # "healthy" (the run's calibration) or "image" (this image's own percentiles)
    xp: np.ndarray
    yp: np.ndarray
    lo_level: float
    hi_level: float
    ticks: list[tuple[float, str]]
    label: str
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def level(self, scores: Any) -> np.ndarray:
        return np.interp(np.asarray(scores, np.float64), self.xp, self.yp)

    def position(self, scores: Any) -> np.ndarray:
        """Colour position in [0, 1], NaN below the bottom of the scale (not drawn)."""
        lev = self.level(scores)
        t = (lev - self.lo_level) / (self.hi_level - self.lo_level)
        return np.where(lev >= self.lo_level, np.clip(t, 0.0, 1.0), np.nan)

    def score_at(self, level: float) -> float:
        """The score at a colour level (the inverse of :meth:`level` on its knots)."""
        return float(np.interp(level, self.yp, self.xp))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "xp": [float(v) for v in self.xp], "yp": [float(v) for v in self.yp],
                "lo_level": self.lo_level, "hi_level": self.hi_level, "ticks": [[float(a), b] for a, b in self.ticks],
                "label": self.label, "note": self.note}


def _pct(fpr: float) -> str:
    p = fpr * 100
    return f"{p:.0f} %" if p >= 1 else f"{p:.2g} %"


def healthy_scale(calibration: dict[str, Any] | None, method: str | None = None) -> MapScale | None:
    """The scale from a run's calibration record (None when there is none or it cannot make a scale)."""
    if not calibration or not isinstance(calibration.get("voxel"), dict):
        return None
    rec = calibration["voxel"]
    best: dict[float, float] = {}  # score value -> smallest fpr at which it is the (1 - fpr) quantile
    for row in rec.get("quantiles") or []:
        v, f = float(row["value"]), float(row["fpr"])
        if math.isfinite(v) and f > 0 and (v not in best or f < best[v]):
            best[v] = f
    if len(best) < 2:
        return None
    xp = np.array(sorted(best), np.float64)
    yp = -np.log10(np.array([best[v] for v in xp]))
    if np.any(np.diff(yp) <= 0):  # quantiles must rise as the rate falls; a record that does not is not a scale
        return None
    n = int(rec.get("n") or 0)
    hi = float(min(4.0, max(2.0, math.floor(math.log10(max(n, 10))) - 1.0), yp[-1]))
    lo = 1.0
    if hi <= lo or yp[0] > lo:
        return None
    scale = MapScale("healthy", xp, yp, lo, hi, [], "", meta={"n_voxels": n, "source": calibration.get("source")})
    scale.ticks = [(float(k), f"{_pct(10.0 ** -k)}  ({scale.score_at(k):.3g})") for k in range(int(lo), int(hi) + 1)]
    scale.label = f"share of healthy voxels scoring higher  (score there)\nscore: {score_meaning(method)}"
    scale.note = f"colour scale: the run's healthy validation voxels (n = {n:,})"
    return scale


def image_scale(amap: Any, foreground: Any = None, method: str | None = None) -> MapScale:
    """The fallback scale: this image's own 90th..99.9th percentile (inside ``foreground`` when given)."""
    a = np.asarray(amap, np.float64)
    vals = a[np.asarray(foreground, bool)] if foreground is not None and np.any(foreground) else a.ravel()
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(v) for v in np.percentile(vals, [90.0, 99.9])) if vals.size else (0.0, 1.0)
    hi = max(hi, lo + 1e-6)
    xp, yp = np.array([lo - (hi - lo), lo, hi]), np.array([0.0, 1.0, 2.0])  # level 1..2: lo..hi; below lo: hidden
    ticks = [(1.0 + t, f"{lo + t * (hi - lo):.3g}") for t in (0.0, 0.5, 1.0)]
    return MapScale("image", xp, yp, 1.0, 2.0, ticks, f"score (per-image scale)\nscore: {score_meaning(method)}",
                    "no healthy calibration: colours span this image's 90th-99.9th percentile and are NOT comparable "
                    "between images")


def map_scale(calibration: dict[str, Any] | None, amap: Any = None, foreground: Any = None,
              method: str | None = None) -> MapScale:
    """The healthy scale when the calibration allows one, else :func:`image_scale` of ``amap``."""
    s = healthy_scale(calibration, method)
    if s is not None:
        return s
    if amap is None:
        raise ValueError("no calibration to make a healthy scale from, and no map for a per-image scale")
    return image_scale(amap, foreground, method)


def composite(grey: np.ndarray, amap: np.ndarray, scale: MapScale, foreground: np.ndarray | None = None,
              alpha: float = _ALPHA) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1]: ``grey`` (already in [0, 1]) with the map's colours blended on top."""
    t = scale.position(amap)
    show = np.isfinite(t)
    if foreground is not None:
        show &= np.asarray(foreground, bool)
    lut = colour_lut().astype(np.float32) / 255.0
    col = lut[np.clip(np.nan_to_num(t) * (len(lut) - 1), 0, len(lut) - 1).astype(int)]
    g = np.repeat(np.clip(np.asarray(grey, np.float32), 0, 1)[..., None], 3, axis=2)
    a = (np.float32(alpha) * show).astype(np.float32)[..., None]
    return g * (1 - a) + col * a


# ----------------------------------------------------------------------------------------------- slice geometry
@dataclass
class SliceView:
    """How a 2D/3D array is shown as 2D slices: ``get(a, k)`` gives display slice ``k`` of an array of the same
    grid; ``n`` slices; ``positions`` in mm along the slice axis (None when unknown); edge ``labels``
    (left, right, top, bottom) or None; ``aspect`` for imshow (row spacing / column spacing)."""

    n: int
    get: Callable[[np.ndarray, int], np.ndarray]
    positions: list[float] | None
    labels: tuple[str, str, str, str] | None
    aspect: float
    axis_name: str
    note: str


def _letter(v: np.ndarray) -> str:
    i = int(np.argmax(np.abs(v[:3])))
    return ("R", "A", "S")[i] if v[i] > 0 else ("L", "P", "I")[i]


def slice_view(shape: Sequence[int], affine: np.ndarray | None = None) -> SliceView:
    """Display geometry of an image of ``shape``: with an ``affine`` (RAS+ mm), volumes are shown as axial slices of
    the closest RAS orientation in radiological convention, 2D images as stored with their edge letters; without,
    as stored (the last axis of a volume as the slice axis), with no L/R."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        if affine is None:
            return SliceView(1, lambda a, k: a, None, None, 1.0, "", "orientation as stored (no L/R in this file)")
        aff = np.asarray(affine, float)
        right, down = aff[:3, 1], aff[:3, 0]  # +column, +row directions in world space
        labels = (_letter(-right), _letter(right), _letter(-down), _letter(down))
        aspect = float(np.linalg.norm(down) / max(np.linalg.norm(right), 1e-12))
        return SliceView(1, lambda a, k: a, None, labels, aspect, "", "edges from the image's affine")
    if len(shape) != 3:
        raise ValueError(f"slice_view: a 2D image or 3D volume is needed, got shape {shape}")
    if affine is None:
        return SliceView(shape[2], lambda a, k: a[..., k], None, None, 1.0, "slice",
                         "slices along the last axis, orientation as stored (no affine: no L/R)")
    import nibabel as nib

    aff = np.asarray(affine, float)
    ornt = nib.orientations.io_orientation(aff)
    ras_aff = aff @ nib.orientations.inv_ornt_aff(ornt, shape)
    ras_shape = tuple(int(shape[int(ax)]) for ax in ornt[:, 0])

    def get(a: np.ndarray, k: int) -> np.ndarray:
        r = nib.orientations.apply_orientation(np.asarray(a), ornt)
        return r[::-1, ::-1, k].T  # rows: anterior -> posterior; columns: patient right -> left (radiological)

    cx, cy = (ras_shape[0] - 1) / 2, (ras_shape[1] - 1) / 2
    pos = [float((ras_aff @ np.array([cx, cy, k, 1.0]))[2]) for k in range(ras_shape[2])]
    dx, dy = (float(np.linalg.norm(ras_aff[:3, i])) for i in (0, 1))
    return SliceView(ras_shape[2], get, pos, ("R", "L", "A", "P"), dy / max(dx, 1e-12), "z",
                     "axial slices, radiological view (patient's right on the left)")


# ---------------------------------------------------------------------------------------------------- drawing
def grey_range(img: np.ndarray) -> tuple[float, float]:
    """The grey window of an image: its 0.5th..99.5th percentile (a constant background left out)."""
    v = img[np.isfinite(img)]
    inside = v[v > v.min()] if v.size and (v > v.min()).mean() > 0.02 else v  # ignore a constant background
    if not inside.size:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(inside, [0.5, 99.5]))
    return lo, max(hi, lo + 1e-6)


def _anomaly_mass(t: np.ndarray) -> float:
    return float(np.nansum(t + 0.05 * np.isfinite(t)))  # colour positions summed (+ a little per coloured pixel)


def _draw_slice(ax: Any, grey: np.ndarray, amap: np.ndarray, scale: MapScale, fg: np.ndarray | None,
                lesion: np.ndarray | None, pred: np.ndarray | None, aspect: float, lw: float) -> None:
    step = max(1, math.ceil(max(grey.shape) / _MAX_DRAWN))  # a huge radiograph is drawn every step-th pixel
    if step > 1:
        grey, amap = grey[::step, ::step], amap[::step, ::step]
        fg, lesion, pred = (None if m is None else m[::step, ::step] for m in (fg, lesion, pred))
    ax.imshow(composite(grey, amap, scale, fg), interpolation="nearest", aspect=aspect)
    for m, colour, style in ((lesion, _LESION_COLOUR, "solid"), (pred, _MASK_COLOUR, "dashed")):
        if m is not None and m.any():
            ax.contour(m.astype(float), levels=[0.5], colors=colour, linewidths=lw, linestyles=style)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _edge_labels(ax: Any, labels: tuple[str, str, str, str] | None) -> None:
    if not labels:
        return
    kw = {"transform": ax.transAxes, "color": "white", "fontsize": 11, "fontweight": "bold",
          "bbox": {"facecolor": "black", "alpha": 0.5, "pad": 1.5, "edgecolor": "none"}}
    ax.text(0.015, 0.5, labels[0], ha="left", va="center", **kw)
    ax.text(0.985, 0.5, labels[1], ha="right", va="center", **kw)
    ax.text(0.5, 0.985, labels[2], ha="center", va="top", **kw)
    ax.text(0.5, 0.015, labels[3], ha="center", va="bottom", **kw)


def _pos_text(view: SliceView, k: int) -> str:
    if view.positions is None:
        return f"{view.axis_name} {k}" if view.n > 1 else ""
    return f"z = {view.positions[k]:+.1f} mm"


def render_case(
    path: str | Path,
    image: Any,
    amap: Any,
    *,
    scale: MapScale,
    affine: np.ndarray | None = None,
    lesion: Any = None,
    foreground: Any = None,
    threshold: float | None = None,
    title: str = "",
    n_montage: int = 12,
    dpi: int = 110,
) -> Path:
    """Write the case figure to ``path`` (PNG): the slice with the most anomaly large, beside a montage of
    ``n_montage`` slices spread over the slices with content (volumes), a colour bar with the scale's units, edge
    letters and slice positions, the lesion contour (``lesion``, green) and the mask ``score > threshold`` inside
    ``foreground`` (cyan, dashed). ``image``, ``amap``, ``lesion``, ``foreground``: same 2D/3D grid; ``affine``:
    its voxel-to-world RAS+ matrix (None: shown as stored, no L/R)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, Normalize

    from medanomaly.evaluation._output import atomic_write

    img = np.asarray(image, np.float32)
    a = np.asarray(amap, np.float32)
    if img.shape != a.shape or img.ndim not in (2, 3):
        raise ValueError(f"{path}: image {img.shape} and map {a.shape} must be the same 2D/3D shape")
    les = None if lesion is None else np.asarray(lesion).astype(bool)
    fg = None if foreground is None else np.asarray(foreground).astype(bool)
    for name, m in (("lesion", les), ("foreground", fg)):
        if m is not None and m.shape != img.shape:
            raise ValueError(f"{path}: {name} {m.shape} does not match the image {img.shape}")
    pred = None
    if threshold is not None:
        pred = a > threshold
        if fg is not None:
            pred &= fg
    view = slice_view(img.shape, affine)
    glo, ghi = grey_range(img)

    def layer(arr: np.ndarray | None, k: int) -> np.ndarray | None:
        return None if arr is None else view.get(arr, k)

    def grey(k: int) -> np.ndarray:
        return (view.get(img, k) - glo) / (ghi - glo)

    # the slice with the most anomaly: colour positions summed over the slice (inside the foreground)
    mass = []
    for k in range(view.n):
        t = scale.position(view.get(a, k))
        f = layer(fg, k)
        mass.append(_anomaly_mass(np.where(f, t, np.nan) if f is not None else t))
    k_best = int(np.argmax(mass))
    montage: list[int] = []
    if view.n > 1:
        area = np.array([(view.get(fg, k) if fg is not None else view.get(img, k) > img.min()).sum() for k in range(view.n)])
        content = np.flatnonzero(area >= 0.15 * area.max()).tolist() if area.max() > 0 else []  # skip near-empty ends
        lo_k, hi_k = (content[0], content[-1]) if content else (0, view.n - 1)
        montage = sorted({int(round(v)) for v in np.linspace(lo_k, hi_k, min(n_montage, hi_k - lo_k + 1))})
        if k_best not in montage:  # the hottest slice replaces its nearest neighbour
            montage[int(np.argmin([abs(k - k_best) for k in montage]))] = k_best
            montage = sorted(set(montage))

    ncol = 4 if montage else 0
    nrow = math.ceil(len(montage) / ncol) if montage else 0
    main_w, fig_h = 5.0, 5.6
    tile = (fig_h - 0.5) / nrow - 0.22 if montage else 0.0  # square tiles under a one-line title
    ratios = [main_w, 0.2, 1.45] + ([ncol * (tile + 0.05)] if montage else [])
    fig = plt.figure(figsize=(sum(ratios), fig_h), dpi=dpi)
    gs = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.05, left=0.01, right=0.99, top=0.9, bottom=0.1)
    ax = fig.add_subplot(gs[0, 0])
    _draw_slice(ax, grey(k_best), view.get(a, k_best), scale, layer(fg, k_best), layer(les, k_best),
                layer(pred, k_best), view.aspect, 1.6)
    _edge_labels(ax, view.labels)
    head = "most anomalous slice" if view.n > 1 else "image"
    pos = _pos_text(view, k_best)
    ax.set_title(f"{head}" + (f": {pos} (slice {k_best} of {view.n})" if pos else ""), fontsize=9)
    legend = ["green: lesion (reference)" if les is not None and les.any() else ""]
    if pred is not None:
        legend.append(f"cyan dashed: mask, score > {threshold:.3g}")
    ax.set_xlabel("\n".join(x for x in [*legend, view.note, scale.note] if x), fontsize=7, wrap=True)

    cax = fig.add_subplot(gs[0, 1])
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(scale.lo_level, scale.hi_level),
                                      cmap=ListedColormap(colour_lut().astype(float) / 255.0))
    cb = fig.colorbar(sm, cax=cax)
    cb.set_ticks([t for t, _ in scale.ticks])
    cb.set_ticklabels([lab for _, lab in scale.ticks], fontsize=7)
    cb.set_label(scale.label, fontsize=7)
    if threshold is not None:
        lev = float(scale.level(threshold))
        if scale.lo_level <= lev <= scale.hi_level:
            cax.axhline(lev, color=_MASK_COLOUR, lw=2)
    fig.add_subplot(gs[0, 2]).set_axis_off()  # room for the colour bar's labels

    if montage:
        sub = gs[0, 3].subgridspec(nrow, ncol, wspace=0.05, hspace=0.25)
        for i, k in enumerate(montage):
            axm = fig.add_subplot(sub[i // ncol, i % ncol])
            _draw_slice(axm, grey(k), view.get(a, k), scale, layer(fg, k), layer(les, k), layer(pred, k), view.aspect, 0.8)
            axm.set_title(_pos_text(view, k) + (" *" if k == k_best else ""), fontsize=6.5,
                          color="#c00000" if k == k_best else "black", pad=2)
        if view.labels:
            fig.text(0.99, 0.005, f"montage: same view ({view.labels[0]} on the left); * = the large slice",
                     ha="right", va="bottom", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------------ pipeline hooks
# formats whose affine is a real patient geometry (a single DICOM file is read with a spacing-only affine: no L/R)
AFFINE_FORMATS = ("nifti", "dicom-series")


def run_scale(run: str | Path, method: str | None = None) -> MapScale | None:
    """The healthy scale of a run folder (None when it records no usable calibration)."""
    from medanomaly.run_folder import RunFolder

    return healthy_scale(RunFolder(run).read_calibration(), method)


def save_case_overlay(path: str | Path, loaded: Any, amap: np.ndarray, foreground: Any, scale: MapScale | None,
                      thresholds: dict[str, Any] | None = None, *, title: str = "", image_score: float | None = None,
                      method: str | None = None) -> Path:
    """``predict``'s overlay of one input (a :class:`medanomaly.data.io.Loaded` and its map on the same grid):
    :func:`render_case` on the healthy ``scale`` (per-image when None), the mask contour at
    ``thresholds["voxel_threshold"]`` and the image decision at ``thresholds["image_threshold"]`` in the title."""
    fg = None if foreground is None else np.asarray(foreground) > 0.5
    sc = scale if scale is not None else image_scale(amap, fg, method)
    thr = thresholds or {}
    t, it = thr.get("voxel_threshold"), thr.get("image_threshold")
    text = title
    if image_score is not None:
        text += f"   image score {image_score:.4g}"
        if it is not None:
            text += f" ({'ABNORMAL' if image_score > it else 'normal'} at {str(thr.get('image_rule')).split(' (')[0]})"
    affine = loaded.affine if loaded.meta.get("format") in AFFINE_FORMATS else None
    return render_case(path, loaded.array, amap, scale=sc, affine=affine, foreground=fg, threshold=t, title=text.strip())


# ------------------------------------------------------------------------------------- report cases for the viewer
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "case"


def _short_label(label: str) -> str:
    """A report pick's label as a short id part: "best", "normal2", "normal-median", "highest-score" ..."""
    m = re.match(r"normal, score rank (\d+)", label)
    if m:
        return f"normal{m.group(1)}"
    if label.startswith("normal, median"):
        return "normal-median"
    return label.split(",")[0].strip().replace(" ", "-")


def _write_view_json(path: Path, rec: dict[str, Any]) -> None:
    import json

    from medanomaly.evaluation._output import atomic_write, json_safe

    atomic_write(path, json.dumps(json_safe(rec), indent=1) + "\n")


def write_report_cases(out: Path, picks: list[tuple[str, int, str]], images: np.ndarray, scores: np.ndarray,
                       masks: np.ndarray | None, foreground: np.ndarray | None, case_ids: list[Any] | None,
                       img_scores: np.ndarray | None, *, calibration: dict[str, Any] | None = None,
                       threshold: float | None = None, method: str | None = None) -> list[dict[str, Any]]:
    """The report's viewer cases: ``cases/<id>.npz`` (image, map, lesion, foreground on the evaluated grid), a
    full-resolution overlay ``cases/<id>.png`` (:func:`medanomaly.evaluation.overlays.render_case`) and
    ``cases/view.json``. Returns the case entries (with ``png``, the overlay's path)."""
    folder = Path(out) / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    healthy = healthy_scale(calibration, method)
    entries, seen = [], set()
    for label, i, caption in picks:
        name = str(case_ids[i]) if case_ids is not None else f"image {i}"
        cid = _slug(f"{_short_label(label)}-{name}")
        if cid in seen:
            continue
        seen.add(cid)
        fg = None if foreground is None else np.asarray(foreground[i], bool)
        les = None if masks is None else np.asarray(masks[i], bool)
        sc = healthy if healthy is not None else image_scale(scores[i], fg, method)
        png = render_case(folder / f"{cid}.png", images[i], scores[i], scale=sc, lesion=les, foreground=fg,
                          threshold=threshold, title=f"{label}: {caption}")
        arrays = {"image": np.asarray(images[i], np.float32), "map": np.asarray(scores[i], np.float32)}
        if fg is not None:
            arrays["foreground"] = fg
        if les is not None:
            arrays["lesion"] = les
        np.savez_compressed(folder / f"{cid}.npz", **arrays)
        entries.append({"id": cid, "title": f"{label}: {caption}", "npz": f"{cid}.npz", "png": str(png),
                        "image_score": None if img_scores is None else float(img_scores[i]), "threshold": threshold,
                        "threshold_rule": "calibrated (fpr on healthy validation voxels)" if threshold is not None else None,
                        "scale": sc.to_json(), "method": method, "has_affine": False})
    _drop_stale_cases(folder, {e["id"] for e in entries})
    _write_view_json(folder / "view.json", {"version": 1, "cases": [
        {k: v for k, v in e.items() if k != "png"} for e in entries]})
    return entries


def _drop_stale_cases(folder: Path, keep: set[str]) -> None:
    """Remove the files of the cases an earlier report listed in ``folder/view.json`` and this one does not."""
    import json

    try:
        old = json.loads((folder / "view.json").read_text()).get("cases") or []
    except (OSError, ValueError, AttributeError):
        return
    for c in old:
        cid = str(c.get("id", "")) if isinstance(c, dict) else ""
        if cid and cid not in keep and cid == _slug(cid):  # only names this module made
            for suffix in (".npz", ".png"):
                (folder / f"{cid}{suffix}").unlink(missing_ok=True)
