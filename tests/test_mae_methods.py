"""The MAE-family detectors: ``mae``, ``amae`` (stage 1 and stage 2) and ``mae-pseudo`` on tiny toy data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medanomaly.data import ImageDataset, make_toy_dataset, stack_dataset
from medanomaly.methods import get_method, get_method_class, load_detector
from medanomaly.methods.amae import pseudo_label
from medanomaly.methods.base import RunContext

torch.set_num_threads(1)

METHODS = ("mae", "amae", "mae-pseudo")


def _det(name: str, **over: Any) -> Any:
    params = get_method_class(name).config_set("test")
    params.update(over)
    return get_method(name, **params)


@pytest.fixture(scope="module")
def data() -> tuple[ImageDataset, dict[str, Any]]:
    train = make_toy_dataset(n=12, size=32, seed=1)
    test = stack_dataset(make_toy_dataset(n=6, size=32, abnormal_fraction=0.5, seed=2))
    return train, test


class _ImagesOnly(ImageDataset):
    """A pool whose samples carry no label and no mask: reading them would raise a KeyError."""

    def __init__(self, base: ImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def get(self, i: int) -> dict[str, Any]:
        s = self.base[i]
        return {"image": s["image"], "foreground": s["foreground"], "case_id": s["case_id"]}

    @property
    def labels(self) -> np.ndarray:
        raise AssertionError("the unlabeled pool's labels were read")


@pytest.mark.parametrize("name", METHODS)
def test_bad_input_and_unfitted(name: str, data: tuple) -> None:
    _, test = data
    det = _det(name)
    with pytest.raises(RuntimeError, match="fit"):
        det.predict(test["image"])
    with pytest.raises(ValueError, match="empty"):
        det.fit(make_toy_dataset(n=4, size=32).subset([]))


def test_amae_stage2_with_unlabeled_pool_and_pretrained(data: tuple, tmp_path: Path) -> None:
    train, test = data
    mae = _det("mae")
    mae.fit(train, context=RunContext(quiet=True))
    mae_run = mae.save(tmp_path / "mae")
    pool = _ImagesOnly(make_toy_dataset(n=10, size=32, abnormal_fraction=0.5, seed=3))
    det = _det("amae", pretrained=str(mae_run))
    det.fit(train, unlabeled=pool, context=RunContext(work_dir=tmp_path / "work", quiet=True))
    assert det.train_log[0] == {"stage": "pretrain", "loaded_from": str(mae_run)}  # no pre-training of its own
    enc = {k: v for k, v in det.state_tensors().items() if k.startswith("mae.")}
    assert all(torch.equal(v, mae.state_tensors()[k]) for k, v in enc.items())
    info = det.pool_info
    assert info["pool_size"] == 10 and info["pseudo_normal"] + info["pseudo_abnormal"] <= 10 and info["pseudo_abnormal"] >= 1
    for f in ("stage1/checkpoints/head.json", "stage2/checkpoints/module_a.json", "stage2/checkpoints/module_b.json"):
        assert (tmp_path / "work" / f).exists(), f
    res = det.predict(test["image"], test["foreground"])
    assert res.pixel_scores.shape == (6, 32, 32) and "reconstructions_b" in res.extras
    assert torch.allclose(res.image_scores, det._masked_mean(res.pixel_scores, test["foreground"]), atol=1e-6)
    assert (res.pixel_scores[~test["foreground"][:, 0]] == 0).all()
    again = load_detector(det.save(tmp_path / "run"))
    assert again.pool_info == info and again.mae_b is not None
    assert torch.equal(again.predict(test["image"], test["foreground"]).pixel_scores, res.pixel_scores)
    # stage 1 only (no pool): the image score is the head's probability
    det1 = _det("amae", pretrained=str(mae_run))
    det1.fit(train)
    r1 = det1.predict(test["image"], test["foreground"])
    assert det1.mae_b is None and torch.equal(r1.image_scores, r1.extras["stage1_scores"])
    assert ((r1.image_scores >= 0) & (r1.image_scores <= 1)).all()


def test_pseudo_label_per_class_top_half() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.45])
    normal, abnormal, fb = pseudo_label(p, keep_fraction=0.5, min_abnormal=1)
    assert not fb
    assert abnormal.tolist() == [0, 1]  # 4 predicted abnormal -> the 2 most confident
    assert normal.tolist() == [6, 7, 8]  # 6 predicted normal -> the 3 most confident (lowest p)
    normal, abnormal, fb = pseudo_label(np.full(8, 0.1) + np.arange(8) * 0.01, min_abnormal=2, fallback_fraction=0.25)
    assert fb and abnormal.tolist() == [6, 7] and not set(normal) & set(abnormal)
    with pytest.raises(ValueError, match="non-empty"):
        pseudo_label(np.array([]))


def test_predict_resizes_to_input_and_checks_channels(data: tuple) -> None:
    train, _ = data
    det = _det("mae")
    det.fit(train)
    x48 = stack_dataset(make_toy_dataset(n=2, size=48, seed=4))
    res = det.predict(x48["image"], x48["foreground"])
    assert res.pixel_scores.shape == (2, 48, 48)
    with pytest.raises(ValueError, match="channels"):
        det.predict(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        det.predict(torch.full((1, 1, 32, 32), float("nan")))
    # an image's map does not depend on the batch it comes in
    one = det.predict(x48["image"][1:2], x48["foreground"][1:2])
    assert torch.allclose(one.pixel_scores[0], res.pixel_scores[1], atol=1e-6)


def test_mae_pseudo_maps_and_synthetic_selection(data: tuple) -> None:
    train, test = data
    det = _det("mae-pseudo")
    det.fit(train)
    vals = [r["val"] for r in det.train_log if r.get("stage") == "classifier" and "val" in r]
    assert vals, "the classifier is selected on a synthetic validation set held out of train"
    full = det.predict(test["image"], test["foreground"])
    det.params["pixel_map"]["kind"] = "residual"
    plain = det.predict(test["image"], test["foreground"])
    assert torch.equal(full.image_scores, plain.image_scores)
    assert not torch.allclose(full.pixel_scores, plain.pixel_scores)
    assert torch.allclose(plain.pixel_scores, full.extras["residuals"] * test["foreground"][:, 0])
    det.params["pixel_map"]["kind"] = "nonsense"
    with pytest.raises(ValueError, match="pixel_map.kind"):
        det.predict(test["image"])


@pytest.mark.slow
def test_mae_residual_localises_toy_lesions() -> None:
    """A briefly trained MAE reconstructs healthy toy anatomy and not the bright blobs: the lesion pixels score higher."""
    from sklearn.metrics import roc_auc_score

    train = make_toy_dataset(n=48, size=32, seed=5)
    test = stack_dataset(make_toy_dataset(n=8, size=32, abnormal_fraction=1.0, seed=6))
    det = _det("mae", pretrain={"steps": 250, "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "val_every": 0,
                                "checkpoint_every": 0, "mask_ratio": 0.75, "flip": True})
    det.fit(train)
    res = det.predict(test["image"], test["foreground"])
    fg = test["foreground"][:, 0]
    auroc = roc_auc_score(test["mask"][:, 0][fg].numpy(), res.pixel_scores[fg].numpy())
    assert auroc > 0.88, auroc  # an untrained MAE gives ~0.79 (bright blobs), 250 steps ~0.93
