"""``mae``'s optional map post-processing ``score.smooth`` (min- then average pooling, MIM-OOD's): off by default and
then bit-identical to the map before the option existed; on, exactly ``smooth_min_avg`` of the masked map, re-masked;
bad sizes refused at construction; the setting round-trips through a run folder. One tiny MAE (the ``test`` config
set, 20 pre-training steps on 32 px toy images), its weights shared by every detector here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.ndimage import binary_erosion

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.evaluation.postprocess import smooth_min_avg
from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods import get_method, get_method_class, load_detector
from medanomaly.methods.base import RunContext

torch.set_num_threads(1)


def _params(**score: Any) -> dict[str, Any]:
    params = get_method_class("mae").config_set("test")
    params["score"] = {**params.get("score", {}), **score}
    return params


@pytest.fixture(scope="module")
def fitted() -> tuple[Any, dict[str, torch.Tensor]]:
    det = get_method("mae", **_params())
    det.fit(make_toy_dataset(n=12, size=32, seed=1), context=RunContext(quiet=True))
    test = stack_dataset(make_toy_dataset(n=6, size=32, abnormal_fraction=0.5, seed=2))
    return det, test


def _with_weights(fitted_det: Any, **score: Any) -> Any:
    """A detector with ``score`` settings and the fitted detector's MAE weights (no training)."""
    det = get_method("mae", **_params(**score))
    det.load_state_tensors(fitted_det.state_tensors())
    det.is_fitted = True
    return det


def _map_before_the_option(det: Any, images: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The map exactly as ``mae`` computed it before ``score.smooth`` existed (residual averaged over the maskings,
    times the foreground), at the model size."""
    x, f = det._prepare(images, fg)
    s = det.params["score"]
    g = torch.Generator().manual_seed(int(s["seed"]))
    rec = det.mae.reconstruct(x, float(s["mask_ratio"]), int(s["n_masks"]), g, int(det.params["batch_size"]))
    return ((x - rec).abs().mean(1) * f[:, 0]).cpu()


def test_default_is_off_and_bit_identical(fitted: tuple) -> None:
    det, test = fitted
    assert det.params["score"]["smooth"] == {"min_size": 1, "avg_size": 1}
    # a config without the key (a run trained before the option existed) gets the default
    old = {k: v for k, v in _params().items() if k != "score"} | {"score": {"mask_ratio": 0.75, "n_masks": 2, "seed": 1234}}
    assert get_method("mae", **old).params["score"]["smooth"] == {"min_size": 1, "avg_size": 1}
    res = det.predict(test["image"], test["foreground"])
    before = _map_before_the_option(det, test["image"], test["foreground"])
    assert torch.equal(res.pixel_scores, before)
    assert torch.equal(res.image_scores, image_scores(before, test["foreground"].bool(), **det.params["image_score"]))
    # explicit 1/1 is the same as the default
    same = _with_weights(det, smooth={"min_size": 1, "avg_size": 1}).predict(test["image"], test["foreground"])
    assert torch.equal(same.pixel_scores, res.pixel_scores) and torch.equal(same.image_scores, res.image_scores)


@pytest.mark.parametrize(("k_min", "k_avg"), [(3, 5), (5, 1), (1, 3)])
def test_on_is_smooth_min_avg_of_the_masked_map(fitted: tuple, k_min: int, k_avg: int) -> None:
    det, test = fitted
    x, fg = test["image"], test["foreground"]
    off = det.predict(x, fg).pixel_scores
    on = _with_weights(det, smooth={"min_size": k_min, "avg_size": k_avg})
    res = on.predict(x, fg)
    want = smooth_min_avg(off, k_min, k_avg) * fg[:, 0]
    assert torch.equal(res.pixel_scores, want)
    assert not torch.equal(res.pixel_scores, off)
    assert (res.pixel_scores[~fg[:, 0]] == 0).all()  # outside the foreground: as the method leaves it, 0
    assert torch.equal(res.image_scores, image_scores(want, fg.bool(), **on.params["image_score"]))
    # without a foreground the whole map is smoothed
    assert torch.equal(on.predict(x).pixel_scores, smooth_min_avg(det.predict(x).pixel_scores, k_min, k_avg))


def test_min_pool_zeroes_the_foreground_edge(fitted: tuple) -> None:
    """What the docstring says: the min-pool sets the foreground pixels within ``min_size // 2`` px of the edge to 0."""
    det, test = fitted
    x, fg = test["image"], test["foreground"]
    m = _with_weights(det, smooth={"min_size": 3, "avg_size": 1}).predict(x, fg).pixel_scores.numpy()
    f = fg[:, 0].numpy()
    inner = np.stack([binary_erosion(fi, np.ones((3, 3), bool), border_value=1) for fi in f])
    assert (m[f & ~inner] == 0).all()
    assert (m[inner] > 0).mean() > 0.99


@pytest.mark.parametrize("bad", [2, 4, 0, -1, -3, 101, 3.5, True, "3"])
@pytest.mark.parametrize("key", ["min_size", "avg_size"])
def test_bad_sizes_fail_at_construction(key: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"mae: score\.smooth\.{key} = "):
        get_method("mae", **_params(smooth={key: bad}))


def test_round_trip_through_run_folder_and_overrides(fitted: tuple, tmp_path: Path) -> None:
    from medanomaly.app.config import resolve_config

    det, test = fitted
    on = _with_weights(det, smooth={"min_size": 3, "avg_size": 5})
    run = on.save(tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["params"]["score"]["smooth"] == {"min_size": 3, "avg_size": 5}
    again = load_detector(run)
    assert again.params == on.params
    a, b = again.predict(test["image"], test["foreground"]), on.predict(test["image"], test["foreground"])
    assert torch.equal(a.pixel_scores, b.pixel_scores) and torch.equal(a.image_scores, b.image_scores)
    # the command line's --set route (dotted key), typed and checked
    params, _ = resolve_config("mae", config_set="test", overrides={"score.smooth.min_size": 3})
    assert params["score"]["smooth"] == {"min_size": 3, "avg_size": 1}
    with pytest.raises(ValueError, match="odd"):
        resolve_config("mae", config_set="test", overrides={"score.smooth.avg_size": 4})


@pytest.fixture(scope="module")
def amae_pair(fitted: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """``amae`` without a pool (protocol N) on the fitted MAE (``pretrained``), its residual set to ``mae``'s masking."""
    det, test = fitted
    run = det.save(tmp_path_factory.mktemp("mae") / "run")
    params = get_method_class("amae").config_set("test")
    s = det.params["score"]
    params.update(pretrained=str(run), residual={"mask_ratio": s["mask_ratio"], "n_masks": s["n_masks"]})
    params["stage2"] = {**params.get("stage2", {}), "test_seed": s["seed"]}
    am = get_method("amae", **params)
    am.fit(make_toy_dataset(n=12, size=32, seed=1), context=RunContext(quiet=True))
    return det, am, test


def _amae_with(am: Any, **smooth: int) -> Any:
    params = {**am.params, "residual": {**am.params["residual"], "smooth": smooth}}
    other = get_method("amae", **params)
    other.load_state_tensors(am.state_tensors())
    other.is_fitted = True
    return other


def test_amae_residual_map_is_maes_map_and_smooths_the_same(amae_pair: tuple) -> None:
    """``amae``'s no-pool map is ``mae``'s residual map of the same MAE; ``residual.smooth`` does to it exactly what
    ``score.smooth`` does to ``mae``'s (one code path), and leaves the image score (the stage-1 head) alone."""
    det, am, test = amae_pair
    x, fg = test["image"], test["foreground"]
    assert am.params["residual"]["smooth"] == {"min_size": 1, "avg_size": 1}
    off = am.predict(x, fg)
    assert torch.equal(off.pixel_scores, det.predict(x, fg).pixel_scores)
    on = _amae_with(am, min_size=5, avg_size=3).predict(x, fg)
    assert torch.equal(on.pixel_scores, _with_weights(det, smooth={"min_size": 5, "avg_size": 3}).predict(x, fg).pixel_scores)
    assert torch.equal(on.pixel_scores, smooth_min_avg(off.pixel_scores, 5, 3) * fg[:, 0])
    assert torch.equal(on.image_scores, off.image_scores)  # protocol N: the head's probability
    want = image_scores(on.pixel_scores, fg.bool(), **am.params["image_score"])
    assert torch.equal(on.extras["map_image_scores"], want)


@pytest.mark.parametrize("bad", [2, 0, 3.5])
def test_amae_bad_residual_smooth_fails_at_construction(bad: Any) -> None:
    params = get_method_class("amae").config_set("test")
    params["residual"] = {"smooth": {"min_size": 3, "avg_size": bad}}
    with pytest.raises(ValueError, match=r"amae: residual\.smooth\.avg_size = "):
        get_method("amae", **params)
