"""The image-score rule (medanomaly.evaluation.scoring) against a brute-force numpy reference, and every method's
``image_score`` section."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.evaluation import MetricWarning
from medanomaly.evaluation.scoring import IMAGE_SCORE_DEFAULTS, REDUCTIONS, check_image_score, image_scores


def reference(maps: np.ndarray, fg: np.ndarray | None, reduce: str, fraction: float) -> np.ndarray:
    """Brute force, one image at a time: sort the foreground voxels, take the ceil(fraction * n) highest."""
    out = []
    for i in range(maps.shape[0]):
        v = maps[i].ravel().astype(np.float64)
        if fg is not None and fg[i].any():
            v = v[fg[i].ravel().astype(bool)]
        if reduce == "max":
            out.append(v.max())
        elif reduce == "mean":
            out.append(v.mean())
        else:
            k = max(1, math.ceil(round(fraction * v.size, 6)))
            out.append(np.sort(v)[::-1][:k].mean())
    return np.asarray(out)


def _check(maps: np.ndarray, fg: np.ndarray | None, reduce: str, fraction: float) -> None:
    got = image_scores(torch.from_numpy(maps), None if fg is None else torch.from_numpy(fg), reduce, fraction)
    assert got.shape == (maps.shape[0],) and got.dtype == (torch.float64 if maps.dtype == np.float64 else torch.float32)
    np.testing.assert_allclose(got.numpy(), reference(maps, fg, reduce, fraction), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spatial", [(7, 9), (4, 5, 6)])
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("fraction", [1e-4, 0.01, 0.05, 0.3, 1.0])
def test_matches_brute_force_over_foreground_sizes(spatial: tuple[int, ...], reduce: str, fraction: float) -> None:
    rng = np.random.default_rng(len(spatial) * 100 + int(fraction * 1e4))
    n_vox = int(np.prod(spatial))
    maps = rng.normal(size=(6, *spatial)).astype(np.float32)
    fg = np.zeros((6, *spatial), bool)
    for i, size in enumerate([1, 2, 3, n_vox // 3, n_vox - 1, n_vox]):  # foregrounds of several sizes
        fg[i].flat[rng.choice(n_vox, size, replace=False)] = True
    _check(maps, fg, reduce, fraction)
    _check(maps, None, reduce, fraction)
    _check(maps.astype(np.float64), fg, reduce, fraction)


def test_ties_k1_tiny_k_and_rounding() -> None:
    maps = np.array([[5, 5, 5, 1, 0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]], np.float32)
    t = torch.from_numpy(maps)
    assert image_scores(t, None, "topk", 0.2).tolist() == [5.0, 2.0]  # 2 of 10, tied at the top
    assert image_scores(t, None, "topk", 0.4).tolist() == pytest.approx([4.0, 2.0])  # 5, 5, 5, 1
    assert image_scores(t, None, "topk", 1.0).tolist() == pytest.approx([1.6, 2.0])  # fraction 1 is the mean
    assert image_scores(t, None, "topk", 1e-9).tolist() == [5.0, 2.0]  # at least one voxel
    # 0.07 * 100 = 7.000000000000001 in floating point: still 7 voxels, not 8
    ramp = torch.arange(100, dtype=torch.float64)[None]
    assert image_scores(ramp, None, "topk", 0.07).item() == pytest.approx(np.arange(93, 100).mean())
    # ceil, not round: 0.01 * 150 = 1.5 -> 2 voxels (multitask used round -> 2, mae int -> 1)
    assert image_scores(torch.arange(150.0)[None], None, "topk", 0.01).item() == pytest.approx(148.5)
    assert image_scores(torch.arange(140.0)[None], None, "topk", 0.01).item() == pytest.approx(138.5)  # 1.4 -> 2


def test_foreground_shapes_channel_axis_and_dtypes() -> None:
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.random((3, 8, 8)).astype(np.float32))
    fg = torch.from_numpy(rng.random((3, 1, 8, 8)) > 0.5)
    a = image_scores(maps, fg, "topk", 0.1)
    b = image_scores(maps[:, None], fg[:, 0].to(torch.uint8), "topk", 0.1)  # (B, 1, *S) maps, 0/1 foreground
    torch.testing.assert_close(a, b)
    np.testing.assert_allclose(a.numpy(), reference(maps.numpy(), fg[:, 0].numpy(), "topk", 0.1), rtol=1e-6)
    half = image_scores(maps.half(), fg, "mean")
    assert half.dtype == torch.float32
    ints = image_scores(torch.tensor([[1, 2, 3, 4]]), None, "mean")
    assert ints.dtype == torch.float32 and ints.item() == 2.5
    assert image_scores(maps, fg, "max").device == maps.device


def test_empty_foreground_uses_all_voxels_with_one_warning() -> None:
    maps = torch.arange(30, dtype=torch.float32).reshape(3, 10)
    fg = torch.zeros(3, 10, dtype=torch.bool)
    fg[0, :3] = True
    with pytest.warns(MetricWarning, match="2 of 3 image") as rec:
        out = image_scores(maps, fg, "max")
    assert len(rec) == 1
    assert out.tolist() == [2.0, 19.0, 29.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_scores(maps, torch.ones_like(fg), "topk")  # no warning when every foreground is non-empty


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"maps": torch.tensor([[0.0, float("nan")]])}, "1 NaN"),
    ({"maps": torch.tensor([[0.0, float("inf")]])}, "1 infinite"),
    ({"reduce": "median"}, "reduce must be one of max, mean, topk, got 'median'"),
    ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\], got 0.0"),
    ({"fraction": 1.5}, "fraction must be"),
    ({"fraction": True}, "fraction must be"),
    ({"foreground": torch.ones(2, 3, dtype=torch.bool)}, "foreground shape"),
    ({"foreground": torch.full((1, 2), 2)}, "binary"),
    ({"maps": torch.zeros(3)}, "maps must be"),
    ({"maps": np.zeros((1, 2))}, "torch tensor"),
])
def test_bad_input_is_one_clear_error(kwargs: dict, match: str) -> None:
    args = {"maps": torch.zeros(1, 2), "foreground": None, "reduce": "topk", "fraction": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match) as e:
        image_scores(**args)
    assert "\n" not in str(e.value)


def test_check_image_score() -> None:
    assert check_image_score({"reduce": "max", "fraction": 1}, "m") == ("max", 1.0)
    assert check_image_score(dict(IMAGE_SCORE_DEFAULTS)) == ("topk", 0.01)
    with pytest.raises(ValueError, match="^intensity: image_score must be a mapping .* got 'median'$"):
        check_image_score("median", "intensity")
    with pytest.raises(ValueError, match=r"^m: image_score must have exactly .* unknown \['k'\], missing \['fraction'\]$"):
        check_image_score({"reduce": "topk", "k": 0.1}, "m")
    with pytest.raises(ValueError, match="^m: image_score.reduce must be one of"):
        check_image_score({"reduce": "top1", "fraction": 0.01}, "m")
    with pytest.raises(ValueError, match=r"^m: image_score.fraction must be a number in \(0, 1\], got '0.1'$"):
        check_image_score({"reduce": "topk", "fraction": "0.1"}, "m")


@settings(max_examples=40, deadline=None)
@given(
    vals=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=1, max_size=40),
    keep=st.lists(st.booleans(), min_size=40, max_size=40),
    fraction=st.sampled_from([1e-3, 0.1, 0.25, 0.5, 0.99, 1.0]),
    reduce=st.sampled_from(REDUCTIONS),
)
def test_property_ties_and_foregrounds(vals: list, keep: list, fraction: float, reduce: str) -> None:
    maps = np.asarray(vals, np.float64)[None]
    fg = np.asarray(keep[: len(vals)])[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        _check(maps, fg, reduce, fraction)


def test_every_method_declares_the_same_image_score_section() -> None:
    from medanomaly.methods import get_method_class, list_methods

    names = list_methods()
    assert len(names) >= 9
    for name in names:
        cls = get_method_class(name)
        section = cls.defaults.get("image_score")
        assert isinstance(section, dict) and set(section) == set(IMAGE_SCORE_DEFAULTS), name
        check_image_score(section, name)
        for key in ("topk_fraction", "image_score_top"):  # the old keys are gone everywhere
            assert key not in str(cls.defaults), (name, key)
        for config in cls.config_sets():
            params = cls.config_set(config)
            if "image_score" in params:
                check_image_score(params["image_score"], f"{name} configs/{config}.yaml")
            assert "topk_fraction" not in str(params) and "image_score_top" not in str(params), (name, config)


@pytest.mark.parametrize("name", ["intensity", "autoencoder", "multitask", "mae", "mim-ood", "amae", "mae-pseudo"])
def test_methods_score_their_maps_with_the_rule(name: str) -> None:
    """A method's map-derived score is scoring.image_scores of its returned map (amae without a pool and mae-pseudo
    keep their classifier's score and return the map's in extras["map_image_scores"])."""
    from medanomaly.data import make_toy_dataset
    from medanomaly.data.dataset import stack_dataset
    from medanomaly.methods import get_method, get_method_class

    torch.manual_seed(0)
    train = make_toy_dataset(n=8, size=32, spatial_dims=2, abnormal_fraction=0.0, seed=0)
    test = stack_dataset(make_toy_dataset(n=3, size=32, spatial_dims=2, abnormal_fraction=0.5, seed=1))
    det = get_method(name, **{**get_method_class(name).test_params(), "image_score": {"reduce": "topk", "fraction": 0.05}})
    det.fit(train)
    res = det.predict(test["image"], test["foreground"])
    expected = image_scores(res.pixel_scores, test["foreground"], "topk", 0.05)
    got = res.extras["map_image_scores"] if name in ("amae", "mae-pseudo") else res.image_scores
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=1e-5, rtol=1e-5)
