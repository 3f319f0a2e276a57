"""Every preset's ``invert``: maps on the output grid go back onto the input's own grid (2D, 3D, slice stacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nibabel import orientations as nio
from scipy import ndimage as ndi

from medanomaly.data import Loaded, get_preset, list_presets, slices_to_volume, volume_to_slices
from medanomaly.data.geometry import fit_2d, invert_steps, reorient, reorient_back, resample, resample_back, unfit_2d
from medanomaly.data.intensity import equalize_histogram
from medanomaly.data.masks import foreground_mask

torch.set_num_threads(1)

PRESETS_2D = [n for n in list_presets() if get_preset(n).spatial_dims == 2]
PRESETS_3D = [n for n in list_presets() if get_preset(n).spatial_dims == 3]
SHAPES_2D = [(37, 29), (29, 37), (150, 111)]  # odd sizes; smaller (upsampled) and larger (downsampled) than 64
CASES_3D = [  # shape, spacing (mm), axis codes, preset size
    ((41, 37, 29), (1.2, 0.9, 2.5), "LPS", None),  # anisotropic: down in x/y, up in z
    ((23, 19, 17), (3.0, 3.0, 3.0), "PSR", None),  # upsampled to 2 mm, permuted axes
    ((41, 37, 29), (1.2, 0.9, 2.5), "ASL", (16, 16, 16)),  # fixed size smaller than the head: the box is cropped
]


def _grid(shape):
    return np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")


def _head(shape):
    """A smooth, asymmetric head: soft-edged ball (off centre) with a slow intensity pattern; zero outside."""
    g = _grid(shape)
    r2 = sum(((x - 0.1 * (i + 1)) / 0.75) ** 2 for i, x in enumerate(g))
    t = np.clip((1 - r2) / 0.4, 0, 1)
    val = 100 + 60 * g[0] + 40 * np.sin(2 * g[1] + 1) + (20 * g[2] if len(shape) == 3 else 0)
    return (t * t * (3 - 2 * t) * val).astype(np.float32)


def _cxr_like(shape):
    """Smooth everywhere, no flat background (equalisation keeps it smooth)."""
    g = _grid(shape)
    return (100 + 50 * g[0] + 30 * np.cos(2 * g[1]) + 10 * g[0] * g[1]).astype(np.float32)


def _affine(spacing, codes, origin=(5.0, -3.0, 7.0)):
    aff = np.eye(4)
    for i, (ax, flip) in enumerate(nio.axcodes2ornt(tuple(codes))):
        aff[int(ax), i] = flip * spacing[i]
    aff[:3, 3] = origin
    return aff


def _expected(name, x, meta):
    """The input after the preset's (pointwise) intensity step, on the input grid."""
    if name == "cxr":
        return equalize_histogram(x) * 2 - 1
    lo, hi = meta["intensity"]["low"], meta["intensity"]["high"]
    return np.clip((x - lo) / (hi - lo), 0, 1)


def _world_f(w):
    """A smooth function of world (or pixel) coordinates, (..., 3|2) -> (...)."""
    return 0.3 + 0.01 * w[..., 0] - 0.02 * w[..., 1] + (0.015 * w[..., 2] if w.shape[-1] == 3 else 0.0)


# ------------------------------------------------------------------------------------------------------- 2D
@pytest.mark.parametrize("name", PRESETS_2D)
@pytest.mark.parametrize("shape", SHAPES_2D)
def test_2d_round_trip(name, shape):
    x = _cxr_like(shape) if name == "cxr" else _head(shape)
    p = get_preset(name, size=64)
    out = p(x)
    back = p.invert(out.image, out.meta)
    assert back.shape == x.shape and back.dtype == np.float32
    fg = p.invert(out.foreground, out.meta, mode="nearest")
    assert fg.shape == x.shape and fg.dtype == bool
    k = int(np.ceil(max(shape) / 64)) + 1  # away from edges by the resize kernel's reach
    keep = ndi.binary_erosion(fg, iterations=k)
    assert keep.mean() > 0.2
    err = np.abs(back - _expected(name, x, out.meta))[keep]
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())


@pytest.mark.parametrize("name", PRESETS_2D)
@pytest.mark.parametrize("shape", SHAPES_2D)
def test_2d_invert_is_exact_on_a_linear_map(name, shape):
    """A map that is linear in the input's pixel coordinates comes back exactly (away from the edge pixels)."""
    p = get_preset(name, size=64)
    out = p(_cxr_like(shape) if name == "cxr" else _head(shape))
    geo = out.meta["geometry"]
    (nh, nw), (top, left), (h, w) = geo["resized"], geo["pad"], geo["orig"]
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    yx = np.stack([(i - top + 0.5) * h / nh - 0.5, (j - left + 0.5) * w / nw - 0.5], -1)  # output px -> input px
    back = p.invert(_world_f(yx)[None], out.meta)
    y, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    want = _world_f(np.stack([y, xx], -1))
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(back[inner], want[inner], atol=1e-4)


def test_old_disagreement_is_gone():
    """Input smaller than the model size: the inverse samples the map at each input pixel (no anti-aliasing blur),
    the same as an independent bilinear reference; unfit_2d and the preset's invert are one implementation."""
    rng = np.random.default_rng(0)
    x = _head((37, 29))
    p = get_preset("brain-mri-2d", size=64)
    out = p(x)
    amap = rng.uniform(size=(64, 64)).astype(np.float32)  # rough: the old two copies differed by up to 0.43
    back = p.invert(amap, out.meta)
    np.testing.assert_array_equal(back, unfit_2d(amap, out.meta["geometry"]))
    geo = out.meta["geometry"]
    (nh, nw), (top, left), (h, w) = geo["resized"], geo["pad"], geo["orig"]
    y, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [top + np.clip((y + 0.5) * nh / h - 0.5, 0, nh - 1), left + np.clip((xx + 0.5) * nw / w - 0.5, 0, nw - 1)]
    ref = ndi.map_coordinates(amap, coords, order=1)
    np.testing.assert_allclose(back, ref, atol=1e-5)
    # a 2 x 2 hot spot around an input pixel's place keeps its peak value (anti-aliasing would spread it)
    hot = np.zeros((64, 64), np.float32)
    r, c = int(coords[0][10, 10]), int(coords[1][10, 10])
    hot[r : r + 2, c : c + 2] = 1.0
    assert p.invert(hot, out.meta)[10, 10] == pytest.approx(1.0)


def test_2d_shapes_kept_for_squeezed_and_rgb_inputs():
    x = _head((33, 27))
    p = get_preset("brain-mri-2d", size=32)
    out = p(Loaded(x[:, :, None], np.eye(4)))
    assert p.invert(out.image, out.meta).shape == (33, 27, 1)
    rgb = np.repeat(_cxr_like((33, 27))[..., None], 3, axis=-1)
    c = get_preset("cxr", size=32)
    oc = c(rgb)
    assert c.invert(oc.image, oc.meta).shape == (33, 27)
    with pytest.raises(ValueError, match="output grid"):
        c.invert(np.zeros((31, 32)), oc.meta)
    with pytest.raises(ValueError, match="mode"):
        c.invert(oc.image, oc.meta, mode="cubic")
    with pytest.raises(ValueError, match="steps"):
        c.invert(oc.image, {})


def test_nearest_inverts_masks():
    x = _head((150, 111))
    p = get_preset("brain-mri-2d", size=64)
    out = p(x)
    fg = p.invert(out.foreground, out.meta, mode="nearest")
    assert fg.dtype == bool and (fg == foreground_mask(x)).mean() > 0.97
    batch = p.invert(np.stack([out.image[0]] * 3), out.meta)  # a batch of maps keeps its batch axis
    assert batch.shape == (3, 150, 111)


# ------------------------------------------------------------------------------------------------------- 3D
@pytest.mark.parametrize("name", PRESETS_3D)
@pytest.mark.parametrize("shape,spacing,codes,size", CASES_3D)
def test_3d_round_trip(name, shape, spacing, codes, size):
    x = _head(shape)
    ld = Loaded(x, _affine(spacing, codes))
    assert ld.orientation == codes
    p = get_preset(name, size=size)
    out = p(ld)
    back = p.invert(out.image, out.meta)
    assert back.shape == x.shape and back.dtype == np.float32
    fg = p.invert(out.foreground, out.meta, mode="nearest")
    k = int(np.ceil(2.0 / min(spacing))) + 1
    keep = ndi.binary_erosion(fg, iterations=k)
    assert keep.sum() > 50
    err = np.abs(back - _expected(name, x, out.meta))[keep]
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())
    if size is not None:  # the crop dropped part of the head: those voxels come back as 0
        reach = p.invert(np.ones(out.image.shape[1:], np.float32), out.meta) > 0
        assert out.meta["foreground_clipped"] and (foreground_mask(x) & ~reach).any()
        assert (back[~reach] == 0).all()


@pytest.mark.parametrize("shape,spacing,codes,size", CASES_3D)
def test_3d_invert_lands_in_world_coordinates(shape, spacing, codes, size):
    """A map that is a function of world position comes back as that function on the input's voxel grid, so writing
    it with the input's affine is right (orientation, resampling and crop all undone)."""
    ld = Loaded(_head(shape), _affine(spacing, codes))
    p = get_preset("brain-mri-3d", size=size)
    out = p(ld)
    osh = out.image.shape[1:]
    vox = np.stack(np.meshgrid(*[np.arange(s) for s in osh], indexing="ij"), -1).astype(float)
    world_out = vox @ out.affine[:3, :3].T + out.affine[:3, 3]
    back = p.invert(_world_f(world_out), out.meta)
    ivox = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    world_in = ivox @ ld.affine[:3, :3].T + ld.affine[:3, 3]
    m = np.linalg.inv(out.affine) @ ld.affine  # input voxel -> output voxel
    ov = ivox @ m[:3, :3].T + m[:3, 3]
    inside = np.all((ov >= 0.5) & (ov <= np.array(osh) - 1.5), axis=-1)
    crop = out.meta["steps"][-1]  # and inside the resampled grid (the padding holds no data)
    rv = ov + np.array(crop["start"])
    inside &= np.all((rv >= 0) & (rv <= np.array(crop["in_shape"]) - 1), axis=-1)
    assert inside.sum() > 100
    np.testing.assert_allclose(back[inside], _world_f(world_in)[inside], atol=1e-4)
    assert (back[np.all((ov < -1) | (ov > np.array(osh)), axis=-1)] == 0).all()  # outside the output box: 0


def test_step_inverses():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(7, 6, 5)).astype(np.float32)
    aff = _affine((1.0, 2.0, 3.0), "PIR")
    r, _ = reorient(a, aff, "RAS")
    np.testing.assert_array_equal(reorient_back(r, aff, "RAS"), a)
    lin = np.stack(np.meshgrid(*[np.arange(s) for s in (9, 8, 7)], indexing="ij"), -1) @ np.array([1.0, -2.0, 0.5])
    f = np.array([1.5, 0.7, 1.0])
    down, _ = resample(lin, np.eye(4), f)
    up = resample_back(down, f, lin.shape)
    np.testing.assert_allclose(up[2:-2, 2:-2, 1:-1], lin[2:-2, 2:-2, 1:-1], atol=1e-4)
    img, rec = fit_2d(np.ones((1, 1, 9, 20), np.float32), 16)
    assert invert_steps(img[0, 0], [rec]).shape == (9, 20)
    with pytest.raises(ValueError, match="unknown geometry step"):
        invert_steps(np.zeros((4, 4)), [{"op": "warp", "in_shape": (4, 4), "out_shape": (4, 4)}])


# ---------------------------------------------------------------------------------------- 2D preset on a volume
def _volume_case():
    x = _head((31, 27, 23))
    return Loaded(x, _affine((1.5, 1.2, 2.0), "LPI"))


def test_slices_to_volume_round_trip_and_dropped_slices():
    ld = _volume_case()
    p = get_preset("brain-mri-2d", size=48, min_fg_fraction=0.2)
    st = p.apply_volume(ld)
    assert st.meta["dropped"] and len(st.meta["dropped"]) == int((~st.keep).sum())
    back = p.invert(st.images, st.meta)
    assert back.shape == ld.array.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, slices_to_volume(st.images[:, 0], st.meta))
    # dropped slices (axial = last RAS axis) are 0 in the input's own grid
    ras_idx = np.zeros(reorient(ld.array, ld.affine, "RAS")[0].shape)
    ras_idx[..., :] = np.arange(ras_idx.shape[2])
    idx = reorient_back(ras_idx, ld.affine, "RAS")
    dropped = np.isin(idx, st.meta["dropped"])
    assert dropped.any() and (back[dropped] == 0).all()
    # kept slices: the (intensity-normalised) input comes back
    fg = p.invert(st.foreground, st.meta, mode="nearest")
    keep = ndi.binary_erosion(fg, iterations=2) & ~dropped
    assert keep.sum() > 100
    err = np.abs(back - _expected("brain-mri-2d", ld.array, st.meta))[keep]
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())
    # maps of the kept slices only are scattered back to their places
    only = slices_to_volume(st.images[st.keep, 0], st.meta)
    np.testing.assert_array_equal(only, back)
    with pytest.raises(ValueError, match="maps for"):
        slices_to_volume(st.images[:2, 0], st.meta)


def test_slices_to_volume_puts_each_slice_map_on_its_slice():
    ld = _volume_case()
    p = get_preset("brain-mri-2d", size=32, min_fg_fraction=0.0, min_brain_fraction=0.0)
    sl, smeta = volume_to_slices(ld.array, ld.affine, return_meta=True)
    np.testing.assert_array_equal(sl, volume_to_slices(ld.array, ld.affine))
    st = p.apply_slices(sl)
    st.meta.update(smeta)
    maps = np.broadcast_to(np.arange(1, len(sl) + 1, dtype=np.float32)[:, None, None], (len(sl), 32, 32))
    back = slices_to_volume(maps, st.meta, mode="nearest")
    ras_idx = np.zeros(reorient(ld.array, ld.affine, "RAS")[0].shape)
    ras_idx[..., :] = np.arange(1, ras_idx.shape[2] + 1)
    np.testing.assert_array_equal(back, reorient_back(ras_idx, ld.affine, "RAS"))
    # without the slicing record: the maps on the slices' own grid
    plain = p.apply_slices(sl)
    assert slices_to_volume(maps, plain.meta).shape == sl.shape
