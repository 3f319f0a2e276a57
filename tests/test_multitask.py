"""Tests of the multi-task synthetic-anomaly method (MTMLW): positional channels, U-Net, task folds, detector."""

from __future__ import annotations

import json
from itertools import combinations
from math import comb

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.methods.base import RunContext
from medanomaly.methods.multitask import MultiTaskDetector, MultiTaskUNet, assign_folds, select_combinations, task_combinations
from medanomaly.nets.posenc import PositionalEncoding, coordinate_grid, fourier_features

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- positional channels
def test_coordinate_grid_values():
    g = coordinate_grid((3, 5))
    assert g.shape == (2, 3, 5)
    assert torch.allclose(g[0, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(g[1, 0], torch.linspace(-1, 1, 5))
    assert torch.all(g[0] == g[0][:, :1])  # axis 0 constant along axis 1
    with pytest.raises(ValueError, match="positive"):
        coordinate_grid((0, 4))


def test_fourier_features_match_formula():
    b = torch.tensor([[1.5, -2.0]])
    f = fourier_features((4, 6), b)
    i, j = 2, 3
    phase = 2 * np.pi * (1.5 * i / 4 - 2.0 * j / 6)
    assert f.shape == (2, 4, 6)
    assert f[0, i, j].item() == pytest.approx(np.sin(phase), abs=1e-6)
    assert f[1, i, j].item() == pytest.approx(np.cos(phase), abs=1e-6)


def test_positional_encoding_channels_and_seed():
    pe = PositionalEncoding(3, coords=True, n_fourier=4, fourier_scale=3.0, seed=7)
    assert pe.num_channels == 3 + 8
    x = torch.rand(2, 1, 4, 5, 6)
    z = pe(x)
    assert z.shape == (2, 12, 4, 5, 6)
    assert torch.equal(z[:, :1], x)
    assert torch.equal(z[0, 1:], z[1, 1:])  # same encoding for every image
    again = PositionalEncoding(3, coords=True, n_fourier=4, fourier_scale=3.0, seed=7)(x)
    other = PositionalEncoding(3, coords=True, n_fourier=4, fourier_scale=3.0, seed=8)(x)
    assert torch.equal(z, again) and not torch.equal(z, other)
    assert PositionalEncoding(2, coords=False, n_fourier=0)(torch.rand(1, 1, 4, 4)).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="spatial dims"):
        pe(torch.rand(1, 1, 4, 4))


# ----------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("shape", [(2, 1, 20, 13), (1, 2, 9, 16, 11)])
def test_unet_any_size_and_windowed_prediction(shape):
    dims = len(shape) - 2
    torch.manual_seed(0)
    net = MultiTaskUNet(dims, shape[1], depth=3, base_filters=4, max_filters=8, posenc={"n_fourier": 2}).eval()
    x = torch.rand(shape)
    logits = net(x)
    assert logits.shape == (shape[0], 1, *shape[2:])
    full = net.predict_scores(x)
    assert torch.all((full >= 0) & (full <= 1))
    roi = tuple(max(4, s - 3) for s in shape[2:])
    windowed = net.predict_scores(x, roi_size=roi)
    assert windowed.shape == full.shape and torch.isfinite(windowed).all()
    with pytest.raises(ValueError, match="input must be"):
        net(torch.rand(1, shape[1] + 1, *shape[2:]))


def test_unet_positions_matter():
    """A blob at two places: same response without positional channels (translation equivariance), not with them."""
    a = torch.zeros(1, 1, 64, 64)
    a[0, 0, 19:22, 19:22] = 1
    b = torch.roll(a, shifts=(24, 24), dims=(2, 3))
    diffs = []
    for pe in ({"coords": False, "n_fourier": 0}, {"n_fourier": 2}):
        torch.manual_seed(0)
        net = MultiTaskUNet(2, 1, depth=3, base_filters=4, posenc=pe).eval()
        with torch.no_grad():
            diffs.append(float((net(a)[0, 0, 14:27, 14:27] - net(b)[0, 0, 38:51, 38:51]).abs().max()))
    assert diffs[1] > 20 * diffs[0]
    with pytest.raises(ValueError, match="depth"):
        MultiTaskUNet(2, 1, depth=2)


def test_unet_state_round_trip_without_aliases():
    a = MultiTaskUNet(2, 1, depth=3, base_filters=4)
    state = a.export_state()
    assert not any("skip_layers" in k for k in state)
    b = MultiTaskUNet(2, 1, depth=3, base_filters=4)
    b.import_state(state)
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="do not match"):
        MultiTaskUNet(2, 1, depth=3, base_filters=8).import_state(state)


# ----------------------------------------------------------------------------- folds
@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_task_combinations_cover_all_and_never_share_folds(t):
    combos = task_combinations(5, t)
    assert len(combos) == comb(5, t)
    assert [c.train_tasks for c in combos] == list(combinations(range(5), t))
    for c in combos:
        assert set(c.train_tasks) | set(c.val_tasks) == set(range(5)) and not set(c.train_tasks) & set(c.val_tasks)
        assert not set(c.train_folds) & set(c.val_folds)
        assert len(c.train_folds) >= len(c.val_folds)  # the larger side trains
        assert set(c.val_folds) == (set(c.val_tasks) if t >= 3 else set(c.train_tasks))
    assert len({c.name for c in combos}) == len(combos)
    with pytest.raises(ValueError, match="train_count"):
        task_combinations(5, 5)


def test_select_combinations():
    combos = task_combinations(5, 2)
    picked = select_combinations(combos, max_models=3)
    assert [c.index for c in picked] == [0, 4, 9]
    assert select_combinations(combos, None) == combos
    assert [c.index for c in select_combinations(combos, 3, members=[7, 2])] == [2, 7]
    with pytest.raises(ValueError, match="out of range"):
        select_combinations(combos, members=[10])


def test_assign_folds_groups_and_balance():
    groups = [f"p{i // 7}" for i in range(70)] + [f"q{i}" for i in range(13)]
    folds = assign_folds(groups, 5, seed=3)
    assert folds.shape == (83,) and set(folds) == set(range(5))
    for g in set(groups):
        assert len({folds[i] for i, h in enumerate(groups) if h == g}) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 7
    assert np.array_equal(folds, assign_folds(groups, 5, seed=3))
    with pytest.warns(UserWarning, match="by sample"):
        f2 = assign_folds(["a"] * 6 + ["b"] * 6, 5)
    assert set(f2) == set(range(5))
    with pytest.raises(ValueError, match="at least 5"):
        assign_folds(["a", "b"], 5)


# ----------------------------------------------------------------------------- detector
def _tiny(**over):
    params = MultiTaskDetector.config_set("test")
    params.update(over)
    return MultiTaskDetector(**params)


def test_params_are_checked():
    with pytest.raises(KeyError, match="unknown parameter"):
        MultiTaskDetector(tasks={"train_cnt": 2})
    with pytest.raises(ValueError, match="train_count"):
        MultiTaskDetector(**{"tasks.train_count": 5})
    with pytest.raises(ValueError, match="loss"):
        MultiTaskDetector(loss="l1")
    with pytest.raises(ValueError, match="label_sigma"):
        MultiTaskDetector(**{"tasks.label_sigma_units": "percent"})
    with pytest.raises(ValueError, match="val_metric"):
        MultiTaskDetector(val_metric="dice")
    assert len(MultiTaskDetector(**{"tasks.train_count": 2}).combinations()) == 10
    assert len(MultiTaskDetector(**{"tasks.train_count": 2, "max_models": 4}).combinations()) == 4


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("mt_work")
    ds = make_toy_dataset(20, 24, 2, seed=1)
    det = _tiny()
    det.fit(ds, context=RunContext(work_dir=work, quiet=True))
    return det, ds, work


def test_fit_predict_members_and_validation_state(fitted):
    det, ds, work = fitted
    assert len(det.models) == 2
    from medanomaly.methods.multitask.pool import HealthyPool

    assert det.label_sigma_effective == pytest.approx(0.2 * HealthyPool.from_dataset(ds).foreground_std())
    table = det.validation_table()
    assert [m["name"] for m in table] == [c.name for c in det.combinations()]
    for m in table:
        assert np.isfinite(m["synthetic_val_loss"]) and m["best_step"] is not None
        assert not set(m["train_folds"]) & set(m["val_folds"])
        assert (work / m["name"] / "member.json").exists() and (work / m["name"] / "checkpoints" / "unet.json").exists()
    assert {r["member"] for r in det.train_log} == {m["name"] for m in table}
    b = [ds[i] for i in range(3)]
    x = torch.stack([s["image"] for s in b])
    fg = torch.stack([s["foreground"] for s in b])
    det.params["predict"]["member_maps"] = True
    r = det.predict(x, fg)
    det.params["predict"]["member_maps"] = False
    assert r.pixel_scores.shape == (3, 24, 24) and r.image_scores.shape == (3,)
    assert torch.all(r.pixel_scores[~fg[:, 0]] == 0)
    members = r.extras["member_maps"]
    assert members.shape == (2, 3, 24, 24)
    assert torch.allclose(r.pixel_scores, members.mean(0) * fg[:, 0], atol=1e-6)
    alone = det.predict(x, fg, member=1)
    assert torch.allclose(alone.pixel_scores, members[1] * fg[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="member 2 out of range"):
        det.predict(x, fg, member=2)
    with pytest.raises(ValueError, match="NaN"):
        det.predict(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="channel"):
        det.predict(torch.rand(1, 2, 24, 24))


def test_save_load_reproduces_and_keeps_val_scores(fitted, tmp_path):
    from medanomaly.methods import load_detector

    det, ds, _ = fitted
    x = torch.stack([ds[i]["image"] for i in range(2)])
    det.save(tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [m["synthetic_val_loss"] for m in state["members"]] == [m["synthetic_val_loss"] for m in det.member_info]
    again = load_detector(tmp_path / "run")
    assert isinstance(again, MultiTaskDetector) and len(again.models) == 2
    assert torch.equal(again.predict(x).pixel_scores, det.predict(x).pixel_scores)


def test_refit_reuses_finished_members_and_retrains_on_new_settings(fitted):
    det, ds, work = fitted
    x = torch.stack([ds[i]["image"] for i in range(2)])
    again = _tiny()
    again.fit(ds, context=RunContext(work_dir=work, resume=True, quiet=True))
    assert torch.equal(again.predict(x).pixel_scores, det.predict(x).pixel_scores)
    assert again.member_info == det.member_info
    changed = _tiny(seed=5, members=[0])
    with pytest.warns(UserWarning, match="not resuming.*settings differ"):  # resuming is for the same fit only
        changed.fit(ds, context=RunContext(work_dir=work, resume=True, quiet=True))
    assert not torch.equal(changed.predict(x).pixel_scores, det.predict(x, member=0).pixel_scores)


def test_batches_do_not_depend_on_workers():
    from medanomaly.methods.multitask.detector import TASK_NAMES
    from medanomaly.methods.multitask.pool import HealthyPool, inverted_images
    from medanomaly.methods.multitask.synthesis import BatchFeeder, SynthSpec, SynthStream

    ds = make_toy_dataset(10, 16, 2, seed=2)
    pool = HealthyPool.from_dataset(ds)
    spec = SynthSpec(TASK_NAMES, {}, 0.2, inverted_images(pool))
    stream = SynthStream(pool, np.arange(10), (0, 1, 2, 3, 4), spec, seed=0, member=1, batch_size=3, flip_prob=0.5)
    direct = [stream.batch(s) for s in (0, 1, 2)]
    feeder = BatchFeeder(stream, num_workers=2, steps=3)
    try:
        fed = [feeder(s) for s in (0, 1, 2)]
        resumed = feeder(1)  # an out-of-order step restarts the loader there
    finally:
        feeder.close()
    for (a, b), (c, e) in zip(direct, fed, strict=True):
        assert torch.equal(a, c) and torch.equal(b, e)
    assert torch.equal(resumed[0], direct[1][0])
    assert all(torch.all((y >= 0) & (y <= 1)) for _, y in direct)
    assert any(y.max() > 0 for _, y in direct)


def test_fit_3d_and_bad_input():
    ds = make_toy_dataset(6, 16, 3, seed=0)
    det = _tiny(**{"tasks.names": ["sink", "source", "smooth-intensity"], "tasks.train_count": 2, "max_models": 1,
                   "val_metric": "ap", "tasks.label_sigma_units": "absolute"})
    det.params["predict"]["roi_size"] = [12, 12, 12]
    det.fit(ds)
    assert det.params["spatial_dims"] is None and det.spatial_dims_ == 3  # fitted state, params untouched
    assert det.label_sigma_effective == pytest.approx(0.2)
    assert det.member_info[0]["val_metric"] == "ap" and det.member_info[0]["best_val"] == pytest.approx(
        max(r["val"] for r in det.train_log if "val" in r))
    r = det.predict(torch.stack([ds[0]["image"]]))
    assert r.pixel_scores.shape == (1, 16, 16, 16) and torch.isfinite(r.pixel_scores).all()
    with pytest.raises(ValueError, match="2D images|3D images|spatial dims"):
        det.predict(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 3"):
        _tiny(**{"tasks.names": ["sink", "source", "smooth-intensity"], "tasks.train_count": 1}).fit(make_toy_dataset(2, 16, 2))


def test_inter_source_fallback_and_real_data():
    from medanomaly.methods.multitask.pool import INTER_MAX_IMAGES, HealthyPool, inter_source_images

    pool2 = HealthyPool.from_dataset(make_toy_dataset(6, 16, 2, seed=0))
    inv = inter_source_images("inverted", pool2, True, None)
    assert len(inv) == 6 and np.allclose(inv[0], pool2.images[0].max() + pool2.images[0].min() - pool2.images[0])
    assert inter_source_images(None, pool2, False, None) is None
    with pytest.raises(ValueError, match="inter_source is null"):
        inter_source_images(None, pool2, True, None)
    with pytest.warns(UserWarning, match="contrast-inverted"):  # 'auto' without the data set given
        assert len(inter_source_images("auto", pool2, True, None)) == 6
    with pytest.raises(ValueError, match="pass its healthy images"):  # a named data set must be passed in
        inter_source_images("pneumoniamnist", pool2, True, None)
    # the method asks the pipeline for the data set instead of loading it itself
    params = MultiTaskDetector(**{"tasks.inter_source": "auto"}).get_params()
    assert MultiTaskDetector.data_sources(params) == {
        "inter_source": {"data": "pneumoniamnist", "split": "train", "optional": True}}
    assert MultiTaskDetector.data_sources({**params, "tasks": {**params["tasks"], "inter_source": "inverted"}}) == {}
    from medanomaly.data import data_root, load_dataset

    if data_root(required=False) is None:
        pytest.skip("shared data not available")
    cxr = load_dataset("pneumoniamnist", "train", normal_only=True)
    real = inter_source_images("auto", pool2, True, cxr)  # chest X-rays for brain slices
    assert len(real) == INTER_MAX_IMAGES[2] and real[0].ndim == 3 and real[0].shape[0] == 1
    pool3 = HealthyPool.from_dataset(make_toy_dataset(3, 16, 3, seed=0))
    vols = inter_source_images("auto", pool3, True, cxr)  # extruded into volumes
    assert len(vols) == INTER_MAX_IMAGES[3] and vols[0].ndim == 4 and vols[0].shape[1] == vols[0].shape[-1]


def test_members_trained_in_processes_equal_members_trained_in_turn(tmp_path, monkeypatch):
    """member_jobs=2 (two spawned processes, 1 thread each) trains the same members as one after another with 1
    thread: the same weights, info and maps, and the same member folders (resumable, reusable)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ds = make_toy_dataset(16, 24, 2, seed=3)
    dets = {}
    for jobs in (1, 2):
        det = _tiny(member_jobs=jobs)
        det.fit(ds, context=RunContext(work_dir=tmp_path / f"j{jobs}", quiet=True))
        dets[jobs] = det
    a, b = dets[1], dets[2]
    assert len(a.models) == len(b.models) == 2
    for ma, mb in zip(a.models, b.models, strict=True):
        sa, sb = ma.export_state(), mb.export_state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [m["name"] for m in a.member_info] == [m["name"] for m in b.member_info]
    assert [m["synthetic_val_ap"] for m in a.member_info] == [m["synthetic_val_ap"] for m in b.member_info]
    x = torch.stack([ds[i]["image"] for i in range(3)])
    assert torch.equal(a.predict(x).pixel_scores, b.predict(x).pixel_scores)
    for m in b.member_info:
        assert (tmp_path / "j2" / m["name"] / "member.json").exists()
    # the members folders of the parallel fit are reused by a resumed fit (nothing trained again)
    again = _tiny(member_jobs=2).fit(ds, context=RunContext(work_dir=tmp_path / "j2", resume=True, quiet=True))
    assert all(torch.equal(x1, x2) for m1, m2 in zip(b.models, again.models, strict=True)
               for x1, x2 in zip(m1.export_state().values(), m2.export_state().values(), strict=True))
    with pytest.raises(ValueError, match="member_jobs"):
        MultiTaskDetector(member_jobs=-1)
