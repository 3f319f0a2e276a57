"""``zscore``, the worked example of docs/adding_a_method.md: statistics against numpy, signs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.data import ArrayDataset
from medanomaly.methods import get_method


def _data(n: int = 7, shape: tuple[int, ...] = (5, 6), seed: int = 0) -> tuple[np.ndarray, ArrayDataset]:
    x = np.random.default_rng(seed).normal(2.0, 0.5, size=(n, 1, *shape)).astype(np.float32)
    return x, ArrayDataset(x)


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5)])
def test_statistics_match_numpy(shape: tuple[int, ...]) -> None:
    x, ds = _data(shape=shape)
    det = get_method("zscore", min_std=1e-6).fit(ds)
    assert np.allclose(det.mean_.numpy(), x[:, 0].mean(0), atol=1e-5)
    assert np.allclose(det.std_.numpy(), x[:, 0].std(0, ddof=1), atol=1e-5)
    probe = torch.from_numpy(x[:2])
    z = (x[:2, 0] - x[:, 0].mean(0)) / x[:, 0].std(0, ddof=1)
    assert np.allclose(det.predict(probe).pixel_scores.numpy(), np.abs(z), atol=1e-4)


def test_sign_foreground_and_floor() -> None:
    x, ds = _data()
    bright = torch.from_numpy(x[:1] + 10.0)
    dark = torch.from_numpy(x[:1] - 10.0)
    up, down = get_method("zscore", sign=1).fit(ds), get_method("zscore", sign=-1).fit(ds)
    assert float(up.predict(dark).pixel_scores.max()) == 0.0 and float(up.predict(bright).pixel_scores.min()) > 0
    assert float(down.predict(bright).pixel_scores.max()) == 0.0
    fg = torch.zeros(1, 1, 5, 6, dtype=torch.bool)
    fg[..., :2, :2] = True
    m = get_method("zscore").fit(ds).predict(bright, fg).pixel_scores
    assert float(m[~fg[:, 0]].abs().max()) == 0.0 and float(m[fg[:, 0]].min()) > 0
    const = ArrayDataset(np.ones((3, 1, 4, 4), np.float32))  # std 0 everywhere: the floor keeps it finite
    assert torch.isfinite(get_method("zscore", min_std=0.1).fit(const).predict(torch.zeros(1, 1, 4, 4)).pixel_scores).all()


def test_bad_input_is_clear() -> None:
    _, ds = _data()
    det = get_method("zscore").fit(ds)
    with pytest.raises(ValueError, match="fitted on"):
        det.predict(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="min_std"):
        get_method("zscore", min_std=0)
    with pytest.raises(ValueError, match="channel 1 does not exist"):
        get_method("zscore", channel=1).fit(ds)
