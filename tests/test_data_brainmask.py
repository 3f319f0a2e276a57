"""Unsupervised brain mask (skull strip) and the ``foreground="brain"`` option of the brain presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.data import data_root, get_preset, load_dataset
from medanomaly.data.io import DataError
from medanomaly.data.masks import brain_mask

torch.set_num_threads(1)


def _phantom(n_slices: int = 6, size: int = 96, seed: int = 0):
    """A FLAIR-like head: dark background, bright scalp ring, dark bone gap, grey brain disc with a dark ventricle
    and a bright lesion blob near the brain edge. Returns image (S, H, W), brain disc, ring, blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx * 1.1)
    brain = r < 0.34 * size
    gap = (r >= 0.34 * size) & (r < 0.40 * size)
    ring = (r >= 0.40 * size) & (r < 0.46 * size)
    vent = np.hypot(yy, xx * 2.5) < 0.06 * size
    blob = np.hypot(yy + 0.22 * size, xx - 0.08 * size) < 0.07 * size
    img = np.zeros((n_slices, size, size), np.float32)
    for k in range(n_slices):
        sl = 4 + 2 * rng.standard_normal((size, size))
        sl[brain] = 80 + 6 * rng.standard_normal(int(brain.sum()))
        sl[vent] = 15
        sl[gap] = 12 + 3 * rng.standard_normal(int(gap.sum()))
        sl[ring] = 200 + 10 * rng.standard_normal(int(ring.sum()))
        sl[blob] = 190
        img[k] = sl
    return img.clip(0, None), brain, ring, blob


def test_brain_mask_keeps_disc_and_blob_drops_ring():
    img, brain, ring, blob = _phantom()
    bm = brain_mask(img)
    assert bm.shape == img.shape and bm.dtype == bool
    for k in range(len(img)):
        inter = (bm[k] & brain).sum()
        assert inter / brain.sum() > 0.95  # the brain disc (ventricle filled as a hole)
        assert (bm[k] & ~brain).sum() / brain.sum() < 0.10  # little outside it (the dilation adds a 1 px rim)
        assert bm[k][blob].all()  # the bright lesion stays inside
        assert not (bm[k] & ring).any()  # the scalp ring is gone
    # one 2D slice, the N-D path and the 2D component rule agree on the disc
    one = brain_mask(img[0])
    assert one.shape == img.shape[1:] and (one & brain).sum() / brain.sum() > 0.95 and not (one & ring).any()
    per_slice = brain_mask(img, component="2d")
    assert not (per_slice & ring).any() and per_slice[:, blob].all()
    # slices along another axis give the same mask
    moved = brain_mask(np.moveaxis(img, 0, 2), slice_axis=2)
    assert np.array_equal(np.moveaxis(moved, 2, 0), bm)


def test_brain_mask_bad_input():
    with pytest.raises(DataError, match="2D slice or a 3D"):
        brain_mask(np.zeros((2, 2, 8, 8)))
    with pytest.raises(DataError, match="head mask shape"):
        brain_mask(np.ones((3, 16, 16)), head=np.ones((3, 16, 15), bool))
    with pytest.raises(ValueError, match="component"):
        brain_mask(_phantom(2, 48)[0], component="biggest")
    assert not brain_mask(np.zeros((3, 16, 16))).any()


def test_preset_foreground_brain():
    img, brain, ring, blob = _phantom(size=64)
    head = get_preset("brain-mri-2d", size=64).apply_slices(img)
    st = get_preset("brain-mri-2d", size=64, foreground="brain").apply_slices(img)
    assert head.foreground[:, 0][:, ring].all() and not st.foreground[:, 0][:, ring].any()
    assert st.foreground[:, 0][:, blob].all()
    # percentile clip over the brain: the blob (brightest brain tissue) saturates; scalp is outside and zeroed
    assert st.images[:, 0][:, blob].mean() > 0.95 and st.images[:, 0][:, ring].max() == 0
    assert st.meta["intensity"]["high"] < head.meta["intensity"]["high"]
    # slice filter: same head-fraction rule as with "head"
    assert np.array_equal(st.keep, head.keep) and np.allclose(st.fg_fraction, head.fg_fraction)
    assert (st.meta["brain_fraction"] < st.fg_fraction).all()
    one = get_preset("brain-mri-2d", size=64, foreground="brain")(img[0])
    assert one.foreground.shape == (1, 64, 64) and not one.foreground[0][ring].any()
    with pytest.raises(ValueError, match="head' or 'brain"):
        get_preset("brain-mri-2d", foreground="skull").apply_slices(img)
    vol = get_preset("brain-mri-3d", spacing=None, orientation=None, crop_foreground=False, size=(64, 64, 6),
                     foreground="brain")(np.moveaxis(img, 0, 2))
    assert not vol.foreground[0][..., 2][ring].any() and vol.foreground[0][..., 2][blob].all()


ROOT = data_root(required=False)


@pytest.mark.skipif(ROOT is None or not (ROOT / "brain_lgg_flair_2d").is_dir(), reason="shared data absent")
@pytest.mark.realdata
def test_lgg_default_brain_foreground():
    head = load_dataset("lgg-flair-2d", "val", max_cases=1, size=64, foreground="head")
    ds = load_dataset("lgg-flair-2d", "val", max_cases=1, size=64)
    assert ds.preset_obj.params["foreground"] == "brain"
    named = load_dataset("lgg-flair-2d", "val", max_cases=1, size=64, preset="brain-mri-2d")
    assert named.preset_obj.params["foreground"] == "brain" and len(named) == len(ds)
    assert len(ds) <= len(head) and (ds.labels == 1).sum() == (head.labels == 1).sum()  # no tumour slice lost
    mid = len(ds) // 2
    b, h = ds[mid]["foreground"], head[mid]["foreground"]
    assert ds.case_ids[mid] == head.case_ids[mid]
    assert 0.3 * h.sum() < b.sum() < 0.95 * h.sum() and not (b & ~h).any()  # brain: strictly inside the head
