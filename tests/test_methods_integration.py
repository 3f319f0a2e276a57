"""Registry-wide integration test: every registered method, with its ``configs/test.yaml`` parameters.

fit on tiny toy data -> predict (shapes, finite) -> save -> load -> predict again (bit-identical) -> metrics.
The training data is wrapped in a guard that fails on any mask/label access; ``fit`` must not change the
parameters, and a second ``fit`` with the same seed (in 2D) must give the same maps (idempotent).
A new method is picked up automatically; it only has to ship ``configs/test.yaml`` (see ``Detector.test_params``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medanomaly.data import make_toy_dataset
from medanomaly.data.dataset import ImageDataset
from medanomaly.methods import RunFolderError, get_method, get_method_class, list_methods, load_detector
from medanomaly.methods.base import RunContext

torch.set_num_threads(1)

METHODS = list_methods()
CASES = [(m, d) for m in METHODS for d in (2, 3)]


class _GuardedSample(dict):
    def __getitem__(self, key: str) -> object:
        if key in ("mask", "label", "has_mask"):
            raise AssertionError(f"fit read '{key}' of a training sample")
        return super().__getitem__(key)

    def get(self, key: str, default: object = None) -> object:
        return self[key] if key in self else default


class _Guarded(ImageDataset):
    """Training data that fails the test on any label access, even one that bypasses the base class's view."""

    def __init__(self, base: ImageDataset) -> None:
        self.base, self.spatial_dims, self.preset, self.name = base, base.spatial_dims, base.preset, base.name

    def __len__(self) -> int:
        return len(self.base)

    def get(self, i: int) -> dict:
        return _GuardedSample(self.base[i])

    @property
    def labels(self) -> object:
        raise AssertionError("fit read the labels of the training data")

    def subset(self, indices: list[int]) -> ImageDataset:
        return _Guarded(self.base.subset(indices))


def _data(spatial_dims: int) -> tuple:
    n_train, size = (12, 32) if spatial_dims == 2 else (6, 16)
    train = make_toy_dataset(n=n_train, size=size, spatial_dims=spatial_dims, seed=1)
    test = make_toy_dataset(n=6 if spatial_dims == 2 else 4, size=size, spatial_dims=spatial_dims, abnormal_fraction=0.5, seed=2)
    return train, test


@pytest.mark.parametrize(("method", "spatial_dims"), CASES, ids=[f"{m}-{d}d" for m, d in CASES])
def test_method_contract(method: str, spatial_dims: int, tmp_path: Path) -> None:
    cls = get_method_class(method)
    if spatial_dims not in cls.spatial_dims_supported:
        pytest.skip(f"{method} does not support {spatial_dims}D")
    params = cls.test_params()  # a KeyError here means the method ships no configs/test.yaml
    det = get_method(method, **params)
    before = copy.deepcopy(det.get_params())
    train, test = _data(spatial_dims)
    assert det.fit(_Guarded(train), context=RunContext(work_dir=tmp_path / "work", quiet=True)) is det
    assert det.is_fitted
    assert det.get_params() == before, "fit changed the constructor parameters"

    from medanomaly.data import stack_dataset

    batch = stack_dataset(test)
    images, fg = batch["image"], batch["foreground"]
    res = det.predict(images, fg)
    n, spatial = images.shape[0], tuple(images.shape[2:])
    assert tuple(res.pixel_scores.shape) == (n, *spatial)
    assert tuple(res.image_scores.shape) == (n,)
    assert torch.isfinite(res.pixel_scores).all() and torch.isfinite(res.image_scores).all()
    assert res.pixel_scores.float().std() > 0, "the anomaly map is constant"

    run = det.save(tmp_path / "run")
    for f in ("config.yaml", "weights.safetensors", "state.json", "versions.json"):
        assert (run / f).exists(), f
    again = load_detector(run)
    assert type(again) is type(det)
    res2 = again.predict(images, fg)
    assert torch.equal(res.pixel_scores, res2.pixel_scores), "predictions differ after save/load"
    assert torch.equal(res.image_scores, res2.image_scores)

    if spatial_dims == 2:  # idempotent: a second fit (fresh work dir, same seed) gives the same model
        det.fit(_Guarded(train), context=RunContext(work_dir=tmp_path / "work2", quiet=True))
        res3 = det.predict(images, fg)
        assert torch.equal(res.pixel_scores, res3.pixel_scores), "a second fit with the same seed gave other maps"

    try:
        from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
    except ImportError:
        return
    pm = pixel_metrics(res.pixel_scores, batch["mask"], foreground=fg)
    sm = sample_metrics(res.image_scores, batch["label"])
    for k in ("ap", "auroc"):
        assert 0.0 <= pm[k] <= 1.0 and 0.0 <= sm[k] <= 1.0 and not math.isnan(pm[k])


def test_unknown_method_and_param() -> None:
    with pytest.raises(KeyError, match="unknown method 'no-such-method'"):
        get_method("no-such-method")
    for m in METHODS:
        with pytest.raises(KeyError, match="unknown parameter 'no_such_param'"):
            get_method(m, no_such_param=1)


def test_bad_run_folders(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="does not exist"):
        load_detector(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="config.yaml is missing"):
        load_detector(tmp_path / "empty")
    det = get_method("intensity").fit(make_toy_dataset(n=2, size=16))
    run = det.save(tmp_path / "run")
    other = get_method_class("autoencoder")
    with pytest.raises(RunFolderError, match="holds a 'intensity' run, not 'autoencoder'"):
        other.load(run)
    weights = (run / "weights.safetensors").read_bytes()
    (run / "weights.safetensors").unlink()
    with pytest.raises(RunFolderError, match="weights.safetensors is missing"):
        load_detector(run)
    (run / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunFolderError, match="changed since the run finished"):
        load_detector(run)
    (run / "weights.safetensors").write_bytes(weights)
    load_detector(run)
    # hand-edited files: refused by their hash; re-marked (as a tool that rewrites them would), checked by content
    from medanomaly.run_folder import FINISHED_FILE, RunFolder

    def rewrite_config(text: str) -> None:
        (run / "config.yaml").write_text(text)
        folder = RunFolder(run)
        folder.write(config=folder.read_config(), tensors=load_file(str(run / "weights.safetensors")), state={},
                     versions=json.loads((run / "versions.json").read_text()))

    (run / "config.yaml").write_text("method: intensity\nparams: {seed: 1}\n")
    with pytest.raises(RunFolderError, match="changed since the run finished"):
        load_detector(run)
    rewrite_config("method: intensity\nparams: {sgn: 1}\n")
    with pytest.raises(RunFolderError, match="does not fit method 'intensity'"):
        load_detector(run)
    rewrite_config("method: no-such-method\nparams: {}\n")
    with pytest.raises(RunFolderError, match="unknown method"):
        load_detector(run)
    (run / FINISHED_FILE).unlink()
    with pytest.raises(RunFolderError, match="did not finish"):
        load_detector(run)


def test_bad_predict_input() -> None:
    det = get_method("intensity").fit(make_toy_dataset(n=2, size=16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        det.predict(torch.full((1, 1, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="spatial dims"):
        det.predict(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="does not match"):
        det.predict(torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="before predict"):
        get_method("intensity").predict(torch.zeros(1, 1, 16, 16))
