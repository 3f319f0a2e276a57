"""Tests of the domain-shift augmentation (medanomaly.data.augment) and its use in the multitask synthesis stream."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.data.augment import AUGMENT_DEFAULTS, PARTS, DomainShift
from medanomaly.methods.base import RunContext
from medanomaly.methods.multitask import MultiTaskDetector
from medanomaly.methods.multitask.detector import TASK_NAMES
from medanomaly.methods.multitask.pool import HealthyPool, inverted_images
from medanomaly.methods.multitask.synthesis import BatchFeeder, SynthSpec, SynthStream, make_augment
from medanomaly.methods.params import ParameterError

torch.set_num_threads(1)

OFF = {"rotate_deg": 0.0, "scale": (1.0, 1.0), "low_res": (1.0, 1.0), "bias_field": 0.0, "gamma": (1.0, 1.0),
       "scale_intensity": (1.0, 1.0)}


def _brain(dims: int, size: int = 20, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A [0, 1] image with a textured ellipsoid foreground and an exactly-zero background."""
    g = np.meshgrid(*[np.linspace(-1, 1, size)] * dims, indexing="ij")
    fg = sum((c / r) ** 2 for c, r in zip(g, (0.7, 0.55, 0.6), strict=False)) < 1
    rng = np.random.default_rng(seed)
    img = (0.3 + 0.5 * rng.random((channels, *fg.shape))).astype(np.float32) * fg
    return img, fg


@pytest.mark.parametrize("dims", [2, 3])
def test_deterministic_shapes_and_dtypes(dims):
    img, fg = _brain(dims, 16 if dims == 3 else 24, channels=2)
    aug = DomainShift(p=1.0, value_range=(0.0, 1.0))
    before = img.copy(), fg.copy()
    a = aug(img, fg, np.random.default_rng(7))
    b = pickle.loads(pickle.dumps(aug))(img, fg, np.random.default_rng(7))  # as in a DataLoader worker
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == img.shape and a[0].dtype == np.float32 and a[0].flags.c_contiguous
    assert a[1].shape == fg.shape and a[1].dtype == bool
    assert np.array_equal(img, before[0]) and np.array_equal(fg, before[1])  # inputs untouched
    assert not np.array_equal(a[0], img)
    c = aug(img, fg, np.random.default_rng(8))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("dims", [2, 3])
def test_geometry_moves_image_and_foreground_together_background_zero(dims):
    size = 16 if dims == 3 else 32
    _, fg = _brain(dims, size)
    img = (0.6 * fg)[None].astype(np.float32)  # constant inside: the image's support is the foreground
    aug = DomainShift(p=1.0, **{**OFF, "rotate_deg": 30.0, "scale": (1.15, 1.25)})
    out, f = aug(img, fg, np.random.default_rng(3))
    assert not np.array_equal(f, fg)  # moved
    assert f.sum() > fg.sum() * 1.1  # zoomed in by >= 1.15 per axis
    assert np.all(out[:, ~f] == 0)  # background exactly 0 outside the transformed foreground
    inside = out[0] > 0.3  # the bilinear image, thresholded, is the nearest-neighbour mask up to the rim
    iou = (inside & f).sum() / (inside | f).sum()
    assert iou > 0.9
    # same draw of a part -> same geometry for another image of the same shape
    out2, f2 = aug(np.ascontiguousarray(img * 0.5), fg, np.random.default_rng(3))
    assert np.array_equal(f, f2) and np.allclose(out2, out * 0.5, atol=1e-6)


def test_intensity_parts_act_in_foreground_only_and_keep_range():
    img, fg = _brain(2, 32)
    img = img + 0.2 * ~fg  # a non-zero background: kept as it is by the intensity parts
    strong = {**OFF, "low_res": (2.0, 3.0), "bias_field": 1.0, "gamma": (0.3, 3.0), "scale_intensity": (0.5, 3.0)}
    for seed in range(6):
        out, f = DomainShift(p=1.0, value_range=(0.0, 1.0), **strong)(img, fg, np.random.default_rng(seed))
        assert np.array_equal(f, fg)
        assert np.array_equal(out[:, ~fg], img[:, ~fg].astype(np.float32))
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not np.allclose(out[:, fg], img[:, fg])
    # default clip range: the input image's own [min, max]
    out, _ = DomainShift(p=1.0, **strong)(img * 0.5, fg, np.random.default_rng(1))
    assert out.min() >= (img * 0.5).min() and out.max() <= (img * 0.5).max() + 1e-7


def test_every_part_changes_the_image_and_off_is_identity():
    img, fg = _brain(2, 32)
    on = {"geometry": {"rotate_deg": 20.0}, "low_res": {"low_res": (2.0, 2.0)}, "bias_field": {"bias_field": 0.5},
          "gamma": {"gamma": (2.0, 2.0)}, "scale_intensity": {"scale_intensity": (0.5, 0.5)}}
    assert set(on) == set(PARTS)
    for part, kw in on.items():
        aug = DomainShift(p=1.0, **{**OFF, **kw})
        assert aug.active_parts() == [part]
        assert not np.array_equal(aug(img, fg, np.random.default_rng(0))[0], img), part
    for aug in (DomainShift(p=1.0, **OFF), DomainShift(p=0.0)):
        assert aug.active_parts() == []
        out, f = aug(img, fg, np.random.default_rng(0))
        assert np.array_equal(out, img) and np.array_equal(f, fg)


def test_bad_settings_are_refused():
    for kw, msg in [({"gamma": (1.5, 0.7)}, r"augment\.gamma.*low end exceeds"), ({"p": 1.5}, r"augment\.p"),
                    ({"low_res": (0.5, 2.0)}, r"augment\.low_res"), ({"scale": (0.9,)}, r"augment\.scale"),
                    ({"rotate_deg": float("nan")}, r"augment\.rotate_deg"), ({"bias_field": -1}, r"augment\.bias_field")]:
        with pytest.raises(ValueError, match=msg):
            DomainShift(**kw)
    with pytest.raises(ValueError, match="unknown setting"):
        DomainShift.from_params({"gama": [1, 2]})
    with pytest.raises(ValueError, match=r"expected an image \(C, H, W\)"):
        DomainShift(p=1.0)(np.zeros((4, 4), np.float32), np.ones(4, bool), np.random.default_rng(0))
    # in the method's config: checked when the detector is built, one line naming the key
    with pytest.raises(ValueError, match=r"multitask: augment\.gamma = \[1\.5, 0\.7\]: the low end exceeds"):
        MultiTaskDetector(**{"augment.gamma": [1.5, 0.7]})
    with pytest.raises(ParameterError, match=r"augment\.p"):
        MultiTaskDetector(**{"augment.p": 2})
    with pytest.raises(ParameterError, match=r"augment\.low_res\[0\]"):
        MultiTaskDetector(**{"augment.low_res": [0.5, 2]})
    with pytest.raises(ParameterError, match=r"augment\.enabled"):
        MultiTaskDetector(**{"augment.enabled": "yes"})
    with pytest.raises(KeyError, match="unknown parameter 'augment.rotate'"):
        MultiTaskDetector(**{"augment.rotate": 5})


def test_config_block_off_everywhere_and_in_the_member_key():
    assert MultiTaskDetector.defaults["augment"] == AUGMENT_DEFAULTS and not AUGMENT_DEFAULTS["enabled"]
    for name in MultiTaskDetector.config_sets():
        assert MultiTaskDetector(**MultiTaskDetector.config_set(name)).params["augment"]["enabled"] is False, name
    off = MultiTaskDetector()
    h_off = off._config_hash()
    assert MultiTaskDetector(**{"augment.gamma": [0.5, 2.0]})._config_hash() == h_off  # off: settings do not matter
    on = MultiTaskDetector(**{"augment.enabled": True})
    on2 = MultiTaskDetector(**{"augment.enabled": True, "augment.gamma": [0.5, 2.0]})
    assert len({h_off, on._config_hash(), on2._config_hash()}) == 3
    parts = [MultiTaskDetector.shared_parts(d.params)["multitask.members"] for d in (off, on, on2)]
    assert "augment" not in parts[0] and parts[1]["augment"] != parts[2]["augment"]
    # the hash with augment off is the one of the settings without the block (members trained before are reused);
    # member_jobs (how members are scheduled, added later) is not in it either
    import hashlib
    import json

    keep = {k: v for k, v in off.params.items() if k not in ("predict", "image_score", "members", "max_models",
                                                              "num_workers", "reuse_members_from", "augment",
                                                              "member_jobs")}
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in ("device", "checkpoint_every")}
    assert h_off == hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- in the synthesis stream
@pytest.fixture(scope="module")
def pool():
    return HealthyPool.from_dataset(make_toy_dataset(10, 16, 2, seed=2))


def _stream(pool, augment=None, **kw):
    spec = SynthSpec(TASK_NAMES, {}, 0.2, inverted_images(pool))
    return SynthStream(pool, np.arange(10), (0, 1, 2, 3, 4), spec, seed=0, member=1, batch_size=3, flip_prob=0.5,
                       augment=augment, **kw)


def test_stream_off_is_bit_identical_and_on_changes_only_the_image(pool):
    assert make_augment({**AUGMENT_DEFAULTS, "enabled": False}, pool) is None
    plain = [_stream(pool).batch(s) for s in range(3)]
    # enabled with p = 0: the shift draws from its own generator, so image, flip, task and anomaly are unchanged
    p0 = make_augment({**AUGMENT_DEFAULTS, "enabled": True, "p": 0.0}, pool)
    assert p0 is not None and p0.value_range == (0.0, pytest.approx(max(float(i.max()) for i in pool.images)))
    for (a, b), (c, d) in zip(plain, [_stream(pool, p0).batch(s) for s in range(3)], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    on = make_augment({**AUGMENT_DEFAULTS, "enabled": True, "p": 1.0}, pool)
    shifted = [_stream(pool, on).batch(s) for s in range(3)]
    assert not any(torch.equal(a, c) for (a, _), (c, _) in zip(plain, shifted, strict=True))
    x = torch.cat([a for a, _ in shifted])
    assert x.dtype == torch.float32 and x.shape == (9, 1, 16, 16)
    assert x.min() >= 0 and x.max() <= on.value_range[1] + 1e-6
    assert all(torch.all((y >= 0) & (y <= 1)) for _, y in shifted) and any(y.max() > 0 for _, y in shifted)


def test_stream_augments_before_the_anomaly_and_is_pure_per_slot(pool):
    aug = DomainShift(p=1.0, value_range=(0.0, 1.0))
    st = _stream(pool, aug)
    k = 2 * 3 + 1  # step 2, slot 1
    img, label = st[k]
    # by hand: the stream's draws, the shift on its own generator, then the anomaly on the shifted image
    rng = np.random.default_rng([0, 1, 2, 1, 11])
    i = int(st.indices[rng.integers(len(st.indices))])
    image, fg = pool.images[i], pool.foregrounds[i]
    if rng.random() < 0.5:
        image, fg = np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(fg[..., ::-1])
    s_img, s_fg = aug(image, fg, np.random.default_rng([0, 1, 2, 1, 13]))
    task = st.tasks[int(rng.integers(len(st.tasks)))]
    want_img, want_label, _ = st.spec.apply(task, s_img, s_fg, rng, pool, st.indices)
    assert torch.equal(img, torch.from_numpy(want_img)) and torch.equal(label, torch.from_numpy(want_label))
    assert torch.equal(st[k][0], img)  # the same item again
    assert not torch.equal(st[k + 1][0], img)  # another slot
    other = SynthStream(pool, st.indices, st.tasks, st.spec, seed=0, member=2, batch_size=3, flip_prob=0.5, augment=aug)
    assert not torch.equal(other[k][0], img)  # another member


def test_stream_with_augment_does_not_depend_on_workers(pool):
    st = _stream(pool, make_augment({**AUGMENT_DEFAULTS, "enabled": True, "p": 1.0}, pool))
    direct = [st.batch(s) for s in (0, 1)]
    feeder = BatchFeeder(st, num_workers=2, steps=2)
    try:
        fed = [feeder(s) for s in (0, 1)]
    finally:
        feeder.close()
    for (a, b), (c, e) in zip(direct, fed, strict=True):
        assert torch.equal(a, c) and torch.equal(b, e)


def test_fit_uses_the_augment_block_and_the_run_folder_records_it(tmp_path, monkeypatch):
    ds = make_toy_dataset(12, 16, 2, seed=1)
    calls = []
    real = DomainShift.__call__

    def spy(self, image, fg, rng):
        calls.append(image.shape)
        return real(self, image, fg, rng)

    monkeypatch.setattr(DomainShift, "__call__", spy)
    params = {**MultiTaskDetector.config_set("test"), "max_models": 1}
    params["train"] = {**params["train"], "steps": 2}
    MultiTaskDetector(**params).fit(ds, context=RunContext(quiet=True))
    assert calls == []  # off by default
    det = MultiTaskDetector(**params, **{"augment.enabled": True, "augment.p": 1.0})
    det.fit(ds, context=RunContext(work_dir=tmp_path / "work", quiet=True))
    bs = int(params["train"]["batch_size"])
    assert len(calls) == 2 * bs and calls[0] == (1, 16, 16)  # every training sample, no validation sample
    det.save(tmp_path / "run")
    from medanomaly.methods.base import read_run_config

    saved = read_run_config(tmp_path / "run")["params"]["augment"]
    assert saved["enabled"] is True and saved["p"] == 1.0 and saved["gamma"] == [0.7, 1.5]


# ----------------------------------------------------------------------------- the selection script's validation shifts
@pytest.mark.parametrize("dims", [2, 3])
def test_selection_validation_shifts(dims):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "augment_selection.py"
    spec = importlib.util.spec_from_file_location("augment_selection", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img, fg = _brain(dims, 12 if dims == 3 else 24)
    for kind in mod.SHIFTS:
        a = mod.shift_image(kind, img, fg, np.random.default_rng(4), (0.0, 1.0))
        b = mod.shift_image(kind, img, fg, np.random.default_rng(4), (0.0, 1.0))
        assert np.array_equal(a, b) and a.shape == img.shape and a.dtype == np.float32, kind
        assert np.all(a[:, ~fg] == 0) and a.min() >= 0 and a.max() <= 1, kind
        assert not np.allclose(a[:, fg], img[:, fg]), kind
    with pytest.raises(ValueError, match="unknown shift"):
        mod.shift_image("warp", img, fg, np.random.default_rng(0), (0.0, 1.0))
