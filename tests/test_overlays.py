"""Clinician overlays: the healthy colour scale, the display geometry (radiological view, mm positions) and the
case figure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medanomaly.evaluation.calibration import QuantileSketch
from medanomaly.evaluation.overlays import (
    colour_lut,
    composite,
    healthy_scale,
    image_scale,
    map_scale,
    render_case,
    slice_view,
)


def _calibration(n: int = 200_000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vox, img = QuantileSketch(k=n), QuantileSketch(k=1000)
    vox.update(rng.standard_normal(n))
    img.update(rng.standard_normal(100))
    return {"source": "test healthy images", "voxel": vox.record(), "image": img.record()}


def test_healthy_scale_levels_are_healthy_exceedance() -> None:
    cal = _calibration()
    s = healthy_scale(cal, "intensity")
    assert s is not None and s.kind == "healthy"
    # a standard normal: 1 % of healthy voxels lie above 2.326, 0.1 % above 3.09
    assert s.level(2.326) == pytest.approx(2.0, abs=0.05)
    assert s.level(3.09) == pytest.approx(3.0, abs=0.1)
    assert np.isnan(s.position(0.0))  # below the healthy 90th percentile: not drawn
    assert s.position(10.0) == 1.0
    assert [t for t, _ in s.ticks] == [1.0, 2.0, 3.0, 4.0]
    assert "healthy" in s.label and "intensity" in s.label
    js = s.to_json()
    assert js["kind"] == "healthy" and len(js["xp"]) == len(js["yp"])


def test_scale_is_shared_by_images_and_falls_back_per_image() -> None:
    cal = _calibration()
    a, b = np.full((8, 8), 2.5), np.full((8, 8), 2.5) * 1.0
    b[0, 0] = 50.0  # another image with a hot outlier: same score, same colour on the healthy scale
    s = map_scale(cal, a)
    assert np.allclose(s.position(a)[1, 1], s.position(b)[1, 1])
    fb = map_scale(None, b)
    assert fb.kind == "image" and "NOT comparable" in fb.note
    assert healthy_scale({"voxel": {"n": 3, "quantiles": [{"fpr": 0.1, "value": 1.0}]}}) is None
    with pytest.raises(ValueError):
        map_scale(None)


def test_composite_colours_only_above_the_scale() -> None:
    s = image_scale(np.linspace(0, 1, 100).reshape(10, 10))
    grey = np.full((10, 10), 0.5)
    amap = np.zeros((10, 10))
    amap[5:, 5:] = 0.95  # mid-scale
    rgb = composite(grey, amap, s)
    assert np.allclose(rgb[0, 0], 0.5)  # below the scale: grey
    assert rgb[9, 9, 0] > rgb[9, 9, 2] + 0.3  # above: warm colour
    assert colour_lut().shape == (256, 3)


def test_slice_view_radiological_axial_with_mm_positions() -> None:
    # an LPS-stored volume (like BraTS): i -> patient left, j -> posterior, k -> superior, 2 mm slices
    aff = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 20], [0, 0, 2, -10], [0, 0, 0, 1]])
    vol = np.zeros((20, 21, 6))
    vol[2, 10, 3] = 1.0  # small i: patient's RIGHT (x = -i... i increases to the left)
    v = slice_view(vol.shape, aff)
    assert v.n == 6 and v.labels == ("R", "L", "A", "P")
    assert v.positions[0] == pytest.approx(-10.0) and v.positions[3] == pytest.approx(-4.0)
    sl = v.get(vol, 3)
    r, c = np.argwhere(sl == 1.0)[0]
    assert c < sl.shape[1] / 2  # patient's right is drawn on the screen's left
    vol2 = np.zeros_like(vol)
    vol2[10, 1, 3] = 1.0  # small j: anterior (j runs posterior)
    r, c = np.argwhere(v.get(vol2, 3) == 1.0)[0]
    assert r < sl.shape[0] / 2  # anterior at the top
    plain = slice_view((5, 6))
    assert plain.labels is None and "no L/R" in plain.note


def test_render_case_2d_and_3d(tmp_path) -> None:
    from PIL import Image

    cal = _calibration()
    s = healthy_scale(cal, "zscore")
    img = np.random.default_rng(1).normal(1.0, 0.1, (40, 40)).astype(np.float32)
    amap = np.zeros((40, 40), np.float32)
    amap[10:20, 10:20] = 4.0
    les = amap > 0
    p = render_case(tmp_path / "c2.png", img, amap, scale=s, lesion=les, threshold=2.3, title="2D case")
    rgb = np.asarray(Image.open(p).convert("RGB")).astype(int)
    warm = (rgb[..., 0] > 200) & (rgb[..., 1] > 120) & (rgb[..., 2] < 120)
    assert warm.sum() > 100  # the map's colours are drawn
    vol = np.random.default_rng(2).normal(1.0, 0.1, (24, 24, 16)).astype(np.float32)
    vmap = np.zeros_like(vol)
    vmap[5:10, 5:10, 9] = 5.0
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    p3 = render_case(tmp_path / "c3.png", vol, vmap, scale=s, affine=aff, lesion=vmap > 0, foreground=vol > 0,
                     threshold=2.3, n_montage=6)
    w, h = Image.open(p3).size
    assert w > h > 300  # the large slice beside a montage
    with pytest.raises(ValueError):
        render_case(tmp_path / "bad.png", vol, vmap[..., :3], scale=s)


def test_importing_overlays_does_not_load_matplotlib() -> None:
    code = "import sys, medanomaly.evaluation.overlays; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _brats_case0():  # noqa: ANN202 - a path or None
    from medanomaly.data.roots import data_root

    root = data_root(required=False)
    case = None if root is None else root / "brain_brats2018_3d" / "case_0"
    return case if case is not None and case.is_dir() else None


@pytest.mark.realdata
@pytest.mark.skipif(_brats_case0() is None, reason="shared data absent")
def test_real_brats_volume_is_shown_radiologically(tmp_path) -> None:
    """A real BraTS FLAIR (stored LPS): its tumour lies on the patient's left (world x below the brain's centre),
    so the radiological view draws it right of the image centre; slice positions are the affine's z in mm."""
    from medanomaly.data.io import read_image, read_mask

    case = _brats_case0()
    img, gt = read_image(case / "FLAIR.nii.gz"), read_mask(case / "GT_W.nii.gz").array
    ijk = np.argwhere(gt).mean(0)
    brain = np.argwhere(img.array > 0).mean(0)
    world = img.affine[:3, :3] @ (ijk - brain)
    assert world[0] < 0  # the tumour is on the patient's left (RAS: -x)
    v = slice_view(img.array.shape, img.affine)
    assert v.labels == ("R", "L", "A", "P")
    k = int(np.argmax([v.get(gt, i).sum() for i in range(v.n)]))
    cols = np.argwhere(v.get(gt, k))[:, 1]
    assert cols.mean() > v.get(gt, k).shape[1] / 2  # drawn on the screen's right, where "L" is
    z_world = (img.affine @ np.r_[ijk, 1.0])[2]
    assert abs(v.positions[k] - z_world) < 15  # the slice with the most lesion is near the lesion's centroid height
    # the figure on it, with the FLAIR intensity as a stand-in map on a per-image scale
    amap = np.where(img.array > 0, img.array, 0).astype(np.float32)
    p = render_case(tmp_path / "brats.png", img.array, amap, scale=image_scale(amap, img.array > 0), affine=img.affine,
                    lesion=gt, foreground=img.array > 0, threshold=float(np.percentile(amap[amap > 0], 99)))
    assert p.stat().st_size > 50_000
