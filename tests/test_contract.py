"""The detector contract: parameters, results, data samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.data import ArrayDataset, make_toy_dataset, stack_dataset
from medanomaly.methods.base import AnomalyResult, merge_params
from medanomaly.training.atomic import atomic_write_text


def test_merge_params_nested_and_dotted():
    d = {"a": 1, "tasks": {"train_count": 2, "names": ["x"]}}
    out = merge_params(d, {"a": 3, "tasks.train_count": 4})
    assert out == {"a": 3, "tasks": {"train_count": 4, "names": ["x"]}}
    assert d["tasks"]["train_count"] == 2  # defaults untouched
    out = merge_params(d, {"tasks": {"train_count": 1}})
    assert out["tasks"] == {"train_count": 1, "names": ["x"]}


@pytest.mark.parametrize("bad", [{"b": 1}, {"tasks.nope": 1}, {"a.b": 1}])
def test_merge_params_unknown_key_is_clear(bad):
    with pytest.raises(KeyError, match="unknown parameter"):
        merge_params({"a": 1, "tasks": {"train_count": 2}}, bad, where="m")


def test_anomaly_result_checks_shapes():
    AnomalyResult(torch.zeros(2, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="image_scores"):
        AnomalyResult(torch.zeros(2, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="pixel_scores"):
        AnomalyResult(torch.zeros(2, 4), torch.zeros(2))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "one")
    assert p.read_text() == "one"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("dims", [2, 3])
def test_toy_dataset_samples(dims):
    ds = make_toy_dataset(n=6, size=16, spatial_dims=dims, abnormal_fraction=0.5, seed=1)
    b = stack_dataset(ds)
    assert b["image"].shape == (6, 1) + (16,) * dims
    assert b["image"].min() >= 0 and b["image"].max() <= 1
    assert b["label"].tolist() == [0, 0, 0, 1, 1, 1]
    # lesions only in abnormal cases and inside the foreground
    assert not b["mask"][:3].any() and b["mask"][3:].flatten(1).any(1).all()
    assert not (b["mask"] & ~b["foreground"]).any()
    again = stack_dataset(make_toy_dataset(n=6, size=16, spatial_dims=dims, abnormal_fraction=0.5, seed=1))
    assert torch.equal(b["image"], again["image"])


def test_array_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        ArrayDataset(np.full((2, 1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="must be"):
        ArrayDataset(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="masks shape"):
        ArrayDataset(np.zeros((2, 1, 4, 4)), masks=np.zeros((2, 1, 4, 5)))


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    p = tmp_path / "y.txt"
    atomic_write_text(p, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
