"""Guards instead of silence: checks that a run's preprocessing fits the data it is applied to.

``evaluate`` and ``predict`` warn loudly (``--strict``: fail with one line) when

- the foreground covers under :data:`MIN_HEAD_COVERAGE` of the head (a skull strip that kept only part of the brain),
- more than :data:`MAX_LESION_OUTSIDE` of the lesion voxels fall outside the evaluated area (foreground of the kept
  slices; ``evaluate`` only, it has the masks),
- most slices of the volumes are dropped by the slice filter (:data:`MAX_DROPPED`),
- the foreground intensities are far from the training data's (:func:`intensity_shift`: the quartiles move by
  more than :data:`MAX_INTENSITY_SHIFT` of the training 5-95 % range; the run records :data:`QUANTILES` at train
  time). A coarse check: measured with an LGG FLAIR run, LGG test 0.19, BraTS FLAIR slices 0.19 (0.38 on three
  tumour-heavy volumes), BraTS T1 0.35 -- it catches grossly different inputs (unnormalised, inverted, another
  kind of image), not a FLAIR/T1 swap.

Lesion masks are only counted here, after prediction: no guard changes a threshold, a parameter or a score.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from medanomaly.app.errors import PipelineError

__all__ = ["GuardError", "GuardWarning", "MAX_DROPPED", "MAX_INTENSITY_SHIFT", "MAX_LESION_OUTSIDE", "MIN_HEAD_COVERAGE",
           "MIN_INTENSITY_VALUES", "QUANTILES", "coverage_guard", "dataset_intensity_stats", "dropped_guard", "intensity_guard",
           "intensity_shift", "intensity_stats", "lesion_guard", "raise_or_warn", "summarise_records"]

MIN_HEAD_COVERAGE = 0.20
MAX_LESION_OUTSIDE = 0.01
MAX_DROPPED = 0.5
MAX_INTENSITY_SHIFT = 0.5
#: inputs with fewer foreground values than this get no intensity guard (one small 2D image: too noisy)
MIN_INTENSITY_VALUES = 10_000
QUANTILES = (1, 5, 25, 50, 75, 95, 99)


class GuardWarning(UserWarning):
    """A guard fired: the preprocessing may not fit these data."""


class GuardError(PipelineError):
    """A guard fired under ``--strict``."""


def intensity_stats(values: np.ndarray, max_values: int = 2_000_000) -> dict[str, Any]:
    """Quantiles of foreground intensities (a strided subsample of at most ``max_values``)."""
    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size == 0:
        return {"n": 0}
    if v.size > max_values:
        v = v[:: int(np.ceil(v.size / max_values))]
    q = np.percentile(v, QUANTILES)
    return {"n": int(v.size), "quantiles": {f"q{k:02d}": round(float(x), 5) for k, x in zip(QUANTILES, q, strict=True)},
            "mean": round(float(v.mean()), 5), "std": round(float(v.std()), 5)}


def dataset_intensity_stats(ds: Any, max_cases: int = 8, max_samples: int = 256) -> dict[str, Any] | None:
    """Foreground intensity quantiles of a dataset (label-free: images and foregrounds only), from the samples of up
    to ``max_cases`` cases spread over it (so that lazily preprocessed volumes are read at most ``max_cases`` times)."""
    n = len(ds)
    if n == 0:
        return None
    ids = getattr(ds, "case_ids", None)
    if isinstance(ids, list) and len(ids) == n:
        cases = list(dict.fromkeys(ids))
        pick = {cases[int(i)] for i in np.linspace(0, len(cases) - 1, min(max_cases, len(cases)))}
        idx = [i for i in range(n) if ids[i] in pick]
    else:
        idx = list(range(n))
    if len(idx) > max_samples:
        idx = [idx[int(i)] for i in np.linspace(0, len(idx) - 1, max_samples)]
    vals = []
    for i in idx:
        s = ds[i]
        img, fg = np.asarray(s["image"]), np.asarray(s["foreground"], bool)
        vals.append(img[0][fg[0]] if img.shape[1:] == fg.shape[1:] else img[0].ravel())
    out = intensity_stats(np.concatenate(vals) if vals else np.zeros(0))
    out["images"] = len(idx)
    return out


def intensity_shift(test: dict[str, Any] | None, train: dict[str, Any] | None) -> float | None:
    """The largest difference of the quartiles (25th, 50th, 75th percentiles) of the foreground intensities, in
    units of the training data's 5th-95th percentile range (None when either side has no statistics). The tails are
    left out: they follow the foreground's edge (a skull strip's dark rim), not the contrast."""
    if not test or not train or "quantiles" not in test or "quantiles" not in train:
        return None
    qt, qr = test["quantiles"], train["quantiles"]
    keys = [k for k in ("q25", "q50", "q75") if k in qt and k in qr]
    if not keys:
        return None
    spread = max(float(qr.get("q95", 0)) - float(qr.get("q05", 0)), 1e-6)
    return round(max(abs(float(qt[k]) - float(qr[k])) for k in keys) / spread, 4)


def summarise_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-case preprocessing records (``ds.prep_records``) -> the summary a report shows and guards read."""
    recs = list(records.values())
    out: dict[str, Any] = {"cases": len(recs)}
    if not recs:
        return out
    kinds = sorted({str(r.get("foreground")) for r in recs if r.get("foreground") is not None})
    sources = sorted({str(r.get("source")) for r in recs if r.get("source") is not None})
    out["foreground"] = kinds[0] if len(kinds) == 1 else kinds
    out["foreground_source"] = sources[0] if len(sources) == 1 else sources
    det = [r["skull_stripped"] for r in recs if "skull_stripped" in r]
    if det:
        out["skull_stripped_cases"] = int(sum(det))
    # the share of the head the foreground covers: over the slices that are scored when a slice filter ran, else
    # over the whole input
    cov = {cid: float(r["kept_coverage"]) if "kept_coverage" in r else r["foreground_voxels"] / r["head_voxels"]
           for cid, r in records.items() if "kept_coverage" in r or (r.get("head_voxels") and "foreground_voxels" in r)}
    if cov:
        out["head_coverage_min"] = round(min(cov.values()), 4)
        out["head_coverage_median"] = round(float(np.median(list(cov.values()))), 4)
        low = sorted(cid for cid, c in cov.items() if c < MIN_HEAD_COVERAGE)
        if low:
            out["low_coverage_cases"] = low
    if any("n_slices" in r for r in recs):
        out["slices"] = int(sum(r.get("n_slices", 0) for r in recs))
        out["dropped_slices"] = int(sum(r.get("n_dropped", 0) for r in recs))
        out["dropped_by_case"] = {cid: int(r.get("n_dropped", 0)) for cid, r in records.items() if r.get("n_dropped")}
    for k in ("lesion_voxels_dropped", "lesion_voxels_cropped"):
        if any(k in r for r in recs):
            out[k] = int(sum(r.get(k, 0) for r in recs))
    return out


def coverage_guard(summary: dict[str, Any], what: str) -> list[str]:
    c = summary.get("head_coverage_min")
    if c is None or c >= MIN_HEAD_COVERAGE:
        return []
    low = summary.get("low_coverage_cases") or []
    shown = ", ".join(low[:5]) + (f" and {len(low) - 5} more" if len(low) > 5 else "")
    return [f"{what}: the foreground ({summary.get('foreground')}: {summary.get('foreground_source')}) covers only "
            f"{100 * c:.0f} % of the head in {shown or 'some cases'} (under {100 * MIN_HEAD_COVERAGE:.0f} %); the scores "
            "miss most of the scan: check --foreground, or give a brain mask"]


def dropped_guard(summary: dict[str, Any], what: str) -> list[str]:
    n, d = summary.get("slices"), summary.get("dropped_slices")
    if not n or d is None or d / n <= MAX_DROPPED:
        return []
    return [f"{what}: the slice filter drops {d} of {n} slices ({100 * d / n:.0f} %): most of the volume is not scored; "
            "check --foreground (a skull strip on a skull-stripped scan?) and the preset's min_fg_fraction"]


def lesion_guard(outside: int, total: int, what: str, dropped: int = 0) -> list[str]:
    """``dropped``: how many of the ``outside`` voxels lie in slices the slice filter drops (or a crop cuts off)."""
    if total <= 0 or outside / total <= MAX_LESION_OUTSIDE:
        return []
    hint = ("most of them in slices the slice filter drops: lower the preset's min_fg_fraction (e.g. "
            "--data x.csv:view=slices,min_fg_fraction=0.05)" if 2 * dropped > outside else "check --foreground")
    return [f"{what}: {outside} of {total} lesion voxels ({100 * outside / total:.1f} %) fall outside the evaluated area "
            f"(foreground of the kept slices; over {100 * MAX_LESION_OUTSIDE:.0f} %): the metrics ignore them; {hint}"]


def intensity_guard(shift: float | None, what: str) -> list[str]:
    if shift is None or shift <= MAX_INTENSITY_SHIFT:
        return []
    return [f"{what}: the foreground intensities differ from the training data's (quantile shift {shift:.2f} of the "
            f"training 5-95 % range, over {MAX_INTENSITY_SHIFT}): another contrast, scanner or normalisation; the "
            "model may not carry over"]


def raise_or_warn(messages: Iterable[str], strict: bool) -> list[str]:
    """Warn once per message (a :class:`GuardWarning`); ``strict``: raise :class:`GuardError` with the first (and a
    count of the others). Returns the messages."""
    msgs = list(messages)
    if msgs and strict:
        more = f" (and {len(msgs) - 1} more guard{'s' if len(msgs) > 2 else ''})" if len(msgs) > 1 else ""
        raise GuardError(f"--strict: {msgs[0]}{more}")
    for m in msgs:
        warnings.warn(m, GuardWarning, stacklevel=2)
    return msgs
