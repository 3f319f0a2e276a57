"""``patchcore``: the greedy k-center coreset against brute force, the map as nearest-neighbour distance, bad params."""

from __future__ import annotations

import itertools

import pytest
import torch

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.evaluation.metrics import pixel_metrics
from medanomaly.methods import get_method, get_method_class
from medanomaly.methods.patchcore import greedy_coreset

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


def test_map_is_the_distance_to_the_memory_bank_and_localises_toy_lesions(tmp_path: object) -> None:
    params = get_method_class("patchcore").test_params()
    params["encoder"]["train"]["steps"] = 20
    train = make_toy_dataset(n=16, size=32, seed=1)
    test = stack_dataset(make_toy_dataset(n=8, size=32, abnormal_fraction=0.5, seed=2))
    det = get_method("patchcore", **{**params, "sigma": 0.0}).fit(train)
    bank = det.memory_bank_
    assert bank is not None and bank.ndim == 2 and len(bank) >= 1
    res = det.predict(test["image"], test["foreground"])
    m = pixel_metrics(res.pixel_scores.numpy(), test["mask"].numpy()[:, 0], test["foreground"].numpy()[:, 0])
    assert m["auroc"] > 0.7, m
    # the map equals the nearest-neighbour distance of the aggregated features, upsampled
    feats, _ = det._features(test["image"][:1].float())
    q = feats.flatten(2)[0].T
    nn = torch.cdist(q, bank).min(1).values.reshape(feats.shape[2:])
    full = torch.nn.functional.interpolate(nn[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    fg = test["foreground"][0, 0]
    torch.testing.assert_close(res.pixel_scores[0][fg], full[fg], atol=1e-4, rtol=1e-4)


def test_bad_parameters_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="odd"):
        get_method("patchcore", patch_size=2)
    with pytest.raises(ValueError, match="layers"):
        get_method("patchcore", layers=[0, 9])
    with pytest.raises(ValueError, match="coreset_fraction"):
        get_method("patchcore", coreset_fraction=0.0)
