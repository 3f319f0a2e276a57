"""The two baselines: intensity and autoencoder (2D and 3D, tiny)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.methods import get_method, load_detector
from medanomaly.methods.base import RunContext
from medanomaly.methods.baselines.common import min_avg_smooth

torch.set_num_threads(1)


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy().ravel(), scores.numpy().ravel()))


@pytest.fixture(scope="module")
def toy_test() -> dict:
    return stack_dataset(make_toy_dataset(n=8, size=32, abnormal_fraction=0.5, seed=5))


def test_intensity_finds_bright_lesions_and_sign_inverts(toy_test: dict) -> None:
    train = make_toy_dataset(n=4, size=32, seed=1)
    x, fg, m = toy_test["image"], toy_test["foreground"], toy_test["mask"][:, 0]
    inside = fg[:, 0]
    for normalise in ("image", "dataset", "none"):
        det = get_method("intensity", normalise=normalise).fit(train)
        res = det.predict(x, fg)
        assert _auroc(res.pixel_scores[inside], m[inside]) > 0.9, normalise
        assert _auroc(res.image_scores, toy_test["label"]) > 0.9, normalise
        neg = get_method("intensity", normalise=normalise, sign=-1).fit(train).predict(x, fg)
        assert torch.allclose(neg.pixel_scores[inside], -res.pixel_scores[inside], atol=1e-5)
    det = get_method("intensity", normalise="dataset").fit(train)
    fg_vals = torch.cat([s["image"][s["foreground"]] for s in (train[i] for i in range(len(train)))]).double()
    assert det.stats["mean"] == pytest.approx(float(fg_vals.mean()), rel=1e-6)
    assert det.stats["std"] == pytest.approx(float(fg_vals.std(unbiased=False)), rel=1e-5)


def test_intensity_bad_params() -> None:
    with pytest.raises(ValueError, match="sign = 2: expected one of 1, -1"):
        get_method("intensity", sign=2)
    with pytest.raises(ValueError, match="normalise = 'zscore': expected one of"):
        get_method("intensity", normalise="zscore")
    with pytest.raises(ValueError, match="image_score"):
        get_method("intensity", image_score="median")
    det = get_method("intensity", channel=3).fit(make_toy_dataset(n=2, size=16))
    with pytest.raises(ValueError, match="channel 3 does not exist"):
        det.predict(torch.zeros(1, 1, 16, 16))


def test_smoothing_keeps_shape_and_removes_isolated_peaks() -> None:
    for shape in ((2, 15, 16), (1, 9, 10, 11)):
        m = torch.zeros(shape)
        m[(0, *[s // 2 for s in shape[1:]])] = 1.0  # one isolated hot voxel
        for k_min, k_avg in ((3, 5), (5, 1), (1, 1)):
            out = min_avg_smooth(m, k_min, k_avg)
            assert out.shape == m.shape
            if k_min > 1:
                assert float(out.max()) == 0.0
    block = torch.zeros(1, 12, 12)
    block[0, 3:9, 3:9] = 1.0
    assert float(min_avg_smooth(block, 3, 3)[0, 6, 6]) == 1.0


_AE = {"channels": [4, 8, 8], "strides": [2, 2, 2], "num_res_units": 0, "batch_size": 8, "val_fraction": 0.25,
       "train": {"steps": 40, "lr": 5e-3, "warmup_steps": 0, "val_every": 10, "checkpoint_every": 10}}


def test_autoencoder_trains_and_localises(tmp_path: Path, toy_test: dict) -> None:
    train = make_toy_dataset(n=16, size=32, seed=3)
    det = get_method("autoencoder", **_AE)
    det.fit(train, context=RunContext(work_dir=tmp_path / "work", quiet=True))
    losses = [r["loss"] for r in det.train_log]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(r["stage"] == "autoencoder" for r in det.train_log) and "val" in det.train_log[9]
    assert (tmp_path / "work" / "checkpoints" / "autoencoder.json").exists()
    x, fg = toy_test["image"], toy_test["foreground"]
    res = det.predict(x, fg)
    assert res.extras["reconstruction"].shape == x.shape
    assert float(res.pixel_scores[~fg[:, 0]].abs().max()) == 0.0  # nothing outside the foreground
    # odd sizes are padded to a multiple of the total stride and cropped back
    odd = det.predict(x[:2, :, :30, :29], fg[:2, :, :30, :29])
    assert odd.pixel_scores.shape == (2, 30, 29)
    with pytest.raises(ValueError, match="1-channel 2D"):
        det.predict(torch.zeros(1, 2, 32, 32))
    # resume: a finished checkpoint is reloaded without training again -> same weights
    det2 = get_method("autoencoder", **_AE)
    det2.fit(train, context=RunContext(work_dir=tmp_path / "work", resume=True, quiet=True))
    assert torch.equal(det2.predict(x, fg).pixel_scores, res.pixel_scores)
    run = det.save(tmp_path / "run")
    assert (run / "train_log.jsonl").exists()
    assert torch.equal(load_detector(run).predict(x, fg).pixel_scores, res.pixel_scores)


def test_autoencoder_3d_and_bad_params() -> None:
    det = get_method("autoencoder", **{**_AE, "train": {**_AE["train"], "steps": 3, "checkpoint_every": 0}})
    det.fit(make_toy_dataset(n=4, size=16, spatial_dims=3), context=RunContext(quiet=True))
    assert det.predict(torch.rand(1, 1, 16, 16, 16)).pixel_scores.shape == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="same length"):
        get_method("autoencoder", channels=[4, 8], strides=[2])
    with pytest.raises(ValueError, match="smooth.min_size must be an odd"):
        get_method("autoencoder", smooth={"min_size": 2})
    with pytest.raises(KeyError, match="unknown parameter 'stepz'"):
        get_method("autoencoder", train={"stepz": 3})
    with pytest.raises(ValueError, match="loss = 'huber': expected one of 'l1', 'l2'"):
        get_method("autoencoder", loss="huber")
    with pytest.raises(ValueError, match="empty"):
        get_method("autoencoder").fit(make_toy_dataset(n=2, size=16).subset([]))
