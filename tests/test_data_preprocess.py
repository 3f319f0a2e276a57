"""Preprocessing presets: ranges, shapes, mask alignment, per-volume percentiles, orientation and spacing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medanomaly.data import Loaded, get_preset, list_presets
from medanomaly.data.geometry import crop_or_pad, fit_2d, reorient, resample, unfit_2d
from medanomaly.data.intensity import equalize_histogram
from medanomaly.data.io import DataError
from medanomaly.data.masks import fill_mask_holes, foreground_mask, otsu_threshold

torch.set_num_threads(1)


def _head(shape, rng, lesion=True):
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    fg = (g**2).sum(0) < 0.7
    img = fg * (200 + 40 * rng.standard_normal(shape)).clip(1, None)
    mask = np.zeros(shape, bool)
    if lesion:
        mask = ((g - 0.25) ** 2).sum(0) < 0.03
        img[mask] = 600
    return img.astype(np.float32), mask, fg


def test_list_presets():
    assert set(list_presets()) == {"brain-mri-2d", "brain-mri-3d", "cxr"}
    p = get_preset("brain-mri-2d", size=64)
    assert p.params["size"] == 64 and p.config["name"] == "brain-mri-2d"
    assert get_preset(p, min_fg_fraction=0.2).params == {**p.params, "min_fg_fraction": 0.2}


def test_brain2d_range_shape_mask_alignment():
    rng = np.random.default_rng(0)
    vol, mask, fg = _head((10, 96, 80), rng)
    st = get_preset("brain-mri-2d", size=48).apply_slices(vol, mask)
    assert st.images.shape == (10, 1, 48, 48) and st.images.dtype == np.float32
    assert st.images.min() >= 0 and st.images.max() <= 1
    assert st.masks.shape == st.foreground.shape == (10, 1, 48, 48)
    # background is zero, lesion voxels (bright) are at the top of the range, the mask stays inside the foreground
    assert np.all(st.images[~st.foreground] == 0)
    assert st.images[st.masks].mean() > 0.95
    assert (st.masks & ~st.foreground).sum() <= 0.02 * st.masks.sum()
    # mask area scales with the resize (96 -> 48 on the long side)
    np.testing.assert_allclose(st.masks.sum(), mask.sum() * (48 / 96) ** 2, rtol=0.1)
    # the first and last slices of the sphere have almost no foreground: flagged for removal
    assert not st.keep[0] and st.keep[5]
    assert np.all(np.diff(st.fg_fraction[:5]) > 0)


def test_brain2d_percentile_is_per_volume():
    rng = np.random.default_rng(1)
    vol, _, fg = _head((6, 40, 40), rng, lesion=False)
    vol[3] *= 3  # one much brighter slice
    p = get_preset("brain-mri-2d", size=40, clip_percentile=98.0)
    st = p.apply_slices(vol)
    hi = np.percentile(vol[fg], 98)
    assert st.meta["intensity"]["high"] == pytest.approx(hi)
    # a slice processed alone is normalised by its own percentile: different values
    alone = p(vol[2])
    assert not np.allclose(alone.image[0], st.images[2, 0], atol=0.05)
    # each slice is scaled by the volume's bounds (no resize at 40 -> 40): x / P98(volume foreground)
    f2 = st.foreground[2, 0]
    np.testing.assert_allclose(st.images[2, 0][f2], np.clip(vol[2] / hi, 0, 1)[f2], atol=1e-5)


def test_brain2d_aspect_and_padding():
    img = np.zeros((50, 100), np.float32)
    img[10:40, 20:80] = 100.0
    out = get_preset("brain-mri-2d", size=40, min_fg_fraction=0.0)(img)
    assert out.image.shape == (1, 40, 40)
    assert not out.foreground[0, :9].any() and not out.foreground[0, 31:].any()  # padded rows (10 top, 10 bottom)
    a, geo = fit_2d(np.ones((1, 1, 50, 100), np.float32), 40)
    assert geo["resized"] == (20, 40) and geo["pad"] == (10, 0) and a.sum() == 20 * 40
    # a map at 40 x 40 goes back onto the 50 x 100 input
    back = unfit_2d(out.foreground[None].astype(np.float32), out.meta["geometry"], "nearest")[0, 0] > 0.5
    assert back.shape == (50, 100) and (back == (img > 0)).mean() > 0.97


def test_foreground_mask_fills_holes_and_drops_specks():
    img = np.zeros((40, 40), np.float32)
    img[5:35, 5:35] = 100
    img[15:25, 15:25] = 0  # ventricle-like hole
    img[1, 1] = 100  # noise speck
    fg = foreground_mask(img)
    assert fg[20, 20] and not fg[1, 1] and fg.sum() == 30 * 30


def _brats_like(rng):
    """1 mm, LPS, 64 x 64 x 48 head with a lesion; returns Loaded image and mask arrays."""
    vol, mask, _ = _head((64, 64, 48), rng)
    aff = np.array([[-1.0, 0, 0, 32.0], [0, -1.0, 0, 32.0], [0, 0, 1.0, -24.0], [0, 0, 0, 1]])
    return Loaded(vol, aff), mask


def _ixi_like(brats: Loaded):
    """The same head as a 2 mm PSR volume (IXI's storage)."""
    a, aff = reorient(brats.array, brats.affine, "RAS")
    a2, aff2 = resample(a, aff, np.array([2.0, 2.0, 2.0]))
    b, aff3 = reorient(a2, aff2, "PSR")
    return Loaded(b, aff3)


def test_brain3d_common_orientation_and_spacing():
    rng = np.random.default_rng(2)
    brats, mask = _brats_like(rng)
    ixi = _ixi_like(brats)
    assert ixi.orientation == "PSR" and brats.orientation == "LPS"
    p = get_preset("brain-mri-3d", size=(48, 48, 32))
    ob, oi = p(brats, mask), p(ixi)
    for o in (ob, oi):
        assert o.image.shape == (1, 48, 48, 32) and 0 <= o.image.min() and o.image.max() <= 1
        assert "".join(nib.aff2axcodes(o.affine)) == "RAS"
        np.testing.assert_allclose(np.sqrt((o.affine[:3, :3] ** 2).sum(0)), [2, 2, 2])
    # the same anatomy lands on (almost) the same voxels
    assert np.abs(ob.foreground ^ oi.foreground).mean() < 0.02
    assert np.corrcoef(ob.image.ravel(), oi.image.ravel())[0, 1] > 0.8
    # mask follows: the lesion (bright) is where the mask is
    assert ob.mask.sum() > 0 and ob.image[ob.mask].mean() > 0.9
    np.testing.assert_allclose(ob.mask.sum(), mask.sum() / 8, rtol=0.15)


def test_brain3d_pad_multiple_and_downsample():
    rng = np.random.default_rng(3)
    brats, mask = _brats_like(rng)
    o = get_preset("brain-mri-3d", spacing=1.0, downsample=2)(brats, mask)
    assert all(s % 16 == 0 for s in o.image.shape[1:])
    np.testing.assert_allclose(np.sqrt((o.affine[:3, :3] ** 2).sum(0)), [2, 2, 2])
    with pytest.raises(DataError, match="mask shape"):
        get_preset("brain-mri-3d")(brats, mask[:-1])


def test_crop_or_pad():
    a = np.arange(24).reshape(4, 6)
    out = crop_or_pad(a, (-1, 2), (3, 5))
    assert out.shape == (3, 5) and out[0].sum() == 0 and out[1, 0] == 2 and out[1, 3] == 5 and out[1, 4] == 0


def test_cxr_window_equalise_range():
    rng = np.random.default_rng(4)
    x = rng.gamma(2.0, 300.0, (32, 32)).astype(np.float32)
    o = get_preset("cxr", size=32)(Loaded(x, np.eye(4), (), {"window_center": 600.0, "window_width": 800.0}))
    assert o.image.shape == (1, 32, 32) and o.foreground.all()
    assert o.image.min() == -1 and o.image.max() == 1 and o.meta["windowed"]
    assert o.image.std() > 0.5  # equalised: close to uniform on [-1, 1] (std 0.58)
    # the window clips: everything above centre + width / 2 = 1000 becomes the top value
    np.testing.assert_array_equal(o.image[0][x >= 1000], 1.0)
    assert (o.image[0][x < 1000] < 1.0).all()
    assert get_preset("cxr", size=20)(x).image.shape == (1, 20, 20)
    # equalisation makes the histogram flat: the mean of a uniform on [-1, 1] is 0
    e = equalize_histogram(rng.gamma(2.0, 1.0, 10000))
    assert abs(e.mean() - 0.5) < 0.01 and e.min() == 0 and e.max() == 1
    u8 = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    assert get_preset("cxr", size=64)(u8).image.shape == (1, 64, 64)


def test_fill_holes_matches_scipy():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    for _ in range(10):
        a = ndi.binary_opening(rng.uniform(size=(4, 20, 21)) < 0.55)
        np.testing.assert_array_equal(fill_mask_holes(a, 0), np.stack([ndi.binary_fill_holes(x) for x in a]))
        np.testing.assert_array_equal(fill_mask_holes(a), ndi.binary_fill_holes(a))


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(10, 1, 5000), rng.normal(50, 2, 3000)])
    t = otsu_threshold(x)  # any threshold in the empty gap between the modes is optimal
    assert (x[:5000] < t).mean() > 0.99 and (x[5000:] > t).all()
