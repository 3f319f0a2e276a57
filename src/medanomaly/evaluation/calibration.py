"""Thresholds calibrated on healthy data only: score quantiles, threshold rules, metrics at a threshold, lesion
components.

- :class:`QuantileSketch` streams scores (voxel or image) and keeps the exact top ``k`` values plus a uniform random
  sample of ``k`` values (bottom-k of random keys): a quantile whose upper tail holds fewer than ``k`` values is
  exact, others come from the sample (recorded as ``exact: false``). Quantiles use numpy's ``method="higher"``, so
  the fraction of the calibration scores *above* a threshold at ``fpr=p`` is at most ``p``.
- The record (:meth:`QuantileSketch.record`) holds the quantiles at ``1 - fpr`` for ``fpr`` on :data:`FPR_GRID`
  (``m * 10^-k``, m = 1..9, k = 1..6), min/max/mean and the count; a few KB as JSON.
- A rule (:func:`parse_threshold`): ``fpr=P`` (voxel threshold = the ``1-P`` quantile of healthy foreground voxel
  scores), ``image-fpr=P`` (an image is abnormal when its score exceeds the ``1-P`` quantile of healthy image
  scores), a plain number (voxel threshold), or a comma-separated pair of one voxel and one image rule.
- Decisions are strict: a voxel (image) is positive when its score is ``> threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FPR_GRID",
    "QuantileSketch",
    "ThresholdRule",
    "components_table",
    "decision_metrics",
    "parse_threshold",
    "resolve_threshold",
    "voxel_metrics_at",
]

#: the false-positive rates whose (1 - fpr) quantiles a calibration record stores
FPR_GRID: tuple[float, ...] = tuple(sorted(float(f"{m}e-{k}") for k in range(1, 7) for m in range(1, 10)))
CALIBRATION_VERSION = 1


class QuantileSketch:
    """Streaming quantiles of a score stream: exact top-``k`` and a uniform random sample of ``k`` values."""

    def __init__(self, k: int = 200_000, seed: int = 0) -> None:
        self.k = int(k)
        self.n = 0
        self.total = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self._top = np.empty(0, np.float64)
        self._sample = np.empty(0, np.float64)
        self._keys = np.empty(0, np.float64)
        self._rng = np.random.default_rng(seed)

    def update(self, values: Any) -> None:
        v = np.asarray(values, np.float64).ravel()
        if v.size == 0:
            return
        if not np.isfinite(v).all():
            raise ValueError(f"calibration scores contain {int((~np.isfinite(v)).sum())} non-finite value(s)")
        self.n += v.size
        self.total += float(v.sum())
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        top = np.concatenate([self._top, v])
        self._top = top if top.size <= self.k else np.partition(top, top.size - self.k)[top.size - self.k:]
        keys = np.concatenate([self._keys, self._rng.random(v.size)])
        sample = np.concatenate([self._sample, v])
        if keys.size > self.k:
            idx = np.argpartition(keys, self.k)[: self.k]
            keys, sample = keys[idx], sample[idx]
        self._keys, self._sample = keys, sample

    def quantile(self, q: float) -> tuple[float, bool]:
        """(the ``q`` quantile, numpy ``method="higher"``; whether it is exact)."""
        if self.n == 0:
            raise ValueError("no scores to take a quantile of")
        j = math.ceil(q * (self.n - 1) - 1e-9)  # numpy "higher": index ceil(q (n-1))
        tail = self.n - 1 - j
        if tail < self._top.size:
            return float(np.sort(self._top)[self._top.size - 1 - tail]), True
        return float(np.quantile(self._sample, q, method="higher")), False

    def record(self) -> dict[str, Any]:
        """The JSON-friendly summary: count, min/max/mean and the quantile at ``1 - fpr`` for every grid fpr."""
        rows = []
        for f in FPR_GRID:
            value, exact = self.quantile(1.0 - f)
            rows.append({"fpr": f, "value": value, "exact": exact})
        return {"n": int(self.n), "min": self.lo, "max": self.hi, "mean": self.total / self.n, "quantiles": rows}


def quantile_from_record(rec: dict[str, Any], fpr: float) -> tuple[float, str]:
    """The ``1 - fpr`` quantile from a record: the grid value, or log-linear interpolation between grid points
    (clamped at the grid's ends). Returns (value, note)."""
    rows = sorted(rec["quantiles"], key=lambda r: r["fpr"])
    fs = np.array([r["fpr"] for r in rows], float)
    vs = np.array([r["value"] for r in rows], float)
    hit = np.flatnonzero(np.isclose(fs, fpr, rtol=1e-9, atol=0))
    if hit.size:
        return float(vs[hit[0]]), "exact grid quantile" if rows[hit[0]].get("exact", True) else "sampled quantile"
    if fpr <= fs[0]:
        return float(vs[0]), f"fpr below the stored grid: the {fs[0]:g} quantile"
    if fpr >= fs[-1]:
        return float(vs[-1]), f"fpr above the stored grid: the {fs[-1]:g} quantile"
    return float(np.interp(math.log(fpr), np.log(fs), vs)), "interpolated between grid quantiles"


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed ``--threshold``: at most one voxel rule (``fpr`` or ``value``) and at most one image rule."""

    spec: str
    fpr: float | None = None
    value: float | None = None
    image_fpr: float | None = None

    @property
    def has_voxel(self) -> bool:
        return self.fpr is not None or self.value is not None


def _rate(text: str, key: str, spec: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise ValueError(f"--threshold {spec!r}: {key}= needs a number in (0, 1), got {text!r}") from None
    if not (0.0 < p < 1.0):
        raise ValueError(f"--threshold {spec!r}: {key}= must be in (0, 1) (a false-positive rate), got {text}")
    return p


def parse_threshold(spec: str) -> ThresholdRule:
    """``"fpr=0.01"``, ``"image-fpr=0.05"``, ``"0.37"`` or ``"fpr=0.01,image-fpr=0.05"`` -> a rule; else a ValueError."""
    fpr = value = image_fpr = None
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError("--threshold is empty; give fpr=P, image-fpr=P or a number")
    for part in parts:
        key, sep, rest = part.partition("=")
        key = key.strip().lower()
        if sep and key == "fpr" and fpr is None and value is None:
            fpr = _rate(rest.strip(), "fpr", spec)
        elif sep and key == "image-fpr" and image_fpr is None:
            image_fpr = _rate(rest.strip(), "image-fpr", spec)
        elif not sep and fpr is None and value is None:
            try:
                value = float(part)
            except ValueError:
                raise ValueError(f"--threshold {spec!r}: {part!r} is not fpr=P, image-fpr=P or a number") from None
            if not math.isfinite(value):
                raise ValueError(f"--threshold {spec!r}: the threshold must be finite")
        else:
            raise ValueError(f"--threshold {spec!r}: {part!r} is not fpr=P, image-fpr=P or a number (at most one voxel "
                             "and one image rule)")
    return ThresholdRule(str(spec), fpr, value, image_fpr)


def resolve_threshold(rule: ThresholdRule, calibration: dict[str, Any] | None, where: str = "the run") -> dict[str, Any]:
    """The numbers of a rule: ``voxel_threshold``/``voxel_rule`` and ``image_threshold``/``image_rule`` (None when
    the rule has no such part). A calibrated rule without a calibration record is a ValueError saying what to do."""
    out: dict[str, Any] = {"voxel_threshold": None, "voxel_rule": None, "image_threshold": None, "image_rule": None}
    needs = rule.fpr is not None or rule.image_fpr is not None
    if needs and not calibration:
        raise ValueError(f"{where} has no calibration (trained before calibration was recorded?): re-train it, or give "
                         "--threshold as a number")
    if rule.value is not None:
        out["voxel_threshold"], out["voxel_rule"] = float(rule.value), f"value={rule.value:g}"
    elif rule.fpr is not None:
        t, note = quantile_from_record(calibration["voxel"], rule.fpr)  # type: ignore[index]
        out["voxel_threshold"], out["voxel_rule"] = t, f"fpr={rule.fpr:g} ({note}, {calibration['source']})"  # type: ignore[index]
    if rule.image_fpr is not None:
        t, note = quantile_from_record(calibration["image"], rule.image_fpr)  # type: ignore[index]
        out["image_threshold"], out["image_rule"] = t, f"image-fpr={rule.image_fpr:g} ({note}, {calibration['source']})"  # type: ignore[index]
    return out


def voxel_metrics_at(scores: Any, masks: Any, foreground: Any, threshold: float) -> dict[str, float | int]:
    """Pooled DICE, precision, recall and FPR of ``score > threshold`` over the foreground voxels (all voxels when
    ``foreground`` is None); an undefined ratio (0/0) is nan."""
    s = np.asarray(scores)
    m = np.asarray(masks, bool)
    f = np.ones(s.shape, bool) if foreground is None else np.asarray(foreground, bool)
    if s.shape != m.shape or s.shape != f.shape:
        raise ValueError(f"shapes differ: scores {s.shape}, masks {m.shape}, foreground {f.shape}")
    pred = (s > threshold) & f
    pos = m & f
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    tn = int(f.sum()) - tp - fp - fn

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {"dice": ratio(2 * tp, 2 * tp + fp + fn), "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "fpr": ratio(fp, fp + tn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def decision_metrics(scores: Any, labels: Any, threshold: float) -> dict[str, float | int]:
    """Accuracy, sensitivity and specificity of ``score > threshold`` against 0/1 labels (nan when undefined)."""
    s = np.asarray(scores, float).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    pred = s > threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {"accuracy": (tp + tn) / s.size if s.size else math.nan, "sensitivity": tp / n_pos if n_pos else math.nan,
            "specificity": tn / n_neg if n_neg else math.nan, "n_predicted_abnormal": int(pred.sum())}


def components_table(mask: np.ndarray, amap: np.ndarray, affine: np.ndarray) -> list[dict[str, float | int]]:
    """Connected components (face connectivity, :func:`scipy.ndimage.label`) of a 2D or 3D binary mask: id, voxels,
    volume in mL (|det| of the affine's 3x3 part per voxel; a 2D image counts as one voxel thick), peak and mean
    score of ``amap`` inside, centroid in world mm through ``affine`` (a 2D index (i, j) is the voxel (i, j, 0))."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    amap = np.asarray(amap, np.float64)
    if mask.shape != amap.shape or mask.ndim not in (2, 3):
        raise ValueError(f"components_table: mask {mask.shape} and map {amap.shape} must be the same 2D/3D shape")
    lab, n = ndimage.label(mask)
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    peak = ndimage.maximum(amap, lab, ids)
    mean = ndimage.mean(amap, lab, ids)
    cen = np.asarray(ndimage.center_of_mass(mask, lab, ids), float).reshape(n, mask.ndim)
    if mask.ndim == 2:
        cen = np.concatenate([cen, np.zeros((n, 1))], axis=1)
    aff = np.asarray(affine, float)
    world = cen @ aff[:3, :3].T + aff[:3, 3]
    ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
    return [{"component": int(i), "voxels": int(c), "volume_ml": float(c * ml), "peak_score": float(p),
             "mean_score": float(m), "centroid_x_mm": float(w[0]), "centroid_y_mm": float(w[1]),
             "centroid_z_mm": float(w[2])} for i, c, p, m, w in zip(ids, counts, peak, mean, world, strict=True)]
