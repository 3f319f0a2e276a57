"""Readers and writers: NIfTI, DICOM (file and series), PNG, overlays; geometry round-trips."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medanomaly.data import Loaded, read_image, read_mask, save_overlay_png, write_nifti_map, write_png_map
from medanomaly.data.io import DataError, read_dicom
from medanomaly.data.presets import get_preset

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "badinput" / "make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
sys.modules["make_corpus"] = corpus
_spec.loader.exec_module(corpus)
make_dicom = corpus.make_dicom


def _lps_affine() -> np.ndarray:
    # a BraTS-like LPS volume with a rotation-free, non-trivial origin
    return np.array([[-1.0, 0, 0, 10.0], [0, -1.0, 0, 60.0], [0, 0, 1.5, -20.0], [0, 0, 0, 1]])


def test_nifti_roundtrip_affine(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 500, (12, 10, 8)).astype(np.float32)
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, _lps_affine()), str(p))
    ld = read_image(p, expect_dims=3)
    np.testing.assert_allclose(ld.array, vol)
    np.testing.assert_allclose(ld.affine, _lps_affine())
    assert ld.spacing == (1.0, 1.0, 1.5) and ld.orientation == "LPS"
    out = write_nifti_map(vol * 2, ld, tmp_path / "map.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, _lps_affine())
    np.testing.assert_allclose(np.asarray(back.dataobj), vol * 2)
    # a 4D file with one time point is squeezed to 3D
    nib.save(nib.Nifti1Image(vol[..., None], np.eye(4)), str(tmp_path / "v4.nii"))
    assert read_image(tmp_path / "v4.nii", expect_dims=3).shape == vol.shape
    with pytest.raises(DataError, match="differs from the reference"):
        write_nifti_map(vol[:5], ld, tmp_path / "bad.nii.gz")


def test_preprocessed_map_overlays_input(tmp_path):
    """A map computed on the brain-mri-3d output, written with map_affine, lands on the input voxels."""
    shape = (40, 36, 30)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = ((g**2).sum(0) < 0.6).astype(np.float32)
    vol = head * (100 + 50 * g[0] + 30 * g[2])
    ld = Loaded(vol, _lps_affine(), (), {"path": "synthetic"})
    pre = get_preset("brain-mri-3d", spacing=2.0)(ld)
    assert pre.image.shape[1:] == tuple(-(-s // 16) * 16 for s in pre.image.shape[1:])
    amap = pre.image[0]  # the normalised image itself
    path = write_nifti_map(amap, ld, tmp_path / "m.nii.gz", map_affine=pre.affine)
    back = np.asarray(nib.load(str(path)).dataobj)
    assert back.shape == shape
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(head > 0, iterations=2)  # away from the resampled (blurred) edge
    corr = np.corrcoef(back[inner], vol[inner])[0, 1]
    assert corr > 0.99


def _px(rng, shape=(6, 5)):
    return rng.integers(0, 4000, shape).astype(np.uint16)


def test_dicom_rescale_window_monochrome(tmp_path):
    rng = np.random.default_rng(1)
    px = _px(rng)
    p = make_dicom(tmp_path / "a.dcm", px, slope=2.0, intercept=-1024.0, window=(40.0, 400.0))
    ld = read_image(p)
    np.testing.assert_allclose(ld.array, px * 2.0 - 1024.0)
    assert ld.meta["window_center"] == 40.0 and ld.meta["window_width"] == 400.0
    assert ld.spacing == (0.5, 0.7)
    w = read_dicom(p, window=True).array
    assert w.min() >= -160 and w.max() <= 240
    # MONOCHROME1: high stored values are dark -> inverted; window centre follows the values
    p1 = make_dicom(tmp_path / "b.dcm", px, photometric="MONOCHROME1", window=(1000.0, 500.0))
    l1 = read_image(p1)
    np.testing.assert_allclose(l1.array, 4095.0 - px)
    assert l1.meta["inverted"] and l1.meta["window_center"] == 3095.0
    # no rescale tags: identity
    np.testing.assert_allclose(read_image(make_dicom(tmp_path / "c.dcm", px)).array, px)
    # a DICOM without a suffix is recognised by its preamble
    (tmp_path / "noext").write_bytes(p.read_bytes())
    np.testing.assert_allclose(read_image(tmp_path / "noext").array, px * 2.0 - 1024.0)


def test_dicom_series_sorted_by_position(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "series"
    d.mkdir()
    z = [5.0, -1.0, 2.0, 8.0]  # file order != spatial order; instance numbers deliberately wrong
    slices = [_px(rng) for _ in z]
    for k, (zk, s) in enumerate(zip(z, slices, strict=True)):
        make_dicom(d / f"f{k}.dcm", s, position=(-10.0, 20.0, zk), instance=10 - k, slope=1.0, intercept=0.0)
    ld = read_image(d)
    order = np.argsort(z)
    assert ld.shape == (5, 6, 4)  # (col, row, slice)
    for j, k in enumerate(order):
        np.testing.assert_allclose(ld.array[:, :, j], slices[k].T)
    assert ld.meta["sorted_by"] == "ImagePositionPatient"
    # affine: LPS -> RAS, columns 0.7 mm along x, rows 0.5 mm along y, 3 mm between slices along z
    np.testing.assert_allclose(ld.affine[:3, 3], [10.0, -20.0, -1.0])
    np.testing.assert_allclose(np.diag(ld.affine)[:3], [-0.7, -0.5, 3.0])
    assert ld.orientation == "LPS"
    # no positions: InstanceNumber order
    d2 = tmp_path / "series2"
    d2.mkdir()
    for k, s in enumerate(slices):
        make_dicom(d2 / f"f{k}.dcm", s, position=None, instance=[3, 1, 4, 2][k])
    l2 = read_image(d2)
    assert l2.meta["sorted_by"] == "InstanceNumber"
    for j, k in enumerate([1, 3, 0, 2]):
        np.testing.assert_allclose(l2.array[:, :, j], slices[k].T)


def test_png_roundtrip_and_mask(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (20, 24))
    p = write_png_map(a, tmp_path / "m.png", vmin=0, vmax=1)
    back = read_image(p).array
    assert back.shape == (20, 24) and back.dtype == np.uint8
    np.testing.assert_allclose(back / 255.0, a, atol=1 / 255 + 1e-9)
    rgb = (rng.uniform(0, 255, (8, 9, 3))).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    assert read_image(tmp_path / "rgb.jpg").shape == (8, 9)
    Image.fromarray((a > 0.5).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    m = read_mask(tmp_path / "mask.png").array
    assert m.dtype == bool and np.array_equal(m, a > 0.5)
    Image.fromarray(rng.integers(0, 255, (8, 9), dtype=np.uint8)).save(tmp_path / "t.tif")
    assert read_image(tmp_path / "t.tif").shape == (8, 9)


def test_overlay_png(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    img = rng.uniform(0, 1, (32, 32)).astype(np.float32)
    heat = np.zeros_like(img)
    heat[10:20, 10:20] = 1
    p = save_overlay_png(torch.from_numpy(img), heat, heat > 0.5, tmp_path / "o.png", title="t")
    im = np.asarray(Image.open(p))
    assert im.ndim == 3 and im.shape[0] > 100
    vol = rng.uniform(0, 1, (16, 16, 8))
    hv = np.zeros_like(vol)
    hv[..., 5] = 1
    assert save_overlay_png(vol, hv, None, tmp_path / "o3.png").exists()
    with pytest.raises(DataError, match="shapes differ"):
        save_overlay_png(img, heat[:5], None, tmp_path / "bad.png")


def test_geometry_and_dtype_checks(tmp_path, monkeypatch):
    """Complex arrays, boolean images, degenerate DICOM geometry, 2D NIfTI with pixdim[3] = 0, write errors."""
    import medanomaly.data.io as io_mod
    from medanomaly.data.io import check_array

    with pytest.raises(DataError, match="complex-valued"):
        check_array(np.ones((3, 3), np.complex64), "c.npy")
    assert check_array(np.ones((3, 3), bool)).dtype == bool

    # boolean voxels are a mask: refused by read_image, accepted by read_mask
    p = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(np.eye(4, dtype=np.uint8), np.eye(4)), str(p))
    real = io_mod.read_nifti
    monkeypatch.setattr(io_mod, "read_nifti", lambda path: Loaded(real(path).array > 0, np.eye(4), (1.0, 1.0)))
    with pytest.raises(DataError, match="boolean data"):
        read_image(p)
    assert read_mask(p).array.sum() == 4
    monkeypatch.undo()

    # a 2D NIfTI whose third pixdim is 0 is fine (only the first two axes matter)
    p2 = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.arange(30, dtype=np.float32).reshape(5, 6), np.eye(4)), str(p2))
    q = corpus.patch_nifti(p2, tmp_path / "flat0.nii", pixdim=[1, 0.5, 0.5, 0, 1, 1, 1, 1])
    assert read_image(q).shape == (5, 6)

    d = make_dicom(tmp_path / "zero_sp.dcm", np.arange(16).reshape(4, 4), spacing=(0.0, 1.0))
    with pytest.raises(DataError, match=r"zero_sp\.dcm: DICOM PixelSpacing \(0\.0, 1\.0\) must be positive"):
        read_dicom(d)
    series = tmp_path / "iop"
    series.mkdir()
    for k in range(2):
        make_dicom(series / f"{k}.dcm", np.full((4, 4), k + 1), position=(0, 0, k), orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(DataError, match="does not give two independent directions"):
        read_image(series)
    nested = tmp_path / "nested"
    (nested / "series1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"only subfolders \['series1'\]"):
        read_image(nested)

    target = tmp_path / "taken.nii.gz"
    target.mkdir()
    with pytest.raises(DataError, match=r"taken\.nii\.gz: cannot write the file"):
        write_nifti_map(np.ones((4, 4, 4)), np.eye(4), target)


def test_manifest_slice_numbers_must_differ(tmp_path):
    from PIL import Image

    from medanomaly.data import read_manifest

    for j in range(2):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) + j).save(tmp_path / f"{j}.png")
    man = tmp_path / "m.csv"
    man.write_text("case_id,image,slice\nc,0.png,3\nc,1.png,3\n")
    with pytest.raises(DataError, match=r"case_id 'c': rows \[1, 2\] repeat a slice number"):
        read_manifest(man)
    man.write_text("case_id,image,slice\nc,0.png,x\n")
    with pytest.raises(DataError, match="slice 'x' is not a whole number"):
        read_manifest(man)


def test_single_row_image_is_refused(tmp_path):
    from PIL import Image

    p = tmp_path / "row.png"
    Image.fromarray(np.arange(20, dtype=np.uint8)[None]).save(p)
    with pytest.raises(DataError, match=r"row\.png: image is a single row or column of pixels \(shape \(1, 20\)\)"):
        read_image(p)


def test_float32_overflow_is_named(tmp_path):
    p = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 1e300), np.eye(4)), str(p))
    with pytest.raises(DataError, match=r"big\.nii: voxel values .* overflow float32"):
        read_image(p)
