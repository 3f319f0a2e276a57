"""Other people's scans (issue 13): skull-stripped, z-scored or negative-background volumes get the right foreground,
guards warn (or fail with --strict) instead of staying silent, and the CLI options that say what the data are."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medanomaly.app.guards import (
    GuardError,
    GuardWarning,
    coverage_guard,
    dropped_guard,
    intensity_guard,
    intensity_shift,
    intensity_stats,
    lesion_guard,
    raise_or_warn,
    summarise_records,
)
from medanomaly.cli import app
from medanomaly.data import data_root, get_preset
from medanomaly.data.io import DataError
from medanomaly.data.masks import brain_mask, detect_skull_stripped, lesion_labels, scan_foreground, select_lesion

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SIZE = 64


# --------------------------------------------------------------------------------------------------- phantoms
def skull_on(n_slices: int = 8, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A raw FLAIR-like head (S, H, W): noisy background, bright scalp ring, dark bone gap, grey brain disc with a
    dark ventricle and a bright lesion blob. Returns the image, the brain disc and the blob (H, W)."""
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
    return img.clip(0, None), brain, blob


def stripped(n_slices: int = 8, size: int = SIZE, seed: int = 0, background: float = 0.0, zscore: bool = False,
             negatives: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same head skull-stripped: the brain disc on an exactly constant ``background``; ``zscore``: brain
    z-scored (background 0 then lies mid-range); ``negatives``: that many background voxels set to -300."""
    img, brain, blob = skull_on(n_slices, size, seed)
    b3 = np.broadcast_to(brain, img.shape)
    out = np.where(b3, img, 0).astype(np.float32)
    if zscore:
        v = out[b3]
        out = np.where(b3, (out - v.mean()) / v.std(), background).astype(np.float32)
    else:
        out[~b3] = background
    if negatives:
        rng = np.random.default_rng(seed + 1)
        where = np.argwhere(~b3)
        out[tuple(where[rng.choice(len(where), negatives, replace=False)].T)] = -300.0
    return out, brain, blob


VARIANTS = {"raw": {}, "zscored-bg0": {"zscore": True}, "zscored-negative-bg": {"zscore": True, "background": -2.5},
            "few-negative-voxels": {"negatives": 5}}


# ------------------------------------------------------------------------------------------------- detection
def test_detection_tells_skull_on_from_skull_stripped() -> None:
    img, _, _ = skull_on()
    assert not detect_skull_stripped(img, 0)["skull_stripped"]
    # raw scans may hold many exact zeros (8-bit LGG, IXI): the noise inside them keeps them "skull-on"
    zeroed = np.where(img < 6, 0, img).astype(np.float32)
    det = detect_skull_stripped(zeroed, 0)
    assert det["background"] == 0.0 and det["background_fraction"] > 0.15 and not det["skull_stripped"]
    for kw in VARIANTS.values():
        det = detect_skull_stripped(stripped(**kw)[0], 0)
        assert det["skull_stripped"], (kw, det)
    assert detect_skull_stripped(stripped(zscore=True)[0], 0)["below_background"] > 0.3  # z-scored: bg mid-range


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_skull_stripped_input_is_not_stripped_again(variant: str) -> None:
    """The old path (the morphological strip meant for skull-on LGG) keeps nothing of a skull-stripped brain; the
    preset now detects the input and takes the brain as it is, background exactly 0, any background value."""
    img, brain, blob = stripped(**VARIANTS[variant])
    assert (brain_mask(img)[:, brain]).mean() < 0.5  # what foreground="brain" did before
    for kind in ("brain", "head"):
        st = get_preset("brain-mri-2d", size=SIZE, foreground=kind).apply_slices(img)
        fg = st.foreground[:, 0]
        assert fg[:, brain].mean() > 0.99 and fg[:, ~brain].mean() < 0.01, (kind, fg[:, brain].mean(), fg[:, ~brain].mean())
        assert fg[:, blob].all() and st.keep.all()
        assert st.images.min() == 0.0 and st.images.max() <= 1.0 and (st.images[:, 0][:, ~brain] == 0).all()
        assert st.meta["foreground"]["skull_stripped"]["skull_stripped"]
        assert st.meta["foreground"]["kept_coverage"] > 0.99 if kind == "brain" else True
    assert "skull-stripped" in get_preset("brain-mri-2d", size=SIZE, foreground="brain").apply_slices(img) \
        .meta["foreground"]["source"]
    vol = get_preset("brain-mri-3d", spacing=None, orientation=None, crop_foreground=False, size=(SIZE, SIZE, 8),
                     foreground="brain")(np.moveaxis(img, 0, 2))
    assert vol.foreground[0][brain].mean() > 0.99 and vol.foreground[0][~brain].mean() < 0.01


def test_negative_background_is_not_foreground_with_head() -> None:
    for kw in VARIANTS.values():
        img = stripped(**kw)[0]
        fg, head, rec = scan_foreground(img, "head", slice_axis=0)
        assert fg.mean() < 0.5, (kw, fg.mean())  # the disc (~32 % of the box), never the whole box
    # skull-on with a few strongly negative voxels (interpolation ringing): still the head, not the box
    img, brain, _ = skull_on()
    img[0, 0, :5] = -300.0
    fg, _, _ = scan_foreground(img, "head", slice_axis=0)
    assert 0.4 < fg.mean() < 0.7


def test_skull_on_head_still_gets_the_strip() -> None:
    img, brain, blob = skull_on()
    st = get_preset("brain-mri-2d", size=SIZE, foreground="brain").apply_slices(img)
    rec = st.meta["foreground"]
    assert rec["source"] == "unsupervised skull strip" and not rec["skull_stripped"]["skull_stripped"]
    assert st.foreground[:, 0][:, brain].mean() > 0.95 and st.foreground[:, 0][:, blob].all()
    assert 0.3 < rec["kept_coverage"] < 0.8


def test_given_brain_mask_and_foreground_kinds() -> None:
    img, brain, _ = skull_on()
    small = np.zeros(img.shape, bool)
    small[:, 20:40, 20:40] = True
    pre = get_preset("brain-mri-2d", size=SIZE, foreground="mask")
    st = pre.apply_slices(img, brain=small)
    assert np.array_equal(st.foreground[:, 0], small) and st.meta["foreground"]["source"] == "given brain mask"
    assert (st.images[:, 0][~small] == 0).all()
    st_b = get_preset("brain-mri-2d", size=SIZE, foreground="brain").apply_slices(img, brain=small)
    assert np.array_equal(st_b.foreground[:, 0], small)
    with pytest.raises(DataError, match="needs a brain mask"):
        pre.apply_slices(img)
    with pytest.raises(DataError, match="shape"):
        pre.apply_slices(img, brain=small[:, :10])
    st_all = get_preset("brain-mri-2d", size=SIZE, foreground="all").apply_slices(img)
    assert st_all.foreground.all() and st_all.meta["foreground"]["source"] == "every voxel"
    with pytest.raises(ValueError, match="foreground"):
        get_preset("brain-mri-2d", foreground="skull")
    # 3D: the brain mask follows the image through reorientation and resampling
    vol = get_preset("brain-mri-3d", spacing=2.0, size=(32, 32, 8), foreground="mask")(np.moveaxis(img, 0, 2),
                                                                                       brain=np.moveaxis(small, 0, 2))
    assert 0 < vol.foreground.sum() < vol.foreground.size / 2


# ------------------------------------------------------------------------------------------------ lesion labels
def test_lesion_labels() -> None:
    assert lesion_labels("1,2,4") == (1, 2, 4) and lesion_labels(">0") == ">0" and lesion_labels(None) is None
    assert lesion_labels([4, 1]) == (1, 4) and lesion_labels(2) == (2,)
    for bad in ("a,b", "1.5", "", True):
        with pytest.raises(ValueError, match="lesion labels"):
            lesion_labels(bad)
    lab = np.array([[0, 1, 2], [3, 4, 0]], np.uint8)
    assert select_lesion(lab, (1, 4)).tolist() == [[False, True, False], [False, True, False]]
    assert select_lesion(lab.astype(np.float32), ">0").sum() == 4
    with pytest.raises(DataError, match="non-integer"):
        select_lesion(np.array([0.5, 1.0]), (1,))


# ------------------------------------------------------------------------------------------------------ guards
def test_each_guard_fires_and_strict_raises() -> None:
    recs = {"a": {"foreground": "brain", "source": "unsupervised skull strip", "kept_coverage": 0.05, "n_slices": 10,
                  "n_dropped": 8},
            "b": {"foreground": "brain", "source": "unsupervised skull strip", "head_voxels": 100, "foreground_voxels": 90,
                  "n_slices": 10, "n_dropped": 1}}
    s = summarise_records(recs)
    assert s["head_coverage_min"] == 0.05 and s["low_coverage_cases"] == ["a"] and s["dropped_slices"] == 9
    assert coverage_guard(s, "x") and "5 %" in coverage_guard(s, "x")[0]
    assert dropped_guard(s, "x") == [] and dropped_guard({"slices": 10, "dropped_slices": 6}, "x")
    assert lesion_guard(2, 100, "x") and not lesion_guard(1, 100, "x") and not lesion_guard(0, 0, "x")
    train = intensity_stats(np.random.default_rng(0).uniform(0, 1, 5000))
    same = intensity_stats(np.random.default_rng(1).uniform(0, 1, 5000))
    far = intensity_stats(np.random.default_rng(1).uniform(0.8, 1.8, 5000))
    assert intensity_shift(same, train) < 0.05 and intensity_shift(far, train) > 0.5
    assert not intensity_guard(intensity_shift(same, train), "x") and intensity_guard(intensity_shift(far, train), "x")
    assert intensity_shift(same, None) is None
    with pytest.warns(GuardWarning, match="covers only"):
        raise_or_warn(coverage_guard(s, "x"), strict=False)
    with pytest.raises(GuardError, match="--strict: .*covers only"):
        raise_or_warn(coverage_guard(s, "x") + lesion_guard(2, 100, "x"), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert raise_or_warn([], strict=True) == []


# ------------------------------------------------------------------------------------------------ files + CLI
def _nifti(path: Path, a: np.ndarray, dtype: type = np.float32) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(a, dtype), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _vol(a: np.ndarray) -> np.ndarray:
    """(S, H, W) slices -> an (H, W, S) volume whose RAS axial slices are those slices."""
    return np.moveaxis(a, 0, 2)


def invoke(*args: object, ok: bool = True):  # noqa: ANN201 - click Result
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"{args}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Skull-on healthy train/val volumes, skull-stripped test volumes (BraTS-like folders, all named FLAIR.nii.gz)
    with multi-class lesion masks (labels 1, 2, 4 in the blob), brain masks, and their manifests."""
    root = tmp_path_factory.mktemp("foreign")
    rows = []
    for i, split in enumerate(["train", "train", "val"]):
        img = skull_on(seed=10 + i)[0]  # its bright blob stands for bright healthy tissue here (same intensities)
        rows.append({"case_id": f"h{i}", "image": str(_nifti(root / f"h{i}.nii.gz", _vol(img))), "split": split,
                     "label": 0})
    test_rows = []
    for i in range(2):
        img, brain, blob = stripped(seed=20 + i)
        case = root / f"case_{i}"
        case.mkdir()
        lab = np.zeros(img.shape, np.uint8)
        lab[:, blob] = 2
        lab[:, blob & (np.arange(SIZE)[None, :] < SIZE // 2)] = 4
        lab[:, blob & (np.arange(SIZE)[:, None] < 14)] = 1
        _nifti(case / "FLAIR.nii.gz", _vol(img))
        _nifti(case / "seg.nii.gz", _vol(lab), np.uint8)
        _nifti(case / "brain.nii.gz", _vol(np.broadcast_to(brain, img.shape)), np.uint8)
        test_rows.append({"case_id": f"case_{i}", "image": str(case / "FLAIR.nii.gz"), "mask": str(case / "seg.nii.gz"),
                          "split": "test", "brain_mask": str(case / "brain.nii.gz")})
    for name, rr in (("train.csv", rows), ("test.csv", test_rows)):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rr[0]))
            w.writeheader()
            w.writerows(rr)
    return {"root": root, "train": root / "train.csv", "test": root / "test.csv"}


@pytest.fixture(scope="module")
def run2d(files: dict[str, Path]) -> Path:
    run = files["root"] / "run"
    invoke("train", "intensity", "--data", f"{files['train']}:view=slices,foreground=brain", "--out", run, "--size",
           SIZE, "--quiet")
    return run


def test_manifest_brain_mask_column_and_view_option(files: dict[str, Path]) -> None:
    from medanomaly.data import load_dataset
    from medanomaly.data.manifest import read_manifest, write_manifest

    recs = read_manifest(files["test"])
    assert recs[0]["brain_mask"].name == "brain.nii.gz"
    out = write_manifest(recs, files["root"] / "copy.csv")
    assert "brain_mask" in open(out).readline()
    ds = load_dataset(f"{files['test']}:view=slices,foreground=mask,lesion_labels='>0'", "test")
    assert ds.prep_records["case_0"]["source"] == "given brain mask" and len(ds) == 16
    bad = files["root"] / "bad.csv"
    bad.write_text(f"case_id,image,brain_mask\nz,{recs[0]['image']},{files['root'] / 'nope.nii.gz'}\n")
    with pytest.raises(DataError, match="brain_mask file"):
        read_manifest(bad)


def test_multiclass_masks_need_lesion_labels(files: dict[str, Path], run2d: Path, tmp_path: Path) -> None:
    res = invoke("evaluate", run2d, "--data", f"{files['test']}:view=slices", "--out", tmp_path / "e0", "-q", ok=False)
    assert res.exit_code == 1 and "--lesion-labels" in res.output and "not binary" in res.output
    m = {}
    for spec in ("1,2,4", ">0", "2"):
        out = tmp_path / f"e{spec.replace(',', '').replace('>', 'gt')}"
        invoke("evaluate", run2d, "--data", f"{files['test']}:view=slices", "--out", out, "--lesion-labels", spec, "-q")
        m[spec] = json.loads((out / "metrics.json").read_text())
    assert m["1,2,4"]["guards"]["lesion_voxels"] == m[">0"]["guards"]["lesion_voxels"]
    assert 0 < m["2"]["guards"]["lesion_voxels"] < m[">0"]["guards"]["lesion_voxels"]
    rec = m[">0"]
    # the LGG-style run (foreground="brain") on skull-stripped volumes with a brain_mask column: detected, the given
    # brain mask used, no guard fires
    assert rec["preprocessing"]["skull_stripped_cases"] == 2 and rec["preprocessing"]["dropped_slices"] == 0
    assert rec["preprocessing"]["foreground_source"] == "given brain mask"
    assert rec["preset_config"]["foreground"] == "brain" and rec["warnings"] == []
    assert rec["guards"]["lesion_voxels_outside"] == 0 and rec["guards"]["intensity_shift"] is not None
    assert "skull-stripped input detected in 2 of 2 cases" in (tmp_path / "egt0" / "report.html").read_text()
    settings = json.loads((tmp_path / "egt0" / "settings.json").read_text())
    assert json.loads(settings["preset"])["foreground"] == "brain" and settings["dropped_slices"] == "{}"
    res = invoke("evaluate", run2d, "--data", "lgg-flair-2d", "--lesion-labels", "1", "--out", tmp_path / "x", ok=False)
    assert res.exit_code == 1 and "applies to manifests" in res.output


def test_guards_in_evaluate_warn_and_strict_fails(files: dict[str, Path], run2d: Path, tmp_path: Path) -> None:
    """--foreground mask with a brain mask that covers a quarter of the disc: lesion voxels fall outside, the
    foreground covers little of the head; warned and recorded, and --strict fails with one line."""
    root = files["root"]
    rows = list(csv.DictReader(open(files["test"])))
    for r in rows:
        tiny = root / f"{r['case_id']}_tiny.nii.gz"
        m = np.zeros((SIZE, SIZE, 8), np.uint8)
        m[30:44, 24:40, :] = 1
        _nifti(tiny, m, np.uint8)
        r["brain_mask"] = str(tiny)
    man = root / "tiny.csv"
    with open(man, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    args = ("evaluate", run2d, "--data", f"{man}:view=slices", "--lesion-labels", ">0", "--foreground", "mask")
    res = invoke(*args, "--out", tmp_path / "w", "-q")
    assert "warning:" in res.output and "covers only" in res.output and "outside the evaluated area" in res.output
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert len(m["warnings"]) >= 2 and m["guards"]["lesion_outside_fraction"] > 0.5
    assert m["preprocessing"]["foreground"] == "mask" and m["preset_config"]["foreground"] == "mask"
    res = invoke(*args, "--out", tmp_path / "s", "--strict", "-q", ok=False)
    assert res.exit_code == 1 and res.output.strip().startswith("error: --strict:") and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "metrics.json").exists()


def test_predict_same_names_brain_mask_and_guards(files: dict[str, Path], run2d: Path, tmp_path: Path) -> None:
    inputs = [files["root"] / f"case_{i}" / "FLAIR.nii.gz" for i in range(2)]
    out = tmp_path / "p"
    res = invoke("predict", run2d, *inputs, "--out", out, "-q")
    assert (out / "case_0_FLAIR_anomaly.nii.gz").is_file() and (out / "case_1_FLAIR_anomaly.nii.gz").is_file()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["skull_stripped"] for r in rows] == ["True", "True"] and rows[0]["foreground"] == "brain"
    assert rows[0]["dropped_slices"] == "0" and rows[0]["warnings"] == "" and "warning:" not in res.output
    # a brain mask covering a quarter of the disc, as the foreground: the coverage guard warns; --strict fails
    tiny = tmp_path / "tiny.nii.gz"
    m = np.zeros((SIZE, SIZE, 8), np.uint8)
    m[30:40, 24:34, :] = 1
    _nifti(tiny, m, np.uint8)
    res = invoke("predict", run2d, inputs[0], "--brain-mask", tiny, "--foreground", "mask", "--out", tmp_path / "q",
                 "-q")
    assert "covers only" in res.output
    res = invoke("predict", run2d, inputs[0], "--brain-mask", tiny, "--foreground", "mask", "--out", tmp_path / "r",
                 "--strict", ok=False)
    assert res.exit_code == 1 and "error: --strict:" in res.output
    res = invoke("predict", run2d, *inputs, "--brain-mask", tiny, "--out", tmp_path / "t", ok=False)
    assert res.exit_code == 1 and "one brain mask per input" in res.output
    res = invoke("predict", run2d, inputs[0], "--preset", "nope", "--out", tmp_path / "u", ok=False)
    assert res.exit_code == 1 and "unknown preset" in res.output


def test_output_stems() -> None:
    from medanomaly.app.predict import output_stems

    assert output_stems(["/d/case_0/FLAIR.nii.gz", "/d/case_1/FLAIR.nii.gz", "/d/x/a.png"]) == \
        ["case_0_FLAIR", "case_1_FLAIR", "a"]
    assert output_stems(["/a/x/c/F.nii.gz", "/b/y/c/F.nii.gz"]) == ["x_c_F", "y_c_F"]
    s = output_stems(["/a/F.nii.gz", "/a/F.nii"])
    assert len(set(s)) == 2


# ------------------------------------------------------------------------------------------------------ real data
ROOT = data_root(required=False)


@pytest.mark.realdata
@pytest.mark.skipif(ROOT is None or not (ROOT / "brain_brats2018_3d" / "case_0").is_dir(), reason="shared data absent")
def test_real_brats_case_foreground_is_the_brain() -> None:
    """A real BraTS FLAIR volume (skull-stripped) through the LGG run's preset (foreground="brain"): the evaluated
    foreground is the brain, not just the tumour, and holds the whole tumour."""
    from medanomaly.data.io import read_image, read_mask

    case = ROOT / "brain_brats2018_3d" / "case_0"
    img, gt = read_image(case / "FLAIR.nii.gz"), read_mask(case / "GT_W.nii.gz")
    st = get_preset("brain-mri-2d", size=96, foreground="brain").apply_volume(img, gt)
    rec = st.meta["foreground"]
    assert rec["skull_stripped"]["skull_stripped"] and rec["source"].startswith("skull-stripped")
    nonzero = int((img.array != 0).sum())
    assert rec["foreground_voxels"] > 0.95 * nonzero  # the brain, not the tumour
    assert rec["foreground_voxels"] > 5 * int(gt.array.sum())
    keep = np.asarray(st.keep)
    m, fg = st.masks[keep, 0], st.foreground[keep, 0]
    assert (m & ~fg).sum() <= 0.01 * m.sum()
    assert keep.mean() > 0.5
