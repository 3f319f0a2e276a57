"""Token-level labels and metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medanomaly.evaluation.metrics import MetricWarning
from medanomaly.evaluation.tokens import token_labels, token_metrics


def test_token_labels_and_metrics() -> None:
    m = np.zeros((1, 4, 4), bool)
    m[0, 0, 0] = True  # token (0, 0): 1/4 of its pixels
    m[0, 2:4, 2:4] = True  # token (1, 1): all
    m[0, 0:2, 2] = True  # token (0, 1): 2/4
    assert token_labels(m, 2).tolist() == [[[True, True], [False, True]]]
    assert token_labels(m, 2, min_fraction=0.5).tolist() == [[[False, True], [False, True]]]
    t = np.array([[[0.3, 0.9], [0.1, 0.8]]])
    r = token_metrics(t, m, 2)
    assert r["ap"] == pytest.approx(average_precision_score([1, 1, 0, 1], [0.3, 0.9, 0.1, 0.8]))
    assert r["auroc"] == 1.0 and r["n_tokens"] == 4 and r["n_pos"] == 3
    fg = np.zeros_like(m)
    fg[0, :2] = True  # only the top row of tokens is evaluated
    with pytest.warns(MetricWarning, match="no negative"):
        r = token_metrics(t, m, 2, foreground=fg)
    assert r["n_tokens"] == 2 and r["n_pos"] == 2
    with pytest.raises(ValueError, match="does not match the mask size"):
        token_metrics(t, m, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        token_labels(np.zeros((1, 5, 4)), 2)


def test_token_metrics_3d_random_against_sklearn() -> None:
    rng = np.random.default_rng(7)
    m = np.zeros((2, 8, 8, 4), bool)
    m[0, 1, 6, 2] = m[1, 5, 5, 0] = m[1, 7, 0, 3] = True  # three of the eight tokens hold a lesion pixel
    t = rng.random((2, 2, 2, 1))
    r = token_metrics(t, m, (4, 4, 4))
    y = np.zeros((2, 2, 2, 1), bool)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                y[n, i, j, 0] = m[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].any()
    assert y.sum() == 3
    assert r["ap"] == pytest.approx(average_precision_score(y.ravel(), t.ravel()))
    assert r["auroc"] == pytest.approx(roc_auc_score(y.ravel(), t.ravel()))
