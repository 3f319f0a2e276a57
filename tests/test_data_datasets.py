"""Datasets: manifests (CSV/JSON, 2D images and 3D volumes, slice/volume views) and the shared real data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medanomaly.data import data_root, list_datasets, load_dataset, stack_dataset, write_manifest
from medanomaly.data.dataset import SAMPLE_KEYS

torch.set_num_threads(1)


def _disc(size, rng, lesion):
    g = np.stack(np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij"))
    fg = (g**2).sum(0) < 0.6
    img = fg * (120 + 20 * rng.standard_normal((size, size))).clip(1, 250)
    m = np.zeros((size, size), bool)
    if lesion:
        m = ((g - 0.2) ** 2).sum(0) < 0.02
        img[m] = 250
    return img.astype(np.uint8), m


def test_manifest_csv_2d(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(6):
        img, m = _disc(40, rng, lesion=i >= 4)
        Image.fromarray(img).save(tmp_path / "img" / f"c{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "img" / f"c{i}_mask.png")
        recs.append({"case_id": f"c{i}", "image": f"img/c{i}.png", "mask": f"img/c{i}_mask.png",
                     "label": None if i == 5 else int(i >= 4), "split": "train" if i < 3 else "test"})
    man = write_manifest(recs, tmp_path / "m.csv")
    train = load_dataset(man, "train", size=32)
    assert len(train) == 3 and train.spatial_dims == 2 and list(train.labels) == [0, 0, 0]
    test = load_dataset(str(man), "test", size=32)
    assert list(test.labels) == [0, 1, 1]  # c5 has no label: taken from its mask
    b = stack_dataset(test)
    assert set(SAMPLE_KEYS) <= set(b)
    assert b["image"].shape == (3, 1, 32, 32) and b["mask"][1:].any() and not b["mask"][0].any()
    rest = b["foreground"] & ~b["mask"]
    assert b["image"][b["mask"]].mean() > b["image"][rest].mean() + 0.3  # the bright lesion sits under its mask
    assert len(load_dataset(man, "test", normal_only=True)) == 1
    assert len(load_dataset(man, "all", preset="cxr", size=16)) == 6
    with pytest.raises(ValueError, match="splits present"):
        load_dataset(man, "val")


def test_manifest_json_3d_views(tmp_path):
    rng = np.random.default_rng(1)
    aff = np.diag([-1.5, -1.5, 3.0, 1.0])
    recs = []
    for i in range(2):
        shape = (32, 32, 12)
        g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        fg = (g**2).sum(0) < 0.8
        vol = (fg * (100 + 10 * rng.standard_normal(shape))).clip(0).astype(np.float32)
        m = (((g - 0.2) ** 2).sum(0) < 0.05) if i == 1 else np.zeros(shape, bool)
        vol[m] = 300
        nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / f"v{i}.nii.gz"))
        nib.save(nib.Nifti1Image(m.astype(np.uint8), aff), str(tmp_path / f"v{i}_seg.nii.gz"))
        recs.append({"case_id": f"v{i}", "image": f"v{i}.nii.gz", "mask": f"v{i}_seg.nii.gz", "split": "test",
                     "patient_id": f"p{i}"})
    (tmp_path / "m.json").write_text(json.dumps(recs))
    vols = load_dataset(tmp_path / "m.json", "test", size=(32, 32, 32), spacing=3.0)
    assert vols.spatial_dims == 3 and list(vols.labels) == [0, 1]
    b = stack_dataset(vols)
    assert b["image"].shape == (2, 1, 32, 32, 32) and b["mask"][1].sum() > 0
    assert "".join(nib.aff2axcodes(vols.geometry(1)["affine"])) == "RAS"
    sl = load_dataset(tmp_path / "m.json", "test", view="slices", size=24, min_fg_fraction=0.05)
    s = sl[0]
    assert s["image"].shape == (1, 24, 24) and s["slice_index"] >= 0
    assert sl.labels.sum() > 0 and set(sl.case_ids) == {"v0", "v1"}
    normal = load_dataset(tmp_path / "m.json", "test", view="slices", size=24, normal_only=True)
    assert all(not normal[i]["mask"].any() for i in range(len(normal)))
    # lazy loading with a one-volume cache: re-reading after eviction gives the same sample; samples are copies
    small = load_dataset(tmp_path / "m.json", "test", view="slices", size=24, cache_size=1, min_fg_fraction=0.05)
    first = small[0]["image"].clone()
    small[0]["image"].zero_()
    small[len(small) - 1]  # another volume evicts the first
    assert torch.equal(small[0]["image"], first)


def test_slice_cache_preprocesses_each_small_volume_once(tmp_path, monkeypatch):
    """Indexing reads every volume; iterating afterwards must not preprocess them again when they fit the byte
    budget (was: a count-limited cache evicted all but the last 8, so every volume was preprocessed twice).
    With no byte budget the cache holds ``cache_size`` entries and re-reads give the same samples."""
    import medanomaly.data.dataset as dsmod

    rng = np.random.default_rng(1)
    recs = []
    for i in range(5):
        vol = np.stack([_disc(32, rng, lesion=(i == 0 and k == 4))[0] for k in range(8)], -1).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / f"v{i}.nii.gz")
        recs.append({"case_id": f"v{i}", "image": f"v{i}.nii.gz", "split": "test", "label": int(i == 0)})
    (tmp_path / "m.json").write_text(json.dumps(recs))
    kw = dict(view="slices", size=24, cache_size=2, min_fg_fraction=0.05)
    ds = load_dataset(tmp_path / "m.json", "test", **kw)
    first = [ds[i]["image"].clone() for i in range(len(ds))]
    assert ds._cache.made == 5 and len(ds._cache.data) == 5 and 0 < ds._cache.nbytes < dsmod.CACHE_BYTES
    monkeypatch.setattr(dsmod, "CACHE_BYTES", 0)
    tight = load_dataset(tmp_path / "m.json", "test", **kw)
    again = [tight[i]["image"] for i in range(len(tight))]
    assert len(tight._cache.data) == 2 and tight._cache.made > 5
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_list_datasets():
    assert set(list_datasets()) == {"lgg-flair-2d", "brats2018-3d", "ixi-t1-3d", "pneumoniamnist", "cxr-kermany-256"}


# --------------------------------------------------------------------------------------------- real data (skips)
ROOT = data_root(required=False)
real = pytest.mark.skipif(ROOT is None or not (ROOT / "brain_lgg_flair_2d").is_dir(), reason="shared data absent")


@real
@pytest.mark.realdata
def test_lgg_two_patients():
    ds = load_dataset("lgg-flair-2d", "train", max_cases=2, size=64)
    pids = json.loads((ROOT / "brain_lgg_flair_2d" / "splits.json").read_text())["train"][:2]
    assert set(ds.case_ids) == set(pids)
    z = {p: np.load(ROOT / "brain_lgg_flair_2d" / "volumes" / f"{p}.npz") for p in pids}
    total = sum(len(v["slice_number"]) for v in z.values())
    assert len(ds) + ds.n_dropped == total
    for i in range(0, len(ds), 3):
        s = ds[i]
        v = z[s["case_id"]]
        k = int(np.flatnonzero(v["slice_number"] == s["slice_index"])[0])
        assert s["label"] == int(v["mask"][k].any())
        assert s["image"].shape == (1, 64, 64) and 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["foreground"].float().mean() >= 0.01  # brain foreground (min_brain_fraction); head >= 0.10
    normal = load_dataset("lgg-flair-2d", "train", max_cases=2, size=64, normal_only=True)
    assert len(normal) == int((ds.labels == 0).sum()) and not stack_dataset(normal)["mask"].any()


@real
@pytest.mark.realdata
def test_pneumoniamnist_and_3d_views():
    ds = load_dataset("pneumoniamnist", "test", max_cases=30)
    b = stack_dataset(ds)
    assert b["image"].shape == (30, 1, 64, 64) and b["image"].min() >= -1 and b["image"].max() <= 1
    assert set(ds.labels.tolist()) <= {0, 1}
    assert (load_dataset("pneumoniamnist", "train", max_cases=10).labels == 0).all()
    # IXI (2 mm PSR) and BraTS (1 mm LPS) end up in the same grid
    br = load_dataset("brats2018-3d", "test", max_cases=1)
    ix = load_dataset("ixi-t1-3d", "val", max_cases=1)
    sb, si = br[0], ix[0]
    assert sb["image"].shape == si["image"].shape == (1, 96, 128, 128)
    for g in (br.geometry(0), ix.geometry(0)):
        assert "".join(nib.aff2axcodes(g["affine"])) == "RAS"
        np.testing.assert_allclose(np.sqrt((g["affine"][:3, :3] ** 2).sum(0)), [2, 2, 2], atol=1e-4)
    assert sb["label"] == 1 and sb["mask"].any() and si["label"] == 0 and si["has_mask"]


def test_one_data_root_finder(tmp_path, monkeypatch):
    from medanomaly.data import roots, samples

    assert samples.data_root is roots.data_root  # the datasets use the one finder
    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path))
    root, looked = roots.find_data_root()
    assert root == tmp_path.resolve() and looked == [f"{tmp_path} (MEDANOMALY_DATA)"]
    root, looked = roots.find_data_root(require="brain_lgg_flair_2d")  # a root must hold the sub-folder asked for
    assert root is None and len(looked) == 1
    (tmp_path / "brain_lgg_flair_2d").mkdir()
    assert roots.find_data_root(require="brain_lgg_flair_2d")[0] == tmp_path.resolve()
    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path / "missing"))
    assert roots.find_data_root() == (None, [f"{tmp_path / 'missing'} (MEDANOMALY_DATA)"])
    monkeypatch.delenv("MEDANOMALY_DATA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert tmp_path / "shared" / "data" in roots.candidates()
    root, looked = roots.find_data_root()
    assert root is not None and looked[-1] in (str(c) for c in roots.candidates())


def test_item_dataset_inverts_maps_to_the_input_grid():
    from medanomaly.data import ItemDataset, get_preset

    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (21, 19, 15)], indexing="ij"))
    vol = ((g**2).sum(0) < 0.6) * (100 + 20 * g[0]).astype(np.float32)
    pre = get_preset("brain-mri-3d", spacing=3.0)
    ds = ItemDataset([("c0", lambda: pre(vol), 0)], spatial_dims=3, preset=pre.name)
    item = ds.preprocessed(0)
    back = ds.invert(0, item.image, mode="linear")
    assert back.shape == vol.shape
    want = pre.invert(item.foreground, item.meta, "nearest")
    np.testing.assert_array_equal(ds.invert(0, item.foreground, mode="nearest"), want)
    with pytest.raises(ValueError, match="no preset"):
        ItemDataset([("c1", lambda: type(item)(item.image, item.foreground), 0)], spatial_dims=3).invert(0, item.image)
