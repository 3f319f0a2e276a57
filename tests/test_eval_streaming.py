"""Streaming (histogram) metrics: the stated bounds always contain the exact values, and shrink with more bins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.evaluation.metrics import per_case_dice, pixel_metrics
from medanomaly.evaluation.streaming import StreamingPixelMetrics

KEYS = ("ap", "auroc", "best_dice")


def assert_within_bounds(exact: dict, stream: dict) -> None:
    for k in KEYS:
        lo, hi = stream[f"{k}_bounds"]
        assert lo - 1e-12 <= exact[k] <= hi + 1e-12, (k, lo, exact[k], hi)
        assert lo - 1e-12 <= stream[k] <= hi + 1e-12, (k, lo, stream[k], hi)


def pooled_dice(s: np.ndarray, m: np.ndarray, threshold: float) -> float:
    pred = s >= threshold
    return 2 * (pred & m).sum() / (pred.sum() + m.sum())


def run_stream(s, m, fg=None, bins=64, rng=(0.0, 1.0), chunks=3, case_ids=None) -> dict:
    acc = StreamingPixelMetrics(bins=bins, range=rng)
    for idx in np.array_split(np.arange(len(s)), chunks):
        if idx.size:
            acc.update(s[idx], m[idx], None if fg is None else fg[idx],
                       None if case_ids is None else [case_ids[i] for i in idx])
    return acc.compute()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [1, 7, 256])
def test_bounds_contain_exact_random(seed: int, bins: int) -> None:
    rng = np.random.default_rng(seed)
    s = rng.beta(2, 5, (6, 12, 12))
    m = rng.random(s.shape) < 0.1 + 0.5 * (s > 0.4)  # informative scores
    fg = rng.random(s.shape) < 0.8
    if seed == 3:
        s = np.round(s * 10) / 10  # ties at arbitrary places inside bins
    exact = pixel_metrics(s, m, fg)
    stream = run_stream(s, m, fg, bins=bins)
    assert_within_bounds(exact, stream)
    assert stream["n_voxels"] == exact["n_voxels"] and stream["n_positive"] == exact["n_positive"]
    assert stream["best_dice"] == pytest.approx(pooled_dice(s[fg], m[fg], stream["best_threshold"]), abs=1e-12)


def test_estimate_is_exact_at_bin_edges_and_per_case_dice_exact() -> None:
    """Scores that sit on bin edges put one distinct value per bin: the histogram is the exact data."""
    rng = np.random.default_rng(1)
    bins = 20
    s = np.linspace(0.0, 1.0, bins + 1)[rng.integers(0, bins, (5, 10, 10))]  # exactly the bin edges
    m = rng.random(s.shape) < 0.1 + 0.6 * (s > 0.6)
    exact = pixel_metrics(s, m)
    stream = run_stream(s, m, bins=bins)
    for k in (*KEYS, "best_threshold", "dice_per_case_mean", "dice_per_case_std", "n_cases_dice"):
        assert stream[k] == pytest.approx(exact[k], abs=1e-12), k
    for k in KEYS:  # every bin holds one distinct score: a true tie, no uncertainty left
        assert stream[f"{k}_bounds"] == pytest.approx([exact[k], exact[k]], abs=1e-12), k


def test_scores_clipped_to_range_ends_are_exact_ties() -> None:
    """Maps clipped to [0, 1] put many voxels exactly on 0 and 1: those get their own tied bins."""
    rng = np.random.default_rng(6)
    s = np.clip(rng.normal(0.5, 0.5, (4, 16, 16)), 0.0, 1.0)
    m = rng.random(s.shape) < 0.1 + 0.5 * (s >= 1.0)
    assert (s == 1.0).mean() > 0.1 and (s == 0.0).mean() > 0.1
    exact = pixel_metrics(s, m)
    r = run_stream(s, m, bins=4096)
    assert_within_bounds(exact, r)
    assert r["n_out_of_range"] == 0
    for k in KEYS:
        assert r[f"{k}_bounds"][1] - r[f"{k}_bounds"][0] < 2e-3, k
    one_bin = run_stream(s, m, bins=1)  # only the open interval (0, 1) is uncertain
    assert_within_bounds(exact, one_bin)
    for res in (r, one_bin):  # the DICE estimate is the exact pooled DICE of thresholding at best_threshold
        assert res["best_dice"] == pytest.approx(pooled_dice(s, m, res["best_threshold"]), abs=1e-12)


def test_per_case_dice_at_stream_threshold_and_case_ids() -> None:
    rng = np.random.default_rng(2)
    s, m = rng.random((6, 9, 9)), rng.random((6, 9, 9)) < 0.2
    ids = ["a", "a", "b", "c", "c", "c"]
    stream = run_stream(s, m, bins=33, case_ids=ids)
    _, d = per_case_dice(s, m, stream["best_threshold"], case_ids=ids)
    assert stream["dice_per_case_mean"] == pytest.approx(np.nanmean(d))
    assert stream["n_cases"] == 3


def test_bounds_shrink_with_more_bins() -> None:
    rng = np.random.default_rng(3)
    s = rng.random((8, 32, 32))
    m = rng.random(s.shape) < 0.05 + 0.4 * (s > 0.8)
    exact = pixel_metrics(s, m)
    widths = []
    for bins in (8, 64, 2048):
        r = run_stream(s, m, bins=bins)
        assert_within_bounds(exact, r)
        widths.append([r[f"{k}_bounds"][1] - r[f"{k}_bounds"][0] for k in KEYS])
    widths = np.array(widths)
    assert (np.diff(widths, axis=0) < 0).all()
    assert (widths[-1] < 5e-3).all()  # 2048 bins for 8k voxels: all three bounds within 0.005


def test_out_of_range_scores_keep_bounds_valid() -> None:
    rng = np.random.default_rng(4)
    s = rng.normal(0.5, 0.4, (4, 10, 10))
    m = rng.random(s.shape) < 0.1 + 0.5 * (s > 0.7)
    stream = run_stream(s, m, bins=50, rng=(0.2, 0.8))
    assert stream["n_out_of_range"] == int(((s < 0.2) | (s > 0.8)).sum()) > 0
    assert_within_bounds(pixel_metrics(s, m), stream)


def test_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(5)
    s, m = rng.random((4, 8, 8)), rng.random((4, 8, 8)) < 0.3
    a, b, whole = (StreamingPixelMetrics(bins=40) for _ in range(3))
    a.update(s[:2], m[:2], case_ids=[0, 1])
    b.update(s[2:], m[2:], case_ids=[2, 3])
    whole.update(s, m)
    assert a.merge(b).compute() == whole.compute()
    # a bin tied within each part but holding different scores across parts is not a tie after merging
    x, y = StreamingPixelMetrics(bins=1, per_case=False), StreamingPixelMetrics(bins=1, per_case=False)
    x.update(np.full((1, 2, 2), 0.3), m[:1, :2, :2] | True)
    y.update(np.full((1, 2, 2), 0.6), ~(m[:1, :2, :2] | True))
    assert not x.mixed.any() and not y.mixed.any() and x.merge(y).mixed.sum() == 1
    assert x.compute()["auroc_bounds"] == [0.0, 1.0]  # one bin: the order of 0.3 and 0.6 is unknown
    with pytest.raises(ValueError, match="same bins"):
        a.merge(StreamingPixelMetrics(bins=41))


def test_streaming_errors_and_degenerate() -> None:
    with pytest.raises(ValueError, match="range"):
        StreamingPixelMetrics(range=(1.0, 1.0))
    with pytest.raises(ValueError, match="bins"):
        StreamingPixelMetrics(bins=0)
    with pytest.raises(ValueError, match="no voxel"):
        StreamingPixelMetrics().compute()
    acc = StreamingPixelMetrics()
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="does not match"):
        acc.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    acc.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.warns(UserWarning, match="no positive"):
        r = acc.compute()
    assert np.isnan(r["ap"]) and np.isnan(r["ap_bounds"]).all()


@settings(max_examples=50, deadline=None)
@given(
    vals=st.lists(st.tuples(st.floats(-0.2, 1.2, allow_nan=False), st.booleans()), min_size=2, max_size=60),
    bins=st.integers(1, 40),
)
def test_property_bounds_contain_exact(vals: list, bins: int) -> None:
    s = np.array([v[0] for v in vals])[None]
    m = np.array([v[1] for v in vals])[None]
    if m.all() or not m.any():
        return
    assert_within_bounds(pixel_metrics(s, m), run_stream(s, m, bins=bins, chunks=1))
