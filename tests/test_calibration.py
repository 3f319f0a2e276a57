"""Healthy-only calibration: the record train writes, predict --threshold (masks, components) and evaluate's
calibrated metrics, against numpy / scipy / scikit-learn brute force."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medanomaly.app.datasets import open_dataset
from medanomaly.app.errors import PipelineError
from medanomaly.app.evaluate import evaluate_run
from medanomaly.app.predict import load_run, predict_arrays, predict_files
from medanomaly.app.train import train_run
from medanomaly.cli import app
from medanomaly.data import make_toy_dataset
from medanomaly.data.dataset import stack_dataset
from medanomaly.evaluation.calibration import (
    FPR_GRID,
    QuantileSketch,
    components_table,
    decision_metrics,
    parse_threshold,
    quantile_from_record,
    voxel_metrics_at,
)
from medanomaly.run_folder import RunFolder

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
SIZE = 32


def _png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 healthy train, 6 healthy val, 4 healthy + 4 lesioned test PNGs (32 px) with masks, as a CSV."""
    root = tmp_path_factory.mktemp("caldata")
    parts = [("train", make_toy_dataset(8, SIZE, seed=1)), ("val", make_toy_dataset(6, SIZE, seed=2)),
             ("test", make_toy_dataset(8, SIZE, abnormal_fraction=0.5, seed=3, lesion_intensity=0.5))]
    rows = []
    for split, ds in parts:
        for i in range(len(ds)):
            s = ds[i]
            name = f"{split}_{i:02d}"
            _png(root / f"{name}.png", np.round(s["image"][0].numpy() * 255))
            row = {"case_id": name, "image": f"{name}.png", "mask": "", "label": int(s["label"]), "split": split}
            if split == "test":
                _png(root / f"{name}_mask.png", s["mask"][0].numpy() * 255)
                row["mask"] = f"{name}_mask.png"
            rows.append(row)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def run2d(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("calruns") / "zscore"
    train_run("zscore", manifest, run, size=SIZE, quiet=True)
    return run


def _healthy_val(run: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    """Foreground voxel scores and image scores of the healthy val images, predicted directly."""
    det, cfg = load_run(run)
    d = cfg["data"]
    b = stack_dataset(open_dataset(manifest, "val", normal_only=True, preset=d["preset"], size=d["size"],
                                   preset_config=d["preset_config"]))
    maps, scores = predict_arrays(det, b["image"].numpy(), b["foreground"].numpy(), 4)
    return maps[b["foreground"][:, 0].numpy().astype(bool)], scores


def invoke(*args: object):  # noqa: ANN201 - click Result
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the sketch and the rule -----------------------------------------------------------------------------------
def test_quantile_sketch_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    sk = QuantileSketch(k=300)
    for chunk in np.array_split(x, 17):
        sk.update(chunk)
    assert sk.n == x.size and sk.hi == x.max() and sk.lo == x.min()
    rec = sk.record()
    assert rec["n"] == 5000 and rec["max"] == x.max() and rec["mean"] == pytest.approx(x.mean())
    for row in rec["quantiles"]:
        want = np.quantile(x, 1 - row["fpr"], method="higher")
        tail = 4999 - int(np.ceil((1 - row["fpr"]) * 4999 - 1e-9))
        if tail < 300:  # the tail is inside the exact top-k
            assert row["exact"] and row["value"] == want
        else:  # from the uniform sample of 300: approximate, and said so
            assert not row["exact"] and abs(np.mean(x > row["value"]) - row["fpr"]) < 0.12
    big = QuantileSketch(k=10_000)
    big.update(x)
    assert all(r["exact"] and r["value"] == np.quantile(x, 1 - r["fpr"], method="higher") for r in big.record()["quantiles"])
    assert len(json.dumps(big.record())) < 8000
    # off the grid: log-linear interpolation between the two neighbours
    v, note = quantile_from_record(big.record(), 0.015)
    lo, hi = quantile_from_record(big.record(), 0.02)[0], quantile_from_record(big.record(), 0.01)[0]
    assert lo <= v <= hi and "interpolated" in note and 0.01 in FPR_GRID


def test_parse_threshold_rules_and_errors() -> None:
    r = parse_threshold("fpr=0.01,image-fpr=0.05")
    assert (r.fpr, r.value, r.image_fpr) == (0.01, None, 0.05)
    assert parse_threshold("0.3").value == 0.3 and parse_threshold("-1").value == -1.0
    for bad, msg in [("fpr=2", r"\(0, 1\)"), ("fpr=abc", "needs a number"), ("fpr=0", r"\(0, 1\)"), ("nope", "is not"),
                     ("fpr=0.1,0.3", "at most one"), ("", "empty"), ("inf", "finite")]:
        with pytest.raises(ValueError, match=msg):
            parse_threshold(bad)


# -- metric functions against brute force ------------------------------------------------------------------------
def test_voxel_and_decision_metrics_against_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = np.random.default_rng(1)
    s, m, f = rng.random((3, 9, 9)), rng.random((3, 9, 9)) < 0.2, rng.random((3, 9, 9)) < 0.8
    t = 0.6
    got = voxel_metrics_at(s, m, f, t)
    y, p = m[f], s[f] > t
    assert got["dice"] == pytest.approx(f1_score(y, p)) and got["precision"] == pytest.approx(precision_score(y, p))
    assert got["recall"] == pytest.approx(recall_score(y, p)) and got["fpr"] == pytest.approx((p & ~y).sum() / (~y).sum())
    sc, lab = rng.random(40), rng.random(40) < 0.5
    dm = decision_metrics(sc, lab, 0.5)
    assert dm["accuracy"] == pytest.approx(accuracy_score(lab, sc > 0.5))
    assert dm["sensitivity"] == pytest.approx(recall_score(lab, sc > 0.5))
    assert dm["specificity"] == pytest.approx(recall_score(~lab, sc <= 0.5))


def test_components_table_against_scipy_label() -> None:
    from scipy import ndimage

    amap = np.zeros((6, 7, 5), np.float32)
    amap[0:2, 0:2, 0:2] = 3.0
    amap[4:6, 3:7, 1] = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    amap[3, 0, 4] = 9.0
    mask = amap > 0.5
    aff = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    rows = components_table(mask, amap, aff)
    lab, n = ndimage.label(mask)
    assert len(rows) == n == 3
    for r in rows:
        sel = lab == r["component"]
        idx = np.argwhere(sel).mean(0)
        assert r["voxels"] == sel.sum() and r["volume_ml"] == pytest.approx(sel.sum() * 9.0 / 1000)
        assert r["peak_score"] == amap[sel].max() and r["mean_score"] == pytest.approx(amap[sel].mean())
        assert [r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"]] == pytest.approx(aff[:3, :3] @ idx + aff[:3, 3])
    assert components_table(np.zeros((4, 4), bool), np.zeros((4, 4)), np.eye(4)) == []
    two = components_table(mask[:, :, 1], amap[:, :, 1], np.eye(4))
    assert len(two) == ndimage.label(mask[:, :, 1])[1] and two[0]["centroid_z_mm"] == 0.0


# -- train: the record ------------------------------------------------------------------------------------------
def test_train_records_healthy_val_quantiles(run2d: Path, manifest: Path) -> None:
    folder = RunFolder(run2d)
    folder.require_finished()
    assert "calibration.json" in json.loads((run2d / "finished.json").read_text())["files"]
    cal = folder.read_calibration()
    vox, img = _healthy_val(run2d, manifest)
    assert "validation" in cal["source"] and cal["n_images"] == 6 == cal["image"]["n"] and cal["voxel"]["n"] == vox.size
    for row in cal["voxel"]["quantiles"]:
        assert row["exact"] and row["value"] == pytest.approx(np.quantile(vox, 1 - row["fpr"], method="higher"), rel=1e-6)
    for row in cal["image"]["quantiles"]:
        assert row["value"] == pytest.approx(np.quantile(img, 1 - row["fpr"], method="higher"), rel=1e-6)
    t = quantile_from_record(cal["voxel"], 0.01)[0]
    realised = np.mean(vox > t)
    assert 0.008 <= realised <= 0.01  # the voxel FPR on healthy validation is what was asked for
    assert (run2d / "calibration.json").stat().st_size < 10_000


def test_train_without_val_falls_back_to_training_images(tmp_path: Path) -> None:
    train_run("intensity", make_toy_dataset(4, 16, seed=0), tmp_path / "r", val_split=None, quiet=True)
    cal = RunFolder(tmp_path / "r").read_calibration()
    assert "training" in cal["source"] and "no validation split" in cal["note"] and cal["n_images"] == 4


# -- predict --threshold ---------------------------------------------------------------------------------------
def test_predict_threshold_png_mask_components_scores(run2d: Path, manifest: Path, tmp_path: Path) -> None:
    from PIL import Image

    png = manifest.parent / "test_07.png"
    out = tmp_path / "p"
    predict_files(run2d, [png], out, quiet=True, threshold="fpr=0.01,image-fpr=0.05")
    cal = RunFolder(run2d).read_calibration()
    t = quantile_from_record(cal["voxel"], 0.01)[0]
    it = quantile_from_record(cal["image"], 0.05)[0]
    mask = np.asarray(Image.open(out / "test_07_mask.png")) > 0
    amap_png = np.asarray(Image.open(out / "test_07_anomaly.png"))
    assert mask.shape == amap_png.shape and mask.any()
    row = next(csv.DictReader(open(out / "scores.csv")))
    assert float(row["threshold"]) == pytest.approx(t, rel=1e-5) and int(row["voxels_above"]) == mask.sum()
    assert row["abnormal"] == str(float(row["image_score"]) > it).lower() and row["threshold_rule"].startswith("fpr=0.01")
    comps = list(csv.DictReader(open(out / "test_07_components.csv")))
    assert sum(int(c["voxels"]) for c in comps) == mask.sum()
    # image-fpr only: the decision, no mask
    predict_files(run2d, [png], tmp_path / "q", quiet=True, threshold="image-fpr=0.05")
    row = next(csv.DictReader(open(tmp_path / "q" / "scores.csv")))
    assert row["abnormal"] in ("true", "false") and row["voxels_above"] == ""
    assert not (tmp_path / "q" / "test_07_mask.png").exists()
    # a threshold <= 0 still keeps the background (outside the preset's foreground) out of the mask
    predict_files(run2d, [png], tmp_path / "z", quiet=True, threshold="-1e9")
    allm = np.asarray(Image.open(tmp_path / "z" / "test_07_mask.png")) > 0
    assert allm.any() and not allm.all() and (allm | ~mask).all()


def test_mask_geometry_volume_through_2d_run(run2d: Path, tmp_path: Path) -> None:
    import nibabel as nib

    ds = make_toy_dataset(1, SIZE, spatial_dims=3, abnormal_fraction=1.0, seed=5)
    vol = (ds[0]["image"][0].numpy() * 100).astype(np.float32)
    aff = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "vol.nii.gz"))
    predict_files(run2d, [tmp_path / "vol.nii.gz"], tmp_path / "o", quiet=True, threshold="0")
    m = nib.load(str(tmp_path / "o" / "vol_mask.nii.gz"))
    amap = np.asarray(nib.load(str(tmp_path / "o" / "vol_anomaly.nii.gz")).dataobj)
    data = np.asarray(m.dataobj)
    assert m.shape == vol.shape and np.allclose(m.affine, aff) and data.dtype == np.uint8
    assert data.any() and (amap[data > 0] > 0).all()  # dropped slices (map 0) are never above a threshold of 0
    comps = list(csv.DictReader(open(tmp_path / "o" / "vol_components.csv")))
    assert sum(int(c["voxels"]) for c in comps) == int(data.sum())
    assert sum(float(c["volume_ml"]) for c in comps) == pytest.approx(data.sum() * 2.0 / 1000, rel=1e-4)


def test_mask_geometry_3d_run(tmp_path: Path) -> None:
    import nibabel as nib

    ds = make_toy_dataset(4, 16, spatial_dims=3, seed=5)
    lines = ["case_id,image,label,split"]
    for i in range(4):
        nib.save(nib.Nifti1Image((ds[i]["image"][0].numpy() * 100).astype(np.float32), np.eye(4)), str(tmp_path / f"v{i}.nii.gz"))
        lines.append(f"v{i},v{i}.nii.gz,0,{'train' if i < 3 else 'val'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    train_run("intensity", tmp_path / "m.csv", tmp_path / "r3", quiet=True)
    cal = RunFolder(tmp_path / "r3").read_calibration()
    assert cal["n_images"] == 1 and "validation" in cal["source"]
    aff = np.array([[0, 0, 1.2, -3], [1.1, 0, 0, 4], [0, 1.0, 0, 2], [0, 0, 0, 1]])
    test = (make_toy_dataset(1, 16, spatial_dims=3, abnormal_fraction=1.0, seed=9)[0]["image"][0].numpy() * 100)
    nib.save(nib.Nifti1Image(test[:, :, :14].astype(np.float32), aff), str(tmp_path / "t.nii.gz"))
    predict_files(tmp_path / "r3", [tmp_path / "t.nii.gz"], tmp_path / "o", quiet=True, threshold="fpr=0.05")
    m = nib.load(str(tmp_path / "o" / "t_mask.nii.gz"))
    assert m.shape == (16, 16, 14) and np.allclose(m.affine, aff) and np.asarray(m.dataobj).any()


# -- evaluate --------------------------------------------------------------------------------------------------
def test_evaluate_calibrated_metrics_against_brute_force(run2d: Path, manifest: Path) -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    m = evaluate_run(run2d, manifest, None, split="test", quiet=True)
    cal = RunFolder(run2d).read_calibration()
    t = quantile_from_record(cal["voxel"], 0.01)[0]
    it = quantile_from_record(cal["image"], 0.05)[0]
    det, cfg = load_run(run2d)
    d = cfg["data"]
    b = stack_dataset(open_dataset(manifest, "test", preset=d["preset"], size=d["size"], preset_config=d["preset_config"]))
    maps, scores = predict_arrays(det, b["image"].numpy(), b["foreground"].numpy(), 4)
    f = b["foreground"][:, 0].numpy().astype(bool)
    y, p = b["mask"][:, 0].numpy().astype(bool)[f], maps[f] > t
    assert m["calibrated_threshold"] == pytest.approx(t) and m["calibrated_rule"].startswith("fpr=0.01")
    assert m["calibrated_dice"] == pytest.approx(f1_score(y, p))
    assert m["calibrated_precision"] == pytest.approx(precision_score(y, p))
    assert m["calibrated_recall"] == pytest.approx(recall_score(y, p))
    assert m["calibrated_fpr"] == pytest.approx((p & ~y).sum() / (~y).sum())
    lab = b["label"].numpy().astype(bool)
    assert m["calibrated_accuracy"] == pytest.approx(accuracy_score(lab, scores > it))
    assert m["calibrated_sensitivity"] == pytest.approx(recall_score(lab, scores > it))
    assert m["calibrated_specificity"] == pytest.approx(recall_score(~lab, scores <= it))
    m2 = evaluate_run(run2d, manifest, None, split="test", quiet=True, threshold="0.5")
    assert m2["calibrated_threshold"] == 0.5 and "calibrated_accuracy" not in m2


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_threshold_and_missing_calibration_one_line(run2d: Path, manifest: Path, tmp_path: Path) -> None:
    png = manifest.parent / "test_00.png"
    for spec, msg in [("fpr=2", "(0, 1)"), ("fpr=abc", "needs a number")]:
        res = invoke("predict", run2d, png, "--out", tmp_path / "p", "--threshold", spec)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code != 0 and len(lines) == 1 and msg in lines[0] and lines[0].startswith("error:")
        assert not (tmp_path / "p" / "scores.csv").exists()
    # a run written without calibration (as before this change)
    det, cfg = load_run(run2d)
    old = tmp_path / "old"
    det.save(old, sections={k: cfg[k] for k in ("data", "train", "sources") if k in cfg})
    assert RunFolder(old).read_calibration() is None
    res = invoke("predict", old, png, "--out", tmp_path / "p", "--threshold", "fpr=0.01")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "re-train" in lines[0] and "number" in lines[0]
    assert invoke("predict", old, png, "--out", tmp_path / "n", "--threshold", "0.5").exit_code == 0
    with pytest.raises(PipelineError, match="re-train"):
        evaluate_run(old, manifest, None, quiet=True, threshold="fpr=0.01")
    with pytest.warns(UserWarning, match="no calibration"):
        m = evaluate_run(old, manifest, None, quiet=True)
    assert np.isnan(m["calibrated_dice"]) and "re-train" in m["calibrated_dice_undefined"]
    res = invoke("evaluate", run2d, "--data", manifest, "--out", tmp_path / "e", "--threshold", "image-fpr=abc")
    assert res.exit_code != 0 and "needs a number" in res.output


def test_calibration_file_is_hashed(run2d: Path, tmp_path: Path) -> None:
    import shutil

    from medanomaly.run_folder import RunFolderError

    dst = shutil.copytree(run2d, tmp_path / "copy")
    rec = json.loads((dst / "calibration.json").read_text())
    rec["voxel"]["quantiles"][0]["value"] += 1.0
    (dst / "calibration.json").write_text(json.dumps(rec))
    with pytest.raises(RunFolderError, match="calibration.json: changed"):
        RunFolder(dst).require_finished()
    (dst / "calibration.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match="not a calibration record"):
        RunFolder(dst).read_calibration()
