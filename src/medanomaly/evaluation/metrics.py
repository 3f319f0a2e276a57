"""The evaluation protocol: exact pixel and sample level metrics (AP, AUROC, best DICE, per-case).

Conventions (the same for every method):

- Scores: higher = more anomalous. A prediction at threshold ``t`` is ``score >= t``.
- Pixel level: AP and AUROC pooled over all voxels of all cases, restricted to the foreground when one is given.
  AP is the step-wise sum ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds (scikit-learn's
  ``average_precision_score``, no interpolation); AUROC is the trapezoidal area under the ROC curve with ties
  counted as one half (scikit-learn's ``roc_auc_score``).
- Best-achievable DICE: the maximum over all thresholds of the DICE pooled over the whole dataset. Pooled DICE
  equals pixel F1, so it is computed exactly from the precision-recall counts at every distinct score value
  (ties are one threshold). When several thresholds reach the maximum the highest one is reported.
- Per-case DICE at that threshold: by default over cases whose (foreground) mask is non-empty, because DICE is
  undefined for an empty mask and an empty prediction. ``dice_cases="all"`` includes every case, scoring a case
  with an empty mask 1.0 when its prediction is empty too and 0.0 otherwise.
- Undefined metrics (no positive voxel/sample for AP, DICE, AUROC; no negative for AUROC) are ``nan`` with a
  :class:`MetricWarning`, never an exception, so that a benchmark over many subsets keeps running. Bad input
  (shape mismatch, NaN/Inf scores, non-binary masks, nothing to evaluate) is a ``ValueError`` naming the problem.
- Inputs are numpy arrays or torch tensors of shape (N, *spatial) or (N, 1, *spatial).

Streaming (histogram) metrics are in :mod:`medanomaly.evaluation.streaming`, token-level metrics in
:mod:`medanomaly.evaluation.tokens`, the image-score rule in :mod:`medanomaly.evaluation.scoring`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from medanomaly.evaluation._checks import check_binary, check_scores, prepare_maps, squeeze_channel, to_numpy

__all__ = [
    "MetricWarning",
    "pixel_metrics",
    "pixel_curves",
    "per_case_dice",
    "sample_metrics",
    "sample_curves",
    "slice_labels",
]

DiceCases = Literal["with_lesion", "all"]


class MetricWarning(UserWarning):
    """A metric is undefined on the given data (e.g. no positive voxel) and was returned as nan."""


def _warn(msg: str) -> None:
    warnings.warn(msg, MetricWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# exact binary metrics from cumulative counts


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (ascending) scores of the positives and of the negatives (two plain sorts, no argsort)."""
    s = np.ravel(scores)
    y = np.ravel(labels).astype(bool)
    return np.sort(s[y]), np.sort(s[~y])


def _counts_at(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers of positives and negatives with ``score >= t`` for each threshold t."""
    tps = pos.size - np.searchsorted(pos, thresholds, side="left").astype(np.int64)
    fps = neg.size - np.searchsorted(neg, thresholds, side="left").astype(np.int64)
    return tps, fps


def exact_binary_metrics(scores: np.ndarray, labels: np.ndarray, what: str) -> dict[str, Any]:
    """Exact AP, AUROC, best DICE and its threshold of 1-D scores against bool labels.

    Two sorts and binary searches, O(V log V) without an argsort (several times faster on large inputs):
    AUROC is the Mann-Whitney statistic (ties count one half); AP and DICE only change at thresholds equal to a
    positive's score (a threshold between them keeps TP and adds FP), so they are evaluated there.
    """
    pos, neg = _split_sorted(scores, labels)
    p, n = pos.size, neg.size
    out: dict[str, Any] = {"ap": math.nan, "auroc": math.nan, "best_dice": math.nan, "best_threshold": math.nan,
                           "n_pos": p, "n_neg": n}
    if p == 0:
        _warn(f"{what}: no positive among {n} items; AP, AUROC and DICE are undefined (nan)")
        return out
    thr = np.unique(pos)[::-1]  # distinct positive scores, highest first
    tps, fps = _counts_at(pos, neg, thr)
    tps_f, fps_f = tps.astype(np.float64), fps.astype(np.float64)
    out["ap"] = float(np.sum(np.diff(tps_f, prepend=0.0) * tps_f / (tps_f + fps_f)) / p)
    dice = 2.0 * tps_f / (tps_f + fps_f + p)
    k = int(np.argmax(dice))
    out["best_dice"], out["best_threshold"] = float(dice[k]), float(thr[k])
    if n == 0:
        _warn(f"{what}: no negative among {p} items; AUROC is undefined (nan)")
    else:
        below = np.searchsorted(neg, pos, side="left").astype(np.int64)
        ties = np.searchsorted(neg, pos, side="right").astype(np.int64) - below
        out["auroc"] = float((below.sum() + 0.5 * ties.sum()) / (float(p) * float(n)))
    return out


def ap_auroc_dice(tps: np.ndarray, fps: np.ndarray, what: str) -> dict[str, Any]:
    """AP, AUROC and the best pooled DICE (with its index) from cumulative counts in descending-threshold order."""
    p = int(tps[-1])
    n = int(fps[-1])
    out: dict[str, Any] = {"ap": math.nan, "auroc": math.nan, "best_dice": math.nan, "best_index": -1}
    tps_f = tps.astype(np.float64)
    fps_f = fps.astype(np.float64)
    if p == 0:
        _warn(f"{what}: no positive among {n} items; AP, AUROC and DICE are undefined (nan)")
        return out
    dtp = np.diff(tps_f, prepend=0.0)
    precision = tps_f / np.maximum(tps_f + fps_f, 1.0)
    out["ap"] = float(np.sum(dtp * precision) / p)
    if n == 0:
        _warn(f"{what}: no negative among {p} items; AUROC is undefined (nan)")
    else:
        tpr = np.concatenate([[0.0], tps_f / p])
        fpr = np.concatenate([[0.0], fps_f / n])
        out["auroc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
    dice = 2.0 * tps_f / (tps_f + fps_f + p)
    k = int(np.argmax(dice))
    out["best_dice"] = float(dice[k])
    out["best_index"] = k
    return out


# ----------------------------------------------------------------------------------------------------------------
# pixel level


def _case_groups(case_ids: Sequence[Any] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    if case_ids is None:
        return np.arange(n), np.arange(n)
    ids = np.asarray(list(case_ids))
    if ids.shape != (n,):
        raise ValueError(f"case_ids must have one entry per image ({n}), got {ids.shape[0] if ids.ndim else 0}")
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv


def dice_from_case_counts(tp: np.ndarray, pred: np.ndarray, pos: np.ndarray, dice_cases: DiceCases) -> np.ndarray:
    """Per-case DICE = 2TP / (|pred| + |mask|); nan for cases excluded by ``dice_cases``."""
    if dice_cases not in ("with_lesion", "all"):
        raise ValueError(f"dice_cases must be 'with_lesion' or 'all', got {dice_cases!r}")
    tp, pred, pos = (np.asarray(a, np.float64) for a in (tp, pred, pos))
    denom = pred + pos
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 1.0)
    if dice_cases == "with_lesion":
        d = np.where(pos > 0, d, np.nan)
    return d


def per_case_dice(
    scores: Any,
    masks: Any,
    threshold: float,
    foreground: Any = None,
    case_ids: Sequence[Any] | None = None,
    dice_cases: DiceCases = "with_lesion",
) -> tuple[np.ndarray, np.ndarray]:
    """DICE of ``score >= threshold`` per case, over the foreground.

    Images sharing a ``case_ids`` entry (e.g. slices of one patient) are pooled into one case. Returns
    ``(case_keys, dice)``; ``dice`` is nan for cases excluded by ``dice_cases`` (see the module docstring).
    """
    s, m, f = prepare_maps(scores, masks, foreground)
    return _per_case_dice_arrays(s, m, f, threshold, case_ids, dice_cases)


def _per_case_dice_arrays(
    s: np.ndarray, m: np.ndarray, f: np.ndarray | None, threshold: float, case_ids: Sequence[Any] | None, dice_cases: DiceCases
) -> tuple[np.ndarray, np.ndarray]:
    keys, inv = _case_groups(case_ids, s.shape[0])
    pred = s >= threshold
    if f is not None:
        pred &= f
        m = m & f
    tp = np.bincount(inv, weights=(pred & m).sum(1), minlength=len(keys))
    npred = np.bincount(inv, weights=pred.sum(1), minlength=len(keys))
    npos = np.bincount(inv, weights=m.sum(1), minlength=len(keys))
    return keys, dice_from_case_counts(tp, npred, npos, dice_cases)


def dice_summary(d: np.ndarray) -> tuple[float, float, int]:
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan, math.nan, 0
    return float(d.mean()), float(d.std()), int(d.size)


def _per_case_ranking(s: np.ndarray, m: np.ndarray, f: np.ndarray | None, case_ids: Sequence[Any]) -> dict[str, float | int]:
    """AP and AUROC within each case (a patient or volume) that has lesion and healthy voxels; mean and std."""
    keys, inv = _case_groups(case_ids, s.shape[0])
    aps, aucs = [], []
    for k in range(len(keys)):
        rows = inv == k
        sk, mk = s[rows], m[rows]
        if f is not None:
            fk = f[rows]
            sk, mk = sk[fk], mk[fk]
        n_pos = int(mk.sum())
        if n_pos == 0 or n_pos == mk.size:
            continue
        r = exact_binary_metrics(sk.ravel(), mk.ravel(), "pixel_metrics")
        aps.append(r["ap"])
        aucs.append(r["auroc"])
    ap_m, ap_s, n = dice_summary(np.asarray(aps, float))
    au_m, au_s, _ = dice_summary(np.asarray(aucs, float))
    return {"ap_per_case_mean": ap_m, "ap_per_case_std": ap_s, "auroc_per_case_mean": au_m, "auroc_per_case_std": au_s,
            "n_cases_ranking": n}


def pixel_metrics(
    scores: Any,
    masks: Any,
    foreground: Any = None,
    per_case: bool = True,
    case_ids: Sequence[Any] | None = None,
    dice_cases: DiceCases = "with_lesion",
) -> dict[str, float | int]:
    """Exact pixel-level metrics of anomaly maps against lesion masks.

    Args:
        scores: (N, *spatial) or (N, 1, *spatial) anomaly maps, higher = more anomalous.
        masks: binary lesion masks of the same shape.
        foreground: optional binary mask of the voxels to evaluate (e.g. the brain); all voxels when None.
        per_case: also compute per-case DICE at the best threshold.
        case_ids: optional id per image; images sharing an id form one case for the per-case DICE; with ids (and
            ``per_case``) also the per-case AP/AUROC over cases holding both lesion and healthy voxels.
        dice_cases: which cases enter the per-case DICE statistics (module docstring).

    Returns:
        ``ap``, ``auroc``, ``best_dice``, ``best_threshold`` (predict ``score >= best_threshold``),
        ``dice_per_case_mean``, ``dice_per_case_std``, ``n_cases_dice``, ``n_voxels``, ``n_positive``,
        ``positive_fraction``, ``n_cases``; with ``case_ids``: ``ap_per_case_mean``/``_std``,
        ``auroc_per_case_mean``/``_std``, ``n_cases_ranking``.
    """
    s, m, f = prepare_maps(scores, masks, foreground)
    if f is not None:
        s_sel, y_sel = s[f], m[f]
    else:
        s_sel, y_sel = s.ravel(), m.ravel()
    r = exact_binary_metrics(s_sel, y_sel, "pixel_metrics")
    del s_sel, y_sel
    n_pos = r["n_pos"]
    n_vox = n_pos + r["n_neg"]
    out: dict[str, float | int] = {
        "ap": r["ap"],
        "auroc": r["auroc"],
        "best_dice": r["best_dice"],
        "best_threshold": r["best_threshold"],
        "dice_per_case_mean": math.nan,
        "dice_per_case_std": math.nan,
        "n_cases_dice": 0,
        "n_voxels": n_vox,
        "n_positive": n_pos,
        "positive_fraction": n_pos / n_vox,
        "n_cases": int(s.shape[0]) if case_ids is None else len(set(case_ids)),
    }
    if per_case and n_pos > 0:
        _, d = _per_case_dice_arrays(s, m, f, out["best_threshold"], case_ids, dice_cases)
        out["dice_per_case_mean"], out["dice_per_case_std"], out["n_cases_dice"] = dice_summary(d)
    if per_case and case_ids is not None:
        out.update(_per_case_ranking(s, m, f, case_ids))
    return out


def _thin(n: int, max_points: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def pixel_curves(scores: Any, masks: Any, foreground: Any = None, max_points: int = 2000) -> dict[str, np.ndarray]:
    """Precision-recall and ROC curves (thinned to at most ``max_points`` thresholds) for plots.

    Returns ``precision``, ``recall``, ``fpr``, ``tpr``, ``thresholds`` (descending), with the ROC curve starting
    at (0, 0). Precision/recall are nan when there is no positive; fpr nan when there is no negative.
    """
    s, m, f = prepare_maps(scores, masks, foreground)
    s_sel, y_sel = (s[f], m[f]) if f is not None else (s.ravel(), m.ravel())
    return _curves(s_sel, y_sel, max_points)


def _curves(s: np.ndarray, y: np.ndarray, max_points: int) -> dict[str, np.ndarray]:
    """Exact curve points at (at most ``max_points``) distinct thresholds, always including the lowest one."""
    pos, neg = _split_sorted(s, y)
    thr = np.unique(s)[::-1]
    thr = thr[_thin(len(thr), max_points)]
    tps, fps = _counts_at(pos, neg, thr)
    tp, fp = tps.astype(np.float64), fps.astype(np.float64)
    p, n = float(pos.size), float(neg.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "thresholds": thr.astype(np.float64),
            "precision": tp / np.maximum(tp + fp, 1.0),
            "recall": tp / p if p > 0 else np.full_like(tp, np.nan),
            "tpr": np.concatenate([[0.0], tp / p]) if p > 0 else np.full(tp.size + 1, np.nan),
            "fpr": np.concatenate([[0.0], fp / n]) if n > 0 else np.full(tp.size + 1, np.nan),
        }


# ----------------------------------------------------------------------------------------------------------------
# sample level


def _prepare_samples(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, int]:
    s = check_scores(np.ravel(to_numpy(scores, "sample scores")), "sample scores")
    lab = np.ravel(to_numpy(labels, "sample labels"))
    if lab.shape != s.shape:
        raise ValueError(f"{s.size} sample scores but {lab.size} labels")
    if lab.dtype == bool:
        return s, lab, 0
    if not np.issubdtype(lab.dtype, np.number):
        raise ValueError(f"sample labels must be 0/1 (or -1 for unknown), got dtype {lab.dtype}")
    ok = (lab == 0) | (lab == 1) | (lab == -1)
    if not ok.all():
        raise ValueError(f"sample labels must be 0, 1 or -1 (unknown); found {np.unique(lab[~ok])[:5].tolist()}")
    known = lab != -1
    n_unknown = int((~known).sum())
    if not known.any():
        raise ValueError(f"all {lab.size} sample labels are -1 (unknown): nothing to evaluate")
    return s[known], lab[known] == 1, n_unknown


def sample_metrics(scores: Any, labels: Any) -> dict[str, float | int]:
    """AP and AUROC of image/volume scores against labels (1 abnormal, 0 normal; -1 unknown is left out).

    Returns ``ap``, ``auroc``, ``n`` (labelled samples used), ``n_pos``, ``n_unknown``; nan + MetricWarning when a
    class is missing.
    """
    s, y, n_unknown = _prepare_samples(scores, labels)
    r = exact_binary_metrics(s, y, "sample_metrics")
    return {"ap": r["ap"], "auroc": r["auroc"], "n": int(s.size), "n_pos": int(y.sum()), "n_unknown": n_unknown}


def sample_curves(scores: Any, labels: Any, max_points: int = 2000) -> dict[str, np.ndarray]:
    """PR and ROC curves of sample scores (same keys as :func:`pixel_curves`)."""
    s, y, _ = _prepare_samples(scores, labels)
    return _curves(s, y, max_points)


def slice_labels(masks: Any, min_fraction: float = 0.0, foreground: Any = None) -> np.ndarray:
    """Image labels from lesion masks: 1 when the lesion covers more than ``min_fraction`` of the image.

    ``min_fraction=0`` means any lesion voxel. The fraction is of the foreground voxels when ``foreground`` is given
    (lesion voxels outside it are ignored), else of all voxels. Returns an int array (N,).
    """
    m = check_binary(squeeze_channel(to_numpy(masks, "masks")), "masks")
    if m.ndim < 2:
        raise ValueError(f"masks must be (N, *spatial), got shape {m.shape}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    n = m.shape[0]
    m = m.reshape(n, -1)
    if foreground is not None:
        f = check_binary(squeeze_channel(to_numpy(foreground, "foreground")), "foreground").reshape(n, -1)
        if f.shape != m.shape:
            raise ValueError("foreground shape does not match masks shape")
        m = m & f
        denom = np.maximum(f.sum(1), 1)
    else:
        denom = np.full(n, m.shape[1])
    cnt = m.sum(1)
    return ((cnt > 0) & (cnt / denom > min_fraction)).astype(np.int64)

