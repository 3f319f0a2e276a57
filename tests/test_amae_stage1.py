"""AMAE stage 1: the lung mask for cropped radiographs, the standardised head, and a head that separates its own
synthetic task (AnatPaste vs clean) on toy data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.methods import get_method, get_method_class, load_detector
from medanomaly.methods.amae import MLPHead
from medanomaly.methods.amae.anatomy import lung_mask, lung_masks
from medanomaly.methods.base import RunContext

torch.set_num_threads(1)


def _cropped_cxr(size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright chest filling the frame with two dark lungs that reach the left/right border (as in PneumoniaMNIST)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    lungs = np.zeros((size, size), bool)
    for cx in (0.12, 0.88):
        lungs |= ((xx - cx) / 0.3) ** 2 + ((yy - 0.5) / 0.38) ** 2 <= 1.0
    img = np.where(lungs, 0.2, 0.85) + rng.normal(0, 0.03, (size, size))
    return img.astype(np.float32), lungs


def test_lung_mask_finds_lungs_touching_the_border() -> None:
    img, lungs = _cropped_cxr()
    assert lungs[:, 0].any() and lungs[:, -1].any()  # the lungs touch the image border
    m = lung_mask(img)
    assert m.shape == img.shape and m.dtype == bool
    assert (m & lungs).sum() / lungs.sum() > 0.85  # most of the lungs ...
    assert (m & ~lungs).sum() / (~lungs).sum() < 0.1  # ... and little else
    batch = lung_masks(torch.from_numpy(np.stack([img, img[:, ::-1].copy()]))[:, None])
    assert batch.shape == (2, 1, 48, 48) and np.array_equal(batch[1, 0], m[:, ::-1])
    flat = lung_mask(np.zeros((32, 32)))  # nothing to find: the central half
    assert flat.sum() == 16 * 16
    with pytest.raises(ValueError, match="NaN"):
        lung_mask(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="2D"):
        lung_mask(np.zeros((2, 3, 8, 8)))


def test_mlp_head_standardises_its_input() -> None:
    f = torch.randn(50, 6) * torch.tensor([100.0, 1, 1, 1, 1, 0.01]) + 5
    head = MLPHead(6, 8)
    head.set_standardization(f)
    z = (f - head.feature_mean) / head.feature_std
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-4) and torch.allclose(z.std(0), torch.ones(6), atol=1e-4)
    assert {"feature_mean", "feature_std"} <= set(head.state_dict())
    with pytest.raises(ValueError, match="features"):
        head.set_standardization(torch.zeros(1, 6))


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    train = make_toy_dataset(n=24, size=32, seed=11)
    torch.manual_seed(0)  # weight init: independent of which tests ran before
    p = get_method_class("mae").config_set("test")
    mae = get_method("mae", **{**p, "pretrain": {**p["pretrain"], "steps": 60}})
    mae.fit(train, context=RunContext(quiet=True))
    return mae.save(tmp_path_factory.mktemp("amae1") / "mae"), train


def test_stage1_head_separates_its_synthetic_task(mae_run: tuple, tmp_path: Path) -> None:
    """The defect this guards against: a head at chance on AnatPaste-vs-clean, so stage-2 pseudo-labels are noise."""
    run, train = mae_run
    p = get_method_class("amae").config_set("test")
    p["stage1"] = {**p["stage1"], "steps": 150, "hidden": 32, "batch_size": 16, "val_every": 50, "lr": 3e-3,
                   "patch": "normal", "feature_norm": "standardize", "flip": True}  # as configs/cpu-small.yaml
    det = get_method("amae", **{**p, "pretrained": str(run)})
    val = make_toy_dataset(n=16, size=32, seed=12)
    det.fit(train, val, context=RunContext(quiet=True))
    info = det.stage1_info
    assert set(info) == {"auroc", "acc"}
    assert info["auroc"] > 0.7, info  # clearly above chance on held-out images
    assert any(r.get("stage") == "stage1_synthetic_val" for r in det.train_log)
    # standardisation statistics travel with the run; the reloaded head scores identically
    test = stack_dataset(make_toy_dataset(n=4, size=32, seed=13))
    again = load_detector(det.save(tmp_path / "run"))
    assert again.stage1_info == info
    assert torch.equal(again.head.feature_std, det.head.feature_std) and not torch.all(det.head.feature_std == 1)
    assert torch.equal(again.predict(test["image"]).image_scores, det.predict(test["image"]).image_scores)
    with pytest.raises(ValueError, match="feature_norm"):
        get_method("amae", **{**p, "pretrained": str(run), "stage1": {**p["stage1"], "feature_norm": "bn"}}).fit(train, val)
