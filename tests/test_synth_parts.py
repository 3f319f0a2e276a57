"""Labellers, shapes, deformations, brush masks, anatomy masks, the pseudo-abnormal module, SynthDataset and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from medanomaly.data import make_toy_dataset
from medanomaly.synth import (
    SynthDataset,
    anatomy_mask,
    anomaly_count,
    binary_label,
    brush_mask,
    flipped_gaussian_label,
    get_task,
    logistic_label,
    make_shape,
    mtmlw_sizes,
    random_shape,
)
from medanomaly.synth.tasks import ray_fraction

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- labellers
@given(d=st.floats(-5, 5), sigma=st.floats(0.01, 2.0))
def test_flipped_gaussian_formula(d: float, sigma: float) -> None:
    y = flipped_gaussian_label(np.array([d]), np.array([True]), sigma=sigma)[0]
    assert y == pytest.approx(1 - np.exp(-(d**2) / (2 * sigma**2)), abs=1e-6)
    assert 0.0 <= y <= 1.0
    assert flipped_gaussian_label(np.array([d]), np.array([False]), sigma=sigma)[0] == 0.0


def test_labeller_values() -> None:
    d = np.array([0.0, 0.2, -0.2, 1.0])
    m = np.ones(4, bool)
    np.testing.assert_allclose(flipped_gaussian_label(d, m), [0.0, 1 - np.exp(-0.5), 1 - np.exp(-0.5), 1 - np.exp(-12.5)],
                               rtol=1e-6)
    lg = logistic_label(d, m, k=22.0, x0=0.1)
    np.testing.assert_allclose(lg, 1 / (1 + np.exp(-22.0 * (np.abs(d) - 0.1))), rtol=1e-5)
    assert lg[0] == pytest.approx(0.1, abs=0.01)  # NSA's jump at zero change, which the flipped Gaussian removes
    np.testing.assert_array_equal(binary_label(d, m), [1, 1, 1, 1])
    np.testing.assert_array_equal(binary_label(d, m, threshold=0.5), [0, 0, 0, 1])
    with pytest.raises(ValueError, match="sigma"):
        flipped_gaussian_label(d, m, sigma=0)


# ------------------------------------------------------------------------------------------------- shapes
def test_mtmlw_sizes_and_count_distribution() -> None:
    rng = np.random.default_rng(0)
    s = np.stack([mtmlw_sizes((100, 200), rng) for _ in range(4000)])
    assert s[:, 0].min() >= 6 - 1e-9 and s[:, 0].max() <= 80 + 1e-9
    assert s[:, 1].min() >= 12 - 1e-9 and s[:, 1].max() <= 160 + 1e-9
    assert np.mean(s[:, 0] / 100) == pytest.approx(0.23, abs=0.01)  # 0.03 + E[Gamma(2, 0.1)], clipping is rare
    counts = np.array([anomaly_count(rng) for _ in range(8000)])
    assert counts.min() == 1 and counts.max() == 4
    np.testing.assert_allclose(np.bincount(counts)[1:] / len(counts), [0.5, 0.25, 0.125, 0.125], atol=0.02)


@pytest.mark.parametrize("spatial", [(40, 48), (20, 24, 22)])
def test_random_shapes_respect_foreground(spatial: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in spatial], indexing="ij"))
    fg = (grid**2).sum(0) < 0.5
    kinds = set()
    for _ in range(30):
        sh = random_shape(spatial, rng, fg)
        kinds.add(sh.kind)
        assert sh.mask.any()
        assert (sh.mask & fg).sum() >= 0.5 * sh.mask.sum()
        assert np.array_equal(np.nonzero(sh.mask)[0].min(), sh.box[0].start)
    assert kinds == {"ellipse", "box"}


def test_shape_rasterisation_matches_definition() -> None:
    a = np.array([[6.0, 2.0], [-1.0, 3.0]])
    sh = make_shape((30, 30), "ellipse", np.array([15.0, 14.0]), a)
    pts = np.stack(np.meshgrid(np.arange(30.0), np.arange(30.0), indexing="ij"), -1)
    u = (pts - sh.centre) @ np.linalg.inv(a).T
    np.testing.assert_array_equal(sh.mask, (u**2).sum(-1) <= 1)
    bx = make_shape((30, 30), "box", np.array([15.0, 14.0]), a)
    np.testing.assert_array_equal(bx.mask, np.abs(u).max(-1) <= 1)


@pytest.mark.parametrize("kind", ["ellipse", "box"])
def test_ray_fraction_and_deformation_stays_inside(kind: str) -> None:
    rng = np.random.default_rng(2)
    a = np.array([[5.0, 1.0, 0.0], [0.5, 4.0, 0.0], [0.0, 0.3, 6.0]])
    sh = make_shape((24, 24, 24), kind, np.array([12.0, 12.0, 12.0]), a)
    u_c = np.array([0.2, -0.3, 0.1])
    inside = rng.uniform(-0.99, 0.99, (400, 3))
    inside = inside[sh.norm(inside) < 1][:50]  # points inside the unit shape
    w = inside - u_c
    r = ray_fraction(sh, u_c, w)
    assert np.all((r > 0) & (r < 1))
    border = u_c + w / r[:, None]  # the point where each ray leaves the unit shape
    np.testing.assert_allclose(sh.norm(border), 1.0, atol=1e-9)
    for f in (1.5, 3.0):  # both mappings send r in [0, 1] to [0, 1]
        rr = np.linspace(0, 1, 11)
        assert np.all((1 - (1 - rr) ** f >= 0) & (1 - (1 - rr) ** f <= 1)) and np.all(rr**f <= 1)


def test_sink_and_source_directions() -> None:
    """A radial ramp (distance from the centre): sink pulls far values inwards (values rise), source the reverse."""
    n = 41
    yy, xx = np.mgrid[:n, :n].astype(float)
    img = np.hypot(yy - 20, xx - 20).astype(np.float32)
    fg = np.zeros((n, n), bool)
    fg[20, 20] = True  # every shape is centred on the ramp centre
    p = {"p_more": 0.0, "centre_spread": 0.0, "size_range": (0.5, 0.5), "factor_range": (2.0, 2.0)}
    sink = get_task("sink")(img, fg, 0, **p)
    src = get_task("source")(img, fg, 0, **p)
    m = sink.mask
    assert (sink.image - img)[m].mean() > 0.5 and (src.image - img)[m].mean() < -0.5
    assert np.array_equal(sink.image[~m], img[~m])


def test_smooth_intensity_damped_at_border() -> None:
    img = np.full((40, 40), 0.5, np.float32)
    img[0, 0], img[-1, -1] = 0.0, 1.0
    res = get_task("smooth-intensity")(img, None, 3, p_more=0.0, size_range=(0.5, 0.5), margin_range=(1.0, 1.0))
    d = np.abs(res.image - img)
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(res.mask)
    assert d[res.mask & (dist <= 1)].mean() < d[res.mask & (dist >= dist.max() - 0.5)].mean()
    assert d[dist >= dist.max() - 0.5].min() > 0.09  # full amplitude (>= 0.1 * range) in the middle


def test_fpi_label_is_interpolation_factor() -> None:
    img = np.zeros((32, 32), np.float32)
    src = np.ones((32, 32), np.float32)
    img[0, 0] = 1.0
    res = get_task("fpi")(img, None, 5, source_image=src)
    alpha = float(res.label.max())
    inside = res.mask.copy()
    inside[0, 0] = False
    np.testing.assert_allclose(res.image[inside], alpha, atol=1e-6)
    np.testing.assert_allclose(res.label[res.mask], alpha)


def test_pseudo_abnormal_positive_only_when_foreground_changes() -> None:
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32) + 0.1
    none = np.zeros((32, 32), bool)
    res = get_task("pseudo-abnormal")(img, none, 1)
    assert not res.positive and not res.mask.any() and res.info["n_anomalies"] >= 1
    assert not np.array_equal(res.image, img)  # the boxes did change the (background) image
    full = get_task("pseudo-abnormal")(img, np.ones((32, 32), bool), 1)
    assert full.positive and np.array_equal(full.label > 0, full.mask)
    counts = [get_task("pseudo-abnormal")(img, None, s).info["n_anomalies"] for s in range(60)]
    assert min(counts) >= 1 and max(counts) <= 9 and len(set(counts)) > 4


def test_anatomy_masks() -> None:
    ds = make_toy_dataset(1, 48, 2, seed=0)
    s = ds[0]
    m = anatomy_mask(s["image"], "brain")
    assert m.shape == (48, 48) and (m & s["foreground"][0].numpy()).sum() > 0.8 * s["foreground"].sum()
    # a synthetic chest X-ray: bright body, two dark lungs, dark air outside the body
    yy, xx = np.mgrid[:64, :64] / 63 * 2 - 1
    cxr = np.where(xx**2 / 0.8 + yy**2 / 0.9 < 1, 0.7, -0.9)
    lungs = ((xx + 0.35) ** 2 / 0.05 + yy**2 / 0.3 < 1) | ((xx - 0.35) ** 2 / 0.05 + yy**2 / 0.3 < 1)
    cxr = np.where(lungs, -0.6, cxr)
    got = anatomy_mask(cxr, "cxr")
    inter = (got & lungs).sum() / (got | lungs).sum()
    assert inter > 0.7
    res = get_task("anatpaste")(cxr.astype(np.float32), None, 0, anatomy="cxr")
    assert not (res.mask & ~got).any()
    with pytest.raises(ValueError, match="kind"):
        anatomy_mask(cxr, "liver")


# -------------------------------------------------------------------------------------------------- brush
@pytest.mark.parametrize("shape", [(20, 20), (64, 48), (16, 16, 16)])
def test_brush_masks(shape: tuple[int, ...]) -> None:
    a = brush_mask(shape, 0)
    assert a.shape == shape and a.dtype == bool and a.any() and not a.all()
    np.testing.assert_array_equal(a, brush_mask(shape, 0))
    assert not np.array_equal(a, brush_mask(shape, 1))
    b = brush_mask(shape, 2, target_ratio=0.3)
    assert b.mean() >= 0.3
    region = np.zeros(shape, bool)
    region[tuple(slice(0, s // 2) for s in shape)] = True
    c = brush_mask(shape, 3, target_ratio=0.2, region=region)
    assert (c & region).sum() >= 0.2 * region.sum()
    with pytest.raises(ValueError, match="target_ratio"):
        brush_mask(shape, 0, target_ratio=1.5)


# ----------------------------------------------------------------------------------------- SynthDataset
def test_synth_dataset_seeding_and_workers() -> None:
    base = make_toy_dataset(6, 24, 2, seed=0)
    other = make_toy_dataset(3, 20, 2, seed=1)
    tasks = ["intra-blend", "inter-blend", "sink", "smooth-intensity", "fpi", "cutpaste"]
    ds = SynthDataset(base, tasks, p_anomaly=0.8, seed=7, source=other)
    items = [ds[i] for i in range(len(ds))]
    for i, it in enumerate(items):
        assert it["image"].shape == (1, 24, 24) and it["label"].shape == (1, 24, 24)
        assert it["foreground"].dtype == torch.bool and it["mask"].dtype == torch.bool
        assert float(it["label"][~it["mask"]].abs().max() if (~it["mask"]).any() else 0) == 0
        if it["task"] == "none":
            assert torch.equal(it["image"], base[i]["image"]) and it["anomalous"] == 0
        assert torch.equal(ds[i]["image"], it["image"])  # same (seed, epoch, index) -> same item
    assert any(it["task"] != "none" for it in items)
    loaded = list(DataLoader(ds, batch_size=3, num_workers=2, shuffle=False))
    assert torch.equal(torch.cat([b["image"] for b in loaded]), torch.stack([it["image"] for it in items]))
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["image"], items[i]["image"]) for i in range(len(ds)))
    with pytest.raises(ValueError, match="source"):
        SynthDataset(base, ["inter-blend"])
    with pytest.raises(ValueError, match="unknown tasks"):
        SynthDataset(base, ["nope"])


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_grids(tmp_path) -> None:  # noqa: ANN001
    from medanomaly.synth.cli import run_synth_cli

    out = tmp_path / "grids"
    paths = run_synth_cli("sink,inter-blend", "toy", out, n=2, seed=0, quiet=True)
    assert [p.name for p in paths] == ["sink_toy.png", "inter-blend_toy.png"]
    from PIL import Image

    for p in paths:
        im = Image.open(p)
        assert im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="unknown synthetic task"):
        run_synth_cli("nope", "toy", out)


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_tasks_on_a_real_lgg_slice() -> None:
    try:
        from medanomaly.data import load_dataset

        ds = load_dataset("lgg-flair-2d", "train", normal_only=True, max_cases=1)
    except Exception as exc:  # data folder absent or unreadable on this machine
        pytest.skip(f"real LGG data not available: {exc}")
    sample = max((ds[i] for i in range(min(len(ds), 12))), key=lambda s: float(s["foreground"].float().mean()))
    img, fg = sample["image"].numpy(), sample["foreground"].numpy()
    src = ds[0]["image"].numpy()
    for name in ["intra-blend", "inter-blend", "sink", "source", "smooth-intensity", "cutpaste", "fpi", "anatpaste"]:
        kw = {"source_image": src} if name in ("inter-blend", "fpi") else {}
        res = get_task(name)(img, fg, 0, **kw)
        assert res.image.shape == img.shape and res.label.shape == (1, *img.shape[1:])
        assert res.image.min() >= img.min() and res.image.max() <= img.max()
        assert res.mask.any() and np.all(res.label[~res.mask] == 0)
        assert (res.mask[0] & fg[0]).sum() > 0
