"""The evaluation protocol: pixel, sample and token level metrics, exact and streaming.

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

For data that does not fit in memory :class:`StreamingPixelMetrics` accumulates score histograms and returns
the same metrics with rigorous lower/upper bounds on the exact values (see its docstring).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "MetricWarning",
    "pixel_metrics",
    "pixel_curves",
    "per_case_dice",
    "sample_metrics",
    "reduce_map",
    "slice_labels",
    "token_labels",
    "token_metrics",
    "sample_curves",
    "StreamingPixelMetrics",
]

DiceCases = Literal["with_lesion", "all"]


class MetricWarning(UserWarning):
    """A metric is undefined on the given data (e.g. no positive voxel) and was returned as nan."""


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor or sequence, with a clear error for anything else."""
    if x is None:
        raise ValueError(f"{name} is None")
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            return x.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{name} could not be converted to an array: {e}") from e
    if a.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got an object array (ragged or mixed input?)")
    return a


def _check_scores(a: np.ndarray, name: str) -> np.ndarray:
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype == bool:
        a = a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            n_nan = int(np.isnan(a).sum())
            raise ValueError(
                f"{name} contains non-finite values: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite of {a.size}"
            )
    else:
        a = a.astype(np.float64)
    return a


def _check_binary(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == bool:
        return a
    if a.size and not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {a.dtype}")
    ok = (a == 0) | (a == 1)
    if not ok.all():
        bad = np.unique(a[~ok])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1); found other values such as {bad.tolist()}")
    return a.astype(bool)


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    """(N, 1, *spatial) -> (N, *spatial); other shapes unchanged."""
    if a.ndim >= 3 and a.shape[1] == 1:
        return a[:, 0]
    return a


def _prepare_maps(
    scores: Any, masks: Any, foreground: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked (N, V) scores, (N, V) bool masks and (N, V) bool foreground (or None)."""
    s = _check_scores(_squeeze_channel(_to_numpy(scores, "scores")), "scores")
    m = _squeeze_channel(_to_numpy(masks, "masks"))
    if s.ndim < 2:
        raise ValueError(f"scores must be (N, *spatial) or (N, 1, *spatial), got shape {s.shape}")
    if m.shape != s.shape:
        raise ValueError(f"scores shape {s.shape} does not match masks shape {m.shape} (after dropping a channel axis)")
    m = _check_binary(m, "masks")
    f = None
    if foreground is not None:
        f = _squeeze_channel(_to_numpy(foreground, "foreground"))
        if f.shape != s.shape:
            raise ValueError(f"foreground shape {f.shape} does not match scores shape {s.shape}")
        f = _check_binary(f, "foreground").reshape(len(f), -1)
        if not f.any():
            raise ValueError("foreground is empty: no voxel to evaluate")
    n = s.shape[0]
    return s.reshape(n, -1), m.reshape(n, -1), f


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


def _exact_binary(scores: np.ndarray, labels: np.ndarray, what: str) -> dict[str, Any]:
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


def _ap_auroc_dice(tps: np.ndarray, fps: np.ndarray, what: str) -> dict[str, Any]:
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


def _dice_from_case_counts(tp: np.ndarray, pred: np.ndarray, pos: np.ndarray, dice_cases: DiceCases) -> np.ndarray:
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
    s, m, f = _prepare_maps(scores, masks, foreground)
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
    return keys, _dice_from_case_counts(tp, npred, npos, dice_cases)


def _summary(d: np.ndarray) -> tuple[float, float, int]:
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
        r = _exact_binary(sk.ravel(), mk.ravel(), "pixel_metrics")
        aps.append(r["ap"])
        aucs.append(r["auroc"])
    ap_m, ap_s, n = _summary(np.asarray(aps, float))
    au_m, au_s, _ = _summary(np.asarray(aucs, float))
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
    s, m, f = _prepare_maps(scores, masks, foreground)
    if f is not None:
        s_sel, y_sel = s[f], m[f]
    else:
        s_sel, y_sel = s.ravel(), m.ravel()
    r = _exact_binary(s_sel, y_sel, "pixel_metrics")
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
        out["dice_per_case_mean"], out["dice_per_case_std"], out["n_cases_dice"] = _summary(d)
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
    s, m, f = _prepare_maps(scores, masks, foreground)
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
    s = _check_scores(np.ravel(_to_numpy(scores, "sample scores")), "sample scores")
    lab = np.ravel(_to_numpy(labels, "sample labels"))
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
    r = _exact_binary(s, y, "sample_metrics")
    return {"ap": r["ap"], "auroc": r["auroc"], "n": int(s.size), "n_pos": int(y.sum()), "n_unknown": n_unknown}


def sample_curves(scores: Any, labels: Any, max_points: int = 2000) -> dict[str, np.ndarray]:
    """PR and ROC curves of sample scores (same keys as :func:`pixel_curves`)."""
    s, y, _ = _prepare_samples(scores, labels)
    return _curves(s, y, max_points)


def reduce_map(
    maps: Any,
    how: Literal["max", "mean", "topk"] = "max",
    k: float = 0.01,
    foreground: Any = None,
) -> Any:
    """One score per image from its anomaly map: the max, the mean, or the mean of the top ``k`` fraction of voxels.

    ``maps`` is (N, *spatial) or (N, 1, *spatial), numpy or torch; the result has the same type, shape (N,).
    With ``foreground`` only foreground voxels count; an image with an empty foreground falls back to all its
    voxels (with a MetricWarning). ``topk`` averages the ``max(1, ceil(k * n))`` highest voxels.
    """
    is_torch = False
    try:
        import torch

        is_torch = isinstance(maps, torch.Tensor)
    except ImportError:  # pragma: no cover
        pass
    a = _check_scores(_squeeze_channel(_to_numpy(maps, "maps")), "maps").astype(np.float64)
    if a.ndim < 2:
        raise ValueError(f"maps must be (N, *spatial), got shape {a.shape}")
    if how not in ("max", "mean", "topk"):
        raise ValueError(f"how must be 'max', 'mean' or 'topk', got {how!r}")
    if how == "topk" and not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    n = a.shape[0]
    a = a.reshape(n, -1)
    if foreground is not None:
        f = _check_binary(_squeeze_channel(_to_numpy(foreground, "foreground")), "foreground")
        if f.shape[0] != n or f.reshape(n, -1).shape != a.shape:
            raise ValueError(f"foreground shape {f.shape} does not match maps shape {tuple(_to_numpy(maps, 'maps').shape)}")
        f = f.reshape(n, -1).copy()
        empty = ~f.any(1)
        if empty.any():
            _warn(f"reduce_map: {int(empty.sum())} image(s) with an empty foreground use all voxels")
            f[empty] = True
    else:
        f = np.ones_like(a, dtype=bool)
    out = np.empty(n, np.float64)
    for i in range(n):
        v = a[i][f[i]]
        if how == "max":
            out[i] = v.max()
        elif how == "mean":
            out[i] = v.mean()
        else:
            t = max(1, math.ceil(k * v.size))
            out[i] = np.partition(v, v.size - t)[v.size - t:].mean()
    if is_torch:
        import torch

        return torch.from_numpy(out).to(device=maps.device, dtype=maps.dtype if maps.is_floating_point() else torch.float64)
    return out


def slice_labels(masks: Any, min_fraction: float = 0.0, foreground: Any = None) -> np.ndarray:
    """Image labels from lesion masks: 1 when the lesion covers more than ``min_fraction`` of the image.

    ``min_fraction=0`` means any lesion voxel. The fraction is of the foreground voxels when ``foreground`` is given
    (lesion voxels outside it are ignored), else of all voxels. Returns an int array (N,).
    """
    m = _check_binary(_squeeze_channel(_to_numpy(masks, "masks")), "masks")
    if m.ndim < 2:
        raise ValueError(f"masks must be (N, *spatial), got shape {m.shape}")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    n = m.shape[0]
    m = m.reshape(n, -1)
    if foreground is not None:
        f = _check_binary(_squeeze_channel(_to_numpy(foreground, "foreground")), "foreground").reshape(n, -1)
        if f.shape != m.shape:
            raise ValueError("foreground shape does not match masks shape")
        m = m & f
        denom = np.maximum(f.sum(1), 1)
    else:
        denom = np.full(n, m.shape[1])
    cnt = m.sum(1)
    return ((cnt > 0) & (cnt / denom > min_fraction)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# token level


def _factor_tuple(factor: int | Sequence[int], nd: int) -> tuple[int, ...]:
    f = (int(factor),) * nd if np.isscalar(factor) else tuple(int(x) for x in factor)
    if len(f) != nd or min(f) < 1:
        raise ValueError(f"factor must be a positive int or {nd} positive ints, got {factor}")
    return f


def _block_fraction(a: np.ndarray, f: tuple[int, ...]) -> np.ndarray:
    """Fraction of True voxels in each f-block: (N, *S) -> (N, *S/f)."""
    n, sp = a.shape[0], a.shape[1:]
    for d, (s, k) in enumerate(zip(sp, f, strict=True)):
        if s % k:
            raise ValueError(f"mask size {s} along spatial axis {d} is not a multiple of the token factor {k}")
    shape = [n]
    for s, k in zip(sp, f, strict=True):
        shape += [s // k, k]
    axes = tuple(range(2, 2 * len(sp) + 1, 2))
    return a.reshape(shape).mean(axis=axes, dtype=np.float64)


def token_labels(masks: Any, factor: int | Sequence[int], min_fraction: float = 0.0) -> np.ndarray:
    """Lesion masks (N, *S) downsampled to token grids (N, *S/factor) as bool.

    A token is anomalous when the fraction of its pixels inside the lesion is > 0 (``min_fraction=0``, the default:
    any lesion pixel, i.e. max-pooling) or >= ``min_fraction`` otherwise (``0.5``: majority).
    """
    m = _check_binary(_squeeze_channel(_to_numpy(masks, "masks")), "masks")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    frac = _block_fraction(m, _factor_tuple(factor, m.ndim - 1))
    return frac > 0 if min_fraction == 0 else frac >= min_fraction


def token_metrics(
    token_scores: Any,
    masks: Any,
    factor: int | Sequence[int],
    min_fraction: float = 0.0,
    foreground: Any = None,
) -> dict[str, float | int]:
    """AP/AUROC of token scores (N, h, w[, d]) against lesion masks (N, H, W[, D]) downsampled by ``factor``.

    Token labels as in :func:`token_labels`. With ``foreground`` (pixel resolution) only tokens containing at least
    one foreground pixel are evaluated. Returns ``ap``, ``auroc``, ``n_tokens``, ``n_pos``.
    """
    t = _check_scores(_squeeze_channel(_to_numpy(token_scores, "token_scores")), "token_scores")
    m = _squeeze_channel(_to_numpy(masks, "masks"))
    if t.ndim != m.ndim or t.shape[0] != m.shape[0]:
        raise ValueError(f"token_scores shape {t.shape} and masks shape {m.shape} do not correspond")
    f = _factor_tuple(factor, m.ndim - 1)
    expect = tuple(s * k for s, k in zip(t.shape[1:], f, strict=True))
    if expect != m.shape[1:]:
        raise ValueError(f"token grid {t.shape[1:]} x factor {f} = {expect} does not match the mask size {m.shape[1:]}")
    y = token_labels(m, f, min_fraction)
    keep = np.ones_like(y, dtype=bool)
    if foreground is not None:
        fg = _check_binary(_squeeze_channel(_to_numpy(foreground, "foreground")), "foreground")
        if fg.shape != m.shape:
            raise ValueError(f"foreground shape {fg.shape} does not match masks shape {m.shape}")
        keep = _block_fraction(fg, f) > 0
        if not keep.any():
            raise ValueError("foreground is empty: no token to evaluate")
    r = _exact_binary(t[keep], y[keep], "token_metrics")
    return {"ap": r["ap"], "auroc": r["auroc"], "n_tokens": int(keep.sum()), "n_pos": int(y[keep].sum())}


# ----------------------------------------------------------------------------------------------------------------
# streaming (histogram) mode


class StreamingPixelMetrics:
    """Pixel metrics over arbitrarily many voxels from fixed-size score histograms.

    Scores are binned into ``bins`` equal bins over ``range = (lo, hi)``, plus four bins of their own: below
    ``lo``, exactly ``lo``, exactly ``hi``, above ``hi`` (clipped maps often put many voxels exactly on 0 or 1).
    Memory: a few arrays of ``bins + 4`` numbers, plus ``8 * (bins + 4)`` bytes per case when ``per_case`` is on
    (give ``case_ids`` to pool the slices of one patient into one case, or turn ``per_case`` off).
    ``merge`` adds another accumulator (e.g. from another process of a sharded prediction).

    ``compute()`` treats the scores inside one bin as tied, which gives the estimates ``ap``, ``auroc``,
    ``best_dice``, and returns rigorous bounds ``[lower, upper]`` that always contain the exact values of
    :func:`pixel_metrics` on the same data (tested):

    - DICE: counts at bin edges are exact, so the estimate is the exact DICE at ``best_threshold`` (a bin edge)
      and a lower bound. A threshold inside bin b predicts at most the positives down to b and at least everything
      above b, so ``upper = max_b 2 TP(>= b) / (|pred(> b)| + P)``.
    - AP: a positive in bin b, with ``a`` positives and ``F`` negatives above the bin and ``p``/``n`` in it, has a
      precision between ``(a + j) / (a + j + F + n)`` (j its rank among the bin's positives) and
      ``(a + p) / (a + p + F)``; the lower sum has a closed form with the digamma function.
    - AUROC: only positive-negative pairs inside one bin are unordered: the error is at most
      ``0.5 * sum_b p_b n_b / (P N)``.

    A bin whose voxels all hold the same score (detected exactly, with a reference value per bin) is a true tie:
    it adds no uncertainty. Bound widths shrink as the mass per bin shrinks (more bins, a range fitted to the
    scores); ``n_out_of_range`` counts the voxels outside ``range``, which widen the bounds unless tied.
    """

    def __init__(
        self,
        bins: int = 4096,
        range: tuple[float, float] = (0.0, 1.0),  # noqa: A002 - numpy's name for it
        per_case: bool = True,
        dice_cases: DiceCases = "with_lesion",
    ) -> None:
        lo, hi = float(range[0]), float(range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"range must be two finite numbers lo < hi, got {range}")
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if dice_cases not in ("with_lesion", "all"):
            raise ValueError(f"dice_cases must be 'with_lesion' or 'all', got {dice_cases!r}")
        self.bins, self.range = int(bins), (lo, hi)
        self.edges = np.linspace(lo, hi, self.bins + 1)
        nb = self.bins + 4
        self.per_case, self.dice_cases = per_case, dice_cases
        self.pos = np.zeros(nb, np.int64)
        self.neg = np.zeros(nb, np.int64)
        self.ref = np.full(nb, np.nan)  # one score seen in each bin
        self.mixed = np.zeros(nb, bool)  # a bin holding more than one distinct score
        self.min_score, self.max_score = math.inf, -math.inf
        self.cases: dict[Any, np.ndarray] = {}
        self.n_out_of_range = 0
        self._next_case = 0

    def _bin_index(self, s: np.ndarray) -> np.ndarray:
        """Bin of each score: 0 below lo, 1 at lo, 2 + b for regular bin b, bins + 2 at hi, bins + 3 above hi.

        ``index >= k`` is equivalent to ``score >= self._thresholds()[k]`` for every k (floating rounding fixed).
        """
        lo, hi = self.range
        x = (s - lo) * (self.bins / (hi - lo))
        idx = np.clip(np.floor(x), 0, self.bins - 1).astype(np.int64)
        idx -= (idx > 0) & (s < self.edges[idx])
        idx += (idx < self.bins - 1) & (s >= self.edges[idx + 1])
        idx += 2
        idx[s == lo] = 1
        idx[s < lo] = 0
        idx[s == hi] = self.bins + 2
        idx[s > hi] = self.bins + 3
        return idx

    def _thresholds(self) -> np.ndarray:
        lo, hi = self.range
        low = self.min_score if math.isfinite(self.min_score) else lo
        return np.concatenate([[low, lo, np.nextafter(lo, math.inf)], self.edges[1:-1], [hi, np.nextafter(hi, math.inf)]])

    def update(self, scores: Any, masks: Any, foreground: Any = None, case_ids: Sequence[Any] | None = None) -> None:
        """Add a batch: (B, *spatial) or (B, 1, *spatial) maps and masks; optional foreground and case ids."""
        s, m, f = _prepare_maps(scores, masks, foreground)
        n = s.shape[0]
        if self.per_case:
            if case_ids is None:
                keys = list(range(self._next_case, self._next_case + n))
            else:
                keys = list(case_ids)
                if len(keys) != n:
                    raise ValueError(f"case_ids must have one entry per image ({n}), got {len(keys)}")
        case_of = np.repeat(np.arange(n), s.shape[1]).reshape(s.shape)
        if f is not None:
            s, m, case_of = s[f], m[f], case_of[f]
        else:
            s, m, case_of = s.ravel(), m.ravel(), case_of.ravel()
        s = s.astype(np.float64, copy=False)
        nb = self.bins + 4
        idx = self._bin_index(s)
        self.pos += np.bincount(idx[m], minlength=nb)
        self.neg += np.bincount(idx[~m], minlength=nb)
        fresh = np.full(nb, np.nan)
        fresh[idx] = s
        self.ref = np.where(np.isnan(self.ref), fresh, self.ref)
        self.mixed |= np.bincount(idx, weights=s != self.ref[idx], minlength=nb) > 0
        if s.size:
            self.min_score, self.max_score = min(self.min_score, float(s.min())), max(self.max_score, float(s.max()))
        lo, hi = self.range
        self.n_out_of_range += int(np.count_nonzero((s < lo) | (s > hi)))
        if self.per_case:
            if case_ids is None:
                self._next_case += n
            key = (case_of * nb + idx) * 2 + m
            counts = np.bincount(key, minlength=n * nb * 2).reshape(n, nb, 2)
            for i, k in enumerate(keys):
                h = self.cases.setdefault(k, np.zeros((2, nb), np.int32))  # int32: one case holds < 2**31 voxels
                h[0] += counts[i, :, 1]
                h[1] += counts[i, :, 0]

    def merge(self, other: StreamingPixelMetrics) -> StreamingPixelMetrics:
        """Add another accumulator with the same bins and range (cases with equal keys are pooled)."""
        if other.bins != self.bins or other.range != self.range:
            raise ValueError("can only merge accumulators with the same bins and range")
        self.pos += other.pos
        self.neg += other.neg
        both = ~np.isnan(self.ref) & ~np.isnan(other.ref)
        self.mixed |= other.mixed | (both & (self.ref != other.ref))
        self.ref = np.where(np.isnan(self.ref), other.ref, self.ref)
        self.min_score, self.max_score = min(self.min_score, other.min_score), max(self.max_score, other.max_score)
        self.n_out_of_range += other.n_out_of_range
        for k, h in other.cases.items():
            self.cases.setdefault(k, np.zeros_like(h))
            self.cases[k] += h
        return self

    def compute(self) -> dict[str, Any]:
        """Estimates with the keys of :func:`pixel_metrics`, plus ``*_bounds`` = [lower, upper] and ``bin_width``."""
        nz = np.flatnonzero(self.pos + self.neg)[::-1]  # non-empty bins, highest first
        if nz.size == 0:
            raise ValueError("StreamingPixelMetrics: no voxel was added")
        p_b, n_b = self.pos[nz].astype(np.float64), self.neg[nz].astype(np.float64)
        tied = ~self.mixed[nz]
        tps, fps = np.cumsum(self.pos[nz]), np.cumsum(self.neg[nz])
        r = _ap_auroc_dice(tps, fps, "StreamingPixelMetrics")
        P, N = float(tps[-1]), float(fps[-1])
        thresholds = self._thresholds()
        out: dict[str, Any] = {
            "ap": r["ap"],
            "auroc": r["auroc"],
            "best_dice": r["best_dice"],
            "best_threshold": float(thresholds[nz[r["best_index"]]]) if r["best_index"] >= 0 else math.nan,
            "ap_bounds": [math.nan, math.nan],
            "auroc_bounds": [math.nan, math.nan],
            "best_dice_bounds": [math.nan, math.nan],
            "dice_per_case_mean": math.nan,
            "dice_per_case_std": math.nan,
            "n_cases_dice": 0,
            "n_voxels": int(P + N),
            "n_positive": int(P),
            "positive_fraction": P / (P + N),
            "n_cases": len(self.cases) if self.per_case else -1,
            "n_out_of_range": self.n_out_of_range,
            "bins": self.bins,
            "bin_width": (self.range[1] - self.range[0]) / self.bins,
        }
        if P > 0:
            from scipy.special import digamma

            a = np.concatenate([[0.0], tps[:-1].astype(np.float64)])  # positives above each bin
            F = np.concatenate([[0.0], fps[:-1].astype(np.float64)])  # negatives above each bin
            c = F + n_b
            # sum_{j=1..p} (a + j) / (a + j + c) = p - c * (digamma(a + c + p + 1) - digamma(a + c + 1)), exactly
            lower = p_b - c * (digamma(a + c + p_b + 1.0) - digamma(a + c + 1.0))
            upper = p_b * (a + p_b) / np.maximum(a + p_b + F, 1.0)
            exact_tie = p_b * (a + p_b) / np.maximum(a + p_b + c, 1.0)
            lower, upper = np.where(tied, exact_tie, lower), np.where(tied, exact_tie, upper)
            ap_lo, ap_hi = float(np.sum(np.maximum(lower, 0.0)) / P), float(np.sum(upper) / P)
            out["ap_bounds"] = [min(ap_lo, r["ap"]), min(1.0, max(ap_hi, r["ap"]))]
            dice_after = 2.0 * tps / (tps + fps + P)
            dice_hi = np.where(tied, dice_after, 2.0 * tps / (a + F + P))
            out["best_dice_bounds"] = [r["best_dice"], float(min(1.0, max(dice_hi.max(), r["best_dice"])))]
            if N > 0:
                half = 0.5 * float(np.sum(np.where(tied, 0.0, p_b * n_b))) / (P * N)
                out["auroc_bounds"] = [max(0.0, r["auroc"] - half), min(1.0, r["auroc"] + half)]
        if self.per_case and self.cases and r["best_index"] >= 0:
            b = int(nz[r["best_index"]])
            h = np.stack(list(self.cases.values())).astype(np.int64)  # (cases, 2, bins + 4)
            tp = h[:, 0, b:].sum(1)
            pred = tp + h[:, 1, b:].sum(1)
            d = _dice_from_case_counts(tp, pred, h[:, 0].sum(1), self.dice_cases)
            out["dice_per_case_mean"], out["dice_per_case_std"], out["n_cases_dice"] = _summary(d)
        return out
