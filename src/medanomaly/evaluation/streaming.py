"""Streaming pixel metrics: fixed-size score histograms for data that does not fit in memory, with rigorous
lower/upper bounds on the exact values of :func:`medanomaly.evaluation.metrics.pixel_metrics`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medanomaly.evaluation._checks import prepare_maps
from medanomaly.evaluation.metrics import DiceCases, ap_auroc_dice, dice_from_case_counts, dice_summary

__all__ = ["StreamingPixelMetrics"]


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
        s, m, f = prepare_maps(scores, masks, foreground)
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
        r = ap_auroc_dice(tps, fps, "StreamingPixelMetrics")
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
            d = dice_from_case_counts(tp, pred, h[:, 0].sum(1), self.dice_cases)
            out["dice_per_case_mean"], out["dice_per_case_std"], out["n_cases_dice"] = dice_summary(d)
        return out
