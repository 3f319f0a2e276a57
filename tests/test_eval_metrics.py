"""Exact metrics against scikit-learn and brute-force threshold sweeps, on random and adversarial inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medanomaly.evaluation.metrics import (
    MetricWarning,
    per_case_dice,
    pixel_curves,
    pixel_metrics,
    sample_metrics,
    slice_labels,
)


def brute_best_dice(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pooled DICE at every distinct threshold, by direct counting: (best, highest threshold reaching it)."""
    best, best_t = -1.0, math.nan
    for t in np.unique(s)[::-1]:
        pred = s >= t
        d = 2 * (pred & y).sum() / (pred.sum() + y.sum())
        if d > best + 1e-15:
            best, best_t = d, t
    return best, best_t


def brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def check_against_references(s: np.ndarray, m: np.ndarray, fg: np.ndarray | None = None) -> dict:
    r = pixel_metrics(s, m, fg)
    sel = np.ones_like(m, bool) if fg is None else fg
    ss, yy = s[sel], m[sel]
    assert r["ap"] == pytest.approx(average_precision_score(yy, ss), abs=1e-12)
    assert r["auroc"] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
    assert r["auroc"] == pytest.approx(brute_auroc(ss, yy), abs=1e-12)
    best, best_t = brute_best_dice(ss, yy)
    assert r["best_dice"] == pytest.approx(best, abs=1e-12)
    assert r["best_threshold"] == best_t
    # best DICE = max F1 from scikit-learn's precision-recall curve
    p, rc, _ = precision_recall_curve(yy, ss)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * p * rc / (p + rc))
    assert r["best_dice"] == pytest.approx(f1.max(), abs=1e-12)
    assert r["n_voxels"] == sel.sum() and r["n_positive"] == yy.sum()
    return r


@pytest.mark.parametrize("seed", range(6))
def test_random_continuous_and_tied_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, 9, 7) if seed % 2 else (2, 5, 6, 4)
    s = rng.random(shape)
    if seed >= 3:  # heavy ties: few distinct values
        s = rng.integers(0, 4, shape).astype(np.float32)
    m = rng.random(shape) < 0.2
    m.flat[0] = True
    m.flat[1] = False
    check_against_references(s, m)
    fg = rng.random(shape) < 0.7
    fg.flat[:2] = True
    check_against_references(s, m, fg)


def test_foreground_excludes_voxels_outside() -> None:
    rng = np.random.default_rng(1)
    s, m = rng.random((2, 8, 8)), rng.random((2, 8, 8)) < 0.3
    fg = np.zeros_like(m)
    fg[:, 2:6, 2:6] = True
    changed = s.copy()
    changed[~fg] = rng.random((~fg).sum()) * 100  # anything outside the foreground must not matter
    a, b = pixel_metrics(s, m, fg), pixel_metrics(changed, m, fg)
    for k in ("ap", "auroc", "best_dice", "best_threshold", "dice_per_case_mean"):
        assert a[k] == b[k]


def test_shapes_channel_axis_and_torch() -> None:
    rng = np.random.default_rng(2)
    s, m = rng.random((3, 1, 6, 6)).astype(np.float32), rng.random((3, 1, 6, 6)) < 0.3
    ref = pixel_metrics(s[:, 0], m[:, 0])
    assert pixel_metrics(torch.from_numpy(s), torch.from_numpy(m)) == ref
    assert pixel_metrics(s, m[:, 0].astype(np.uint8)) == ref
    assert pixel_metrics(torch.from_numpy(s).bfloat16().float(), m)["n_voxels"] == 108


def test_constant_scores() -> None:
    m = np.zeros((2, 5, 5), bool)
    m[0, :2] = True  # 10 positives of 50
    r = pixel_metrics(np.full((2, 5, 5), 0.3), m)
    assert r["ap"] == pytest.approx(0.2)
    assert r["auroc"] == 0.5
    assert r["best_dice"] == pytest.approx(2 * 10 / (50 + 10))
    assert r["best_threshold"] == 0.3
    check_against_references(np.full((2, 5, 5), 0.3), m)


def test_single_positive_voxel() -> None:
    rng = np.random.default_rng(3)
    s = rng.random((1, 10, 10))
    m = np.zeros_like(s, bool)
    m[0, 4, 4] = True
    r = check_against_references(s, m)
    s[0, 4, 4] = 2.0  # now the top score: perfect
    r = pixel_metrics(s, m)
    assert r["ap"] == 1.0 and r["auroc"] == 1.0 and r["best_dice"] == 1.0 and r["best_threshold"] == 2.0


def test_all_negative_gives_nan_with_warning() -> None:
    with pytest.warns(MetricWarning, match="no positive"):
        r = pixel_metrics(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4), bool))
    assert math.isnan(r["ap"]) and math.isnan(r["auroc"]) and math.isnan(r["best_dice"]) and math.isnan(r["best_threshold"])
    assert r["n_positive"] == 0 and r["n_cases_dice"] == 0


def test_all_positive() -> None:
    s = np.random.default_rng(0).random((2, 4, 4))
    with pytest.warns(MetricWarning, match="no negative"):
        r = pixel_metrics(s, np.ones((2, 4, 4), bool))
    assert r["ap"] == 1.0 and math.isnan(r["auroc"])
    assert r["best_dice"] == 1.0 and r["best_threshold"] == s.min()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scores": np.zeros((2, 4, 4)), "masks": np.zeros((2, 4, 5))}, "does not match"),
        ({"scores": np.full((2, 4, 4), np.nan), "masks": np.zeros((2, 4, 4))}, "NaN"),
        ({"scores": np.array([[[0.0, np.inf]]]), "masks": np.zeros((1, 1, 2))}, "infinite"),
        ({"scores": np.zeros((2, 4, 4)), "masks": np.full((2, 4, 4), 0.5)}, "binary"),
        ({"scores": np.zeros((0, 4, 4)), "masks": np.zeros((0, 4, 4))}, "empty"),
        ({"scores": np.zeros((2, 4, 4)), "masks": np.zeros((2, 4, 4)), "foreground": np.zeros((2, 4, 4))}, "foreground is empty"),
        ({"scores": np.zeros((2, 4, 4)), "masks": np.zeros((2, 4, 4)), "foreground": np.ones((2, 3, 4))}, "foreground shape"),
        ({"scores": np.zeros(5), "masks": np.zeros(5)}, r"\(N, \*spatial\)"),
        ({"scores": np.array([["a", "b"]]), "masks": np.zeros((1, 2))}, "real numbers"),
    ],
)
def test_bad_input_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pixel_metrics(**kwargs)


def test_per_case_dice_hand_computed() -> None:
    s = np.zeros((3, 1, 4))
    m = np.zeros((3, 1, 4), bool)
    s[0, 0, :2] = 1
    m[0, 0, 1:3] = True  # case 0: pred {0,1}, mask {1,2}: DICE 2*1/(2+2) = 0.5
    s[1, 0, :] = 1
    m[1, 0, :] = True  # case 1: perfect
    s[2, 0, 0] = 1  # case 2: no lesion, one false positive
    keys, d = per_case_dice(s, m, 1.0)
    assert keys.tolist() == [0, 1, 2]
    np.testing.assert_allclose(d[:2], [0.5, 1.0])
    assert math.isnan(d[2])
    _, d_all = per_case_dice(s, m, 1.0, dice_cases="all")
    np.testing.assert_allclose(d_all, [0.5, 1.0, 0.0])
    _, d_none = per_case_dice(np.zeros((1, 1, 4)), np.zeros((1, 1, 4)), 1.0, dice_cases="all")
    assert d_none.tolist() == [1.0]  # empty mask, empty prediction
    keys, d_grp = per_case_dice(s, m, 1.0, case_ids=["a", "a", "b"])  # slices of one patient pooled
    assert keys.tolist() == ["a", "b"]
    assert d_grp[0] == pytest.approx(2 * 5 / (6 + 6))
    r = pixel_metrics(s, m)
    assert r["best_threshold"] == 1.0
    assert r["dice_per_case_mean"] == pytest.approx(0.75) and r["dice_per_case_std"] == pytest.approx(0.25)
    assert r["n_cases_dice"] == 2 and r["n_cases"] == 3
    with pytest.raises(ValueError, match="dice_cases"):
        per_case_dice(s, m, 1.0, dice_cases="some")


def test_pixel_curves_match_sklearn() -> None:
    rng = np.random.default_rng(5)
    s, m = rng.integers(0, 30, (2, 10, 10)).astype(float), rng.random((2, 10, 10)) < 0.3
    c = pixel_curves(s, m)
    p, r, t = precision_recall_curve(m.ravel(), s.ravel())
    np.testing.assert_allclose(c["precision"], p[:-1][::-1])
    np.testing.assert_allclose(c["recall"], r[:-1][::-1])
    np.testing.assert_allclose(c["thresholds"], t[::-1])
    fpr, tpr, _ = roc_curve(m.ravel(), s.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(c["fpr"], fpr)
    np.testing.assert_allclose(c["tpr"], tpr)
    thin = pixel_curves(rng.random((4, 50, 50)), rng.random((4, 50, 50)) < 0.1, max_points=100)
    assert len(thin["precision"]) <= 100 and thin["tpr"][-1] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.booleans()), min_size=2, max_size=40),
    scale=st.sampled_from([1.0, 0.1, 1e-7]),
)
def test_property_matches_sklearn_and_brute_force(data: list, scale: float) -> None:
    s = np.array([d[0] for d in data], float)[None] * scale
    m = np.array([d[1] for d in data])[None]
    fg = np.array([d[2] for d in data])[None]
    fg[0, 0] = True
    for f in (None, fg):
        y = m[0] if f is None else m[f]
        if y.all() or not y.any():
            continue
        check_against_references(s, m, f)


# ---------------------------------------------------------------------------------------------------------------- sample


def test_sample_metrics_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 50).astype(float), rng.random(50) < 0.4
    r = sample_metrics(s, y.astype(int))
    assert r["ap"] == pytest.approx(average_precision_score(y, s))
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert r["n"] == 50 and r["n_pos"] == y.sum() and r["n_unknown"] == 0
    lab = y.astype(int)
    lab[:5] = -1  # unknown labels are left out
    r2 = sample_metrics(torch.from_numpy(s), torch.from_numpy(lab))
    assert r2["auroc"] == pytest.approx(roc_auc_score(y[5:], s[5:])) and r2["n"] == 45 and r2["n_unknown"] == 5


def test_sample_metrics_bad_and_degenerate() -> None:
    with pytest.raises(ValueError, match="0, 1 or -1"):
        sample_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="2 sample scores but 3 labels"):
        sample_metrics([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        sample_metrics([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="unknown"):
        sample_metrics([0.1, 0.2], [-1, -1])
    with pytest.warns(MetricWarning):
        r = sample_metrics([0.1, 0.2, 0.3], [0, 0, 0])
    assert math.isnan(r["ap"]) and math.isnan(r["auroc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sample_metrics([0.5, 0.5], [0, 1])["auroc"] == 0.5


def test_slice_labels() -> None:
    m = np.zeros((3, 10, 10), bool)
    m[1, 0, 0] = True
    m[2, :5] = True
    assert slice_labels(m).tolist() == [0, 1, 1]
    assert slice_labels(m, min_fraction=0.1).tolist() == [0, 0, 1]
    fg = np.zeros_like(m)
    fg[:, 5:] = True  # the lesion of image 2 lies outside the foreground
    fg[1, 0, 0] = True
    assert slice_labels(m, foreground=fg).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="binary"):
        slice_labels(m * 2)


def test_per_case_ap_auroc_against_sklearn() -> None:
    """Per-case AP/AUROC: sklearn within each case (slices grouped by id), cases without both classes skipped."""
    rng = np.random.default_rng(7)
    s = rng.random((9, 6, 6)).round(2)  # ties
    m = rng.random((9, 6, 6)) < 0.2
    m[6:] = False  # case "c" (slices 6-8) has no lesion
    f = rng.random((9, 6, 6)) < 0.8
    ids = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    out = pixel_metrics(s, m, foreground=f, case_ids=ids)
    aps, aucs = [], []
    for rows in (slice(0, 3), slice(3, 6)):
        y, x = m[rows][f[rows]], s[rows][f[rows]]
        aps.append(average_precision_score(y, x))
        aucs.append(roc_auc_score(y, x))
    assert out["n_cases_ranking"] == 2
    assert out["ap_per_case_mean"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert out["ap_per_case_std"] == pytest.approx(np.std(aps), abs=1e-12)
    assert out["auroc_per_case_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert "ap_per_case_mean" not in pixel_metrics(s, m, foreground=f)  # per image only with ids
