"""The contract of every synthetic task, as hypothesis properties over 2D and 3D inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medanomaly.synth import SynthResult, get_task, list_tasks

torch.set_num_threads(1)

EXPECTED = {"intra-blend", "inter-blend", "sink", "source", "smooth-intensity", "cutpaste", "cutpaste-scar", "fpi",
            "anatpaste", "pseudo-abnormal"}
NEEDS_SOURCE = {"inter-blend", "fpi"}


def test_registry_names() -> None:
    assert EXPECTED <= set(list_tasks())
    with pytest.raises(ValueError, match="unknown synthetic task"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown parameters"):
        get_task("sink")(np.ones((8, 8)), None, 0, bogus=1)


def _case(seed: int, dims: int, with_channel: bool, offset: float, scale: float, size: int):
    rng = np.random.default_rng(seed)
    shape = (size,) * dims if dims == 2 else (size, size - 2, size - 1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    fg = (grid**2).sum(0) <= 0.7
    img = (rng.random(shape) * 0.3 + 0.5 * fg) * scale + offset
    src = rng.random(shape) * scale + offset
    if with_channel:
        img, fg, src = img[None], fg[None], src[None]
    return img.astype(np.float32), fg, src.astype(np.float32)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    dims=st.sampled_from([2, 3]),
    with_channel=st.booleans(),
    offset=st.floats(-1.0, 1.0),
    scale=st.floats(0.1, 3.0),
    size=st.integers(10, 18),
)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_contract(name: str, seed: int, dims: int, with_channel: bool, offset: float, scale: float, size: int) -> None:
    img, fg, src = _case(seed, dims, with_channel, offset, scale, size)
    img0, fg0, src0 = img.copy(), fg.copy(), src.copy()
    kw = {"source_image": src} if name in NEEDS_SOURCE else {}
    task = get_task(name)
    res = task(img, fg, np.random.default_rng(seed), **kw)
    assert isinstance(res, SynthResult)
    # shapes and dtypes
    assert res.image.shape == img.shape and res.image.dtype == np.float32
    lab_shape = img.shape if not with_channel else (1, *img.shape[1:])
    assert res.label.shape == lab_shape and res.label.dtype == np.float32
    assert res.mask.shape == lab_shape and res.mask.dtype == bool
    # ranges
    assert res.image.min() >= img.min() - 1e-6 and res.image.max() <= img.max() + 1e-6
    assert res.label.min() >= 0.0 and res.label.max() <= 1.0
    assert np.all(res.label[~res.mask] == 0)
    # inputs untouched
    assert np.array_equal(img, img0) and np.array_equal(fg, fg0) and np.array_equal(src, src0)
    # determinism
    again = task(img, fg, np.random.default_rng(seed), **kw)
    assert np.array_equal(res.image, again.image) and np.array_equal(res.label, again.label)
    assert np.array_equal(res.mask, again.mask)
    # the flipped-Gaussian label is non-zero only where the image changed
    if task_uses_flipped_gaussian(name):
        changed = np.abs(res.image - img) > 0
        if with_channel:
            changed = changed.any(0, keepdims=True)
        assert np.all(res.label[~changed] == 0)
    # pixels outside the mask change only for Poisson blending (inside the solved box)
    if name not in ("intra-blend", "inter-blend"):
        outside = ~np.broadcast_to(res.mask, img.shape) if with_channel else ~res.mask
        assert np.array_equal(res.image[outside], img[outside]) or name == "pseudo-abnormal"


def task_uses_flipped_gaussian(name: str) -> bool:
    from medanomaly.synth import task_defaults

    return task_defaults(name)["labeller"] == "flipped-gaussian"


def test_torch_inputs_and_int_seed() -> None:
    img, fg, _ = _case(0, 2, True, 0.0, 1.0, 16)
    a = get_task("sink")(torch.tensor(img), torch.tensor(fg), 3)
    b = get_task("sink")(img, fg, np.random.default_rng(3))
    assert np.array_equal(a.image, b.image)


def test_different_seeds_differ_and_anomalies_hit_foreground() -> None:
    img, fg, _ = _case(1, 2, False, 0.0, 1.0, 32)
    outs = [get_task("smooth-intensity")(img, fg, s) for s in range(5)]
    assert len({o.image.tobytes() for o in outs}) == 5
    for o in outs:
        assert (o.mask & fg).sum() >= 0.5 * o.mask.sum() / 4  # each of <= 4 shapes is >= 50% foreground


def test_bad_inputs() -> None:
    task = get_task("sink")
    with pytest.raises(ValueError, match="NaN"):
        task(np.full((8, 8), np.nan), None, 0)
    with pytest.raises(ValueError, match="foreground shape"):
        task(np.ones((8, 8)), np.ones((7, 8), bool), 0)
    with pytest.raises(ValueError, match="empty"):
        task(np.ones((0, 8)), None, 0)
    with pytest.raises(ValueError, match="second data set"):
        get_task("inter-blend")(np.random.default_rng(0).random((16, 16)), None, 0)
