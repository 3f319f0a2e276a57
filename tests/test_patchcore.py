"""``patchcore``: the greedy k-center coreset against brute force, the map from foreground patches only, features
that do not depend on the image's background share, both backbones, save/load, bad params."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.evaluation.metrics import pixel_metrics
from medanomaly.methods import get_method, get_method_class
from medanomaly.methods.patchcore import greedy_coreset
from medanomaly.methods.patchcore.detector import foreground_patch_map

torch.set_num_threads(1)


def _radius(x: torch.Tensor, idx: torch.Tensor) -> float:
    """The largest distance of any row to its nearest chosen row (the k-center objective)."""
    return float(torch.cdist(x, x[idx]).min(1).values.max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_coreset_is_within_twice_the_optimal_radius(seed: int) -> None:
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(seed))
    k = 3
    idx = greedy_coreset(x, k, projection_dim=0, seed=seed)
    assert len(set(idx.tolist())) == k
    best = min(_radius(x, torch.tensor(c)) for c in itertools.combinations(range(len(x)), k))
    assert _radius(x, idx) <= 2 * best + 1e-6
    # each added row is the farthest from those chosen before it
    for i in range(1, k):
        d = torch.cdist(x, x[idx[:i]]).min(1).values
        assert float(d[idx[i]]) == pytest.approx(float(d.max()))


def test_greedy_coreset_edge_cases() -> None:
    x = torch.randn(5, 4)
    assert sorted(greedy_coreset(x, 99, projection_dim=0).tolist()) == list(range(5))  # k capped at n
    assert len(greedy_coreset(x, 0)) == 1  # at least one row
    proj = greedy_coreset(torch.randn(50, 300), 10, projection_dim=16, seed=3)
    assert len(set(proj.tolist())) == 10  # the random projection still gives distinct rows


# ------------------------------------------------------------------------------------------ the map
def _disc(size: int = 32, radius: float = 9.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2) <= radius**2


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_map_ignores_background_patches(sigma: float) -> None:
    """Background patches (far from every healthy bank patch) must not leak into the brain's edge: changing their
    scores leaves the map unchanged, and equal scores on every foreground patch give a flat map on the foreground
    (upsampling all patch scores, then smoothing, then masking gave a bright rim at the brain's edge)."""
    fg = _disc()[None]
    grid = (8, 8)
    w = F.interpolate(fg[:, None].float(), size=grid, mode="area")[:, 0]
    assert bool(((w > 0) & (w < 1)).any()) and bool((w == 0).any())
    flat = torch.ones(1, *grid)
    bright_background = torch.where(w > 0, flat, torch.full_like(flat, 50.0))
    m1 = foreground_patch_map(flat, w, fg, (32, 32), sigma)
    m2 = foreground_patch_map(bright_background, w, fg, (32, 32), sigma)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(m1[fg], torch.ones(int(fg.sum())))
    assert float(m1[~fg].abs().max()) == 0.0
    # partly-inside patches count by their foreground share: a patch 1 of a patch 0 is in between
    rnd = torch.rand(1, *grid, generator=torch.Generator().manual_seed(0))
    m3 = foreground_patch_map(rnd, w, fg, (32, 32), sigma)
    inside = rnd[w > 0]
    assert float(m3[fg].min()) >= float(inside.min()) - 1e-6 and float(m3[fg].max()) <= float(inside.max()) + 1e-6


def test_map_crops_the_padding_and_works_in_3d() -> None:
    fg = _disc(30)[None]  # padded to 32 by the encoder
    w = torch.ones(1, 8, 8)
    s = torch.arange(64.0).reshape(1, 8, 8)
    m = foreground_patch_map(s, w, fg, (32, 32), 0.0)
    full = F.interpolate(s[:, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0, 1:31, 1:31]
    torch.testing.assert_close(m[0][fg[0]], full[fg[0]])
    fg3 = torch.ones(1, 8, 8, 8, dtype=torch.bool)
    m3 = foreground_patch_map(torch.full((1, 4, 4, 4), 2.0), torch.ones(1, 4, 4, 4), fg3, (8, 8, 8), 1.0)
    torch.testing.assert_close(m3, torch.full((1, 8, 8, 8), 2.0))


# ------------------------------------------------------------------------------------------ fitted detectors
def _params(backbone: str, **over: Any) -> dict[str, Any]:
    params = get_method_class("patchcore").test_params()
    params["backbone"] = backbone
    params["encoder"]["train"]["steps"] = 20
    params["multitask"]["train"]["steps"] = 20
    return {**params, **over}


@pytest.fixture(scope="module")
def toy() -> tuple[Any, dict[str, torch.Tensor]]:
    return make_toy_dataset(n=16, size=32, seed=1), stack_dataset(make_toy_dataset(n=8, size=32, abnormal_fraction=0.5, seed=2))


@pytest.mark.parametrize("backbone", ["autoencoder", "multitask"])
def test_map_is_the_distance_to_the_memory_bank_and_localises_toy_lesions(backbone: str, toy: Any) -> None:
    train, test = toy
    det = get_method("patchcore", **_params(backbone, sigma=0.0)).fit(train)
    bank = det.memory_bank_
    assert bank is not None and bank.ndim == 2 and len(bank) >= 1
    res = det.predict(test["image"], test["foreground"])
    m = pixel_metrics(res.pixel_scores.numpy(), test["mask"].numpy()[:, 0], test["foreground"].numpy()[:, 0])
    assert m["auroc"] > 0.7, m
    # the map is the nearest-neighbour distance of the standardised aggregated features, from foreground patches
    feats, padded = det._features(test["image"][:1].float())
    q = (feats.flatten(2)[0].T - det.feature_mean_) / det.feature_std_
    nn = torch.cdist(q, bank).min(1).values.reshape(1, *feats.shape[2:])
    fg = test["foreground"][:1, 0]
    w = F.interpolate(fg[:, None].float(), size=tuple(feats.shape[2:]), mode="area")[:, 0]
    num = F.interpolate((nn * w)[:, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    den = F.interpolate(w[:, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(res.pixel_scores[0][fg[0]], (num / den)[fg[0]], atol=1e-4, rtol=1e-4)
    # standardise: the bank is in units of the training patches' std (their mean 0 before the coreset)
    assert det.feature_std_ is not None and not torch.equal(det.feature_std_, torch.ones_like(det.feature_std_))
    # save / load gives the same maps
    again = get_method("patchcore", **det.params)
    again.load_state_tensors(det.state_tensors())
    again.is_fitted = True
    torch.testing.assert_close(again.predict(test["image"], test["foreground"]).pixel_scores, res.pixel_scores)


def test_standardise_off_keeps_raw_features(toy: Any) -> None:
    det = get_method("patchcore", **_params("autoencoder", standardise=False)).fit(toy[0])
    assert torch.equal(det.feature_mean_, torch.zeros_like(det.feature_mean_))
    assert torch.equal(det.feature_std_, torch.ones_like(det.feature_std_))
    # a weights file of an earlier version (no statistics) loads as raw features
    old = {k: v for k, v in det.state_tensors().items() if k not in ("feature_mean", "feature_std")}
    again = get_method("patchcore", **det.params)
    again.load_state_tensors(old)
    again.is_fitted = True
    x, fg = toy[1]["image"], toy[1]["foreground"]
    torch.testing.assert_close(again.predict(x, fg).pixel_scores, det.predict(x, fg).pixel_scores)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_autoencoder_features_do_not_depend_on_the_background_share(norm: str, toy: Any) -> None:
    """The defect of issue 14: with instance norm, a brain patch's features were normalised by statistics over the
    whole image, so they changed when the brain filled less of the image (small slices scored highest). With the
    default batch norm a patch's features depend on its receptive field only."""
    params = _params("autoencoder")
    if norm == "instance":
        params["encoder"]["norm"] = "instance"
    else:
        assert get_method_class("patchcore").defaults["encoder"]["norm"] == "batch"
        params["encoder"].pop("norm", None)
    det = get_method("patchcore", **params).fit(make_toy_dataset(n=8, size=64, seed=3))
    x = torch.stack([make_toy_dataset(n=1, size=64, seed=4)[0]["image"]])
    smaller = x.clone()
    smaller[..., :, 40:] = 0.0  # a third of the brain becomes background (the slice gets smaller)
    f1, _ = det._features(x)
    f2, _ = det._features(smaller)
    left = slice(0, 8)  # 32 x 32 grid: columns 0-7 (pixels 0-15), far outside the receptive field of the change
    same = torch.allclose(f1[..., left], f2[..., left], atol=1e-5)
    assert same == (norm == "batch")


def test_multitask_backbone_is_member_0_of_the_multitask_method(toy: Any) -> None:
    det = get_method("patchcore", **_params("multitask")).fit(toy[0])
    assert len(det.mt.models) == 1
    assert det.extra_state()["backbone_members"][0]["train_task_names"] == [det.params["multitask"]["tasks"]["names"][0]]
    state = det.state_tensors()
    assert any(k.startswith("backbone.members.0.") for k in state) and not any(k.startswith("net.") for k in state)
    with pytest.raises(ValueError, match="multitask backbone"):
        get_method("patchcore", **{**det.params, "backbone": "autoencoder"}).load_state_tensors(state)


def test_bad_parameters_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="odd"):
        get_method("patchcore", patch_size=2)
    with pytest.raises(ValueError, match="layers"):
        get_method("patchcore", layers=[0, 9])
    with pytest.raises(ValueError, match="layers"):  # depth 4: 3 multitask encoder layers
        get_method("patchcore", backbone="multitask", multitask={"model": {"depth": 4}}, layers=[1, 3])
    with pytest.raises(ValueError, match="coreset_fraction"):
        get_method("patchcore", coreset_fraction=0.0)
    with pytest.raises(ValueError, match="backbone"):
        get_method("patchcore", backbone="mae")
    with pytest.raises(ValueError, match="standardise"):
        get_method("patchcore", standardise="yes")
    with pytest.raises(ValueError, match="multitask"):
        get_method("patchcore", multitask={"tasks": {"train_count": 9}})
