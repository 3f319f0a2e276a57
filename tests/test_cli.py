"""The ``medanomaly`` command line end to end on small generated files (PNG/NIfTI + a CSV manifest)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medanomaly.cli import app
from medanomaly.data import make_toy_dataset

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SIZE = 32
COMMANDS = ("train", "predict", "evaluate", "validate", "benchmark", "demo", "list", "synth")


def _runner() -> CliRunner:
    return CliRunner()


def invoke(*args: str, ok: bool = True, env: dict[str, str] | None = None):  # noqa: ANN201 - click Result
    res = _runner().invoke(app, [str(a) for a in args], env=env)
    if ok:
        assert res.exit_code == 0, f"{args}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def _write_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 healthy train, 4 healthy val, 6 healthy + 6 lesioned test PNG images (32 px) with masks, as a CSV."""
    root = tmp_path_factory.mktemp("toydata")
    parts = [
        ("train", make_toy_dataset(12, SIZE, seed=1)),
        ("val", make_toy_dataset(4, SIZE, seed=2)),
        ("test", make_toy_dataset(12, SIZE, abnormal_fraction=0.5, seed=3, lesion_intensity=0.5)),
    ]
    rows = []
    for split, ds in parts:
        for i in range(len(ds)):
            s = ds[i]
            img = np.round(s["image"][0].numpy() * 255)
            name = f"{split}_{i:02d}"
            _write_png(root / f"{name}.png", img)
            row = {"case_id": name, "image": f"{name}.png", "mask": "", "label": int(s["label"]), "split": split}
            if split == "test":
                _write_png(root / f"{name}_mask.png", s["mask"][0].numpy() * 255)
                row["mask"] = f"{name}_mask.png"
            rows.append(row)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def intensity_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "intensity"
    invoke("train", "intensity", "--data", manifest, "--out", run, "--size", SIZE, "--quiet")
    return run


# -- help ------------------------------------------------------------------------------------------------------
def test_help_of_every_command() -> None:
    res = invoke("--help")
    for cmd in COMMANDS:
        assert cmd in res.output
        sub = invoke(cmd, "--help")
        assert "Usage" in sub.output and "Examples" in sub.output, cmd
        assert "medanomaly " + cmd in sub.output, cmd


def test_list_shows_methods_datasets_presets() -> None:
    res = invoke("list")
    for word in ("intensity", "autoencoder", "cpu-small", "lgg-flair-2d", "brain-mri-2d"):
        assert word in res.output
    info = json.loads(invoke("list", "--json").output)
    assert "cpu-small" in info["methods"]["autoencoder"]


# -- train / evaluate / predict ------------------------------------------------------------------------------
def test_train_writes_a_complete_run_folder(intensity_run: Path) -> None:
    import yaml

    for f in ("config.yaml", "weights.safetensors", "state.json", "versions.json"):
        assert (intensity_run / f).is_file(), f
    cfg = yaml.safe_load((intensity_run / "config.yaml").read_text())
    assert cfg["method"] == "intensity"
    assert cfg["data"]["preset_config"]["name"] == "brain-mri-2d"
    assert cfg["data"]["preset_config"]["size"] == SIZE
    assert cfg["data"]["image_shape"] == [SIZE, SIZE]
    assert cfg["data"]["n_train"] == 12 and cfg["data"]["n_val"] == 4
    assert cfg["train"]["seed"] == 0
    assert not (intensity_run / "request.yaml").exists()


def test_evaluate_writes_metrics_and_report(intensity_run: Path, manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    res = invoke("evaluate", intensity_run, "--data", manifest, "--split", "test", "--out", out, "--quiet")
    assert "pixel_ap=" in res.output
    m = json.loads((out / "metrics.json").read_text())
    for k in ("pixel_ap", "pixel_auroc", "best_dice", "sample_ap", "sample_auroc", "seconds_per_image", "device"):
        assert k in m, k
    assert m["n_images"] == 12 and m["n_abnormal"] == 6 and m["n_with_mask"] == 12
    # bright lesions on a toy brain: the normalised intensity finds them far better than chance
    assert m["pixel_auroc"] > 0.8 and m["sample_auroc"] > 0.8
    assert 0 < m["best_dice"] <= 1 and m["seconds_per_image"] > 0
    page = (out / "report.html").read_text()
    assert "pixel_ap" in page and "<img" in page
    # existing output is not overwritten without --force
    res = invoke("evaluate", intensity_run, "--data", manifest, "--out", out, ok=False)
    assert res.exit_code != 0 and "--force" in res.output
    invoke("evaluate", intensity_run, "--data", manifest, "--out", out, "--force", "--quiet")


def test_predict_png_and_nifti_inputs(intensity_run: Path, manifest: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from PIL import Image

    png = manifest.parent / "test_11.png"
    vol = np.asarray(Image.open(png), dtype=np.float32)
    # the same image at another size: the map must come back at the input's size
    big = tmp_path / "big.png"
    Image.fromarray(vol.astype(np.uint8)).resize((48, 40)).save(big)
    nii = tmp_path / "slice.nii.gz"
    aff = np.diag([0.9, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), str(nii))
    out = tmp_path / "maps"
    invoke("predict", intensity_run, png, big, nii, "--out", out, "--quiet")
    m = np.asarray(Image.open(out / "test_11_anomaly.png"))
    assert m.shape == vol.shape
    assert np.asarray(Image.open(out / "big_anomaly.png")).shape == (40, 48)
    back = nib.load(str(out / "slice_anomaly.nii.gz"))
    assert back.shape[:2] == vol.shape and np.allclose(back.affine, aff)
    for stem in ("test_11", "big", "slice"):
        assert (out / f"{stem}_overlay.png").is_file()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 3 and all(float(r["image_score"]) == float(r["image_score"]) for r in rows)
    # the lesion is where the map is high: mean map inside the lesion > outside
    mask = np.asarray(Image.open(manifest.parent / "test_11_mask.png")) > 0
    assert m[mask].mean() > m[~mask].mean()
    res = invoke("predict", intensity_run, png, "--out", out, ok=False)
    assert res.exit_code != 0 and "already exists" in res.output


def test_predict_volume_through_2d_run_keeps_geometry(intensity_run: Path, tmp_path: Path) -> None:
    import nibabel as nib

    ds = make_toy_dataset(3, SIZE, spatial_dims=3, abnormal_fraction=1.0, seed=5)
    vol = ds[0]["image"][0].numpy() * 100
    aff = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol.astype(np.float32), aff), str(tmp_path / "vol.nii.gz"))
    invoke("predict", intensity_run, tmp_path / "vol.nii.gz", "--out", tmp_path / "o", "--quiet")
    back = nib.load(str(tmp_path / "o" / "vol_anomaly.nii.gz"))
    assert back.shape == vol.shape and np.allclose(back.affine, aff)
    amap = np.asarray(back.dataobj)
    lesion = ds[0]["mask"][0].numpy()
    assert amap[lesion].mean() > amap[~lesion & (vol > 0)].mean()


def test_autoencoder_few_steps_train_resume_evaluate(manifest: Path, tmp_path: Path) -> None:
    import yaml

    run = tmp_path / "ae"
    args = ("train", "autoencoder", "--data", manifest, "--out", run, "--size", SIZE, "--config-set", "test",
            "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--seed", "3", "--quiet")
    invoke(*args)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log and any("loss" in r for r in log)
    res = invoke(*args, ok=False)  # finished run: refused without --force
    assert res.exit_code != 0 and "--force" in res.output
    # an unfinished run (no finished marker: killed before it) needs --resume; resuming with other settings is refused
    (run / "finished.json").unlink()
    (run / "request.yaml").write_text("method: autoencoder\n")
    res = invoke(*args, ok=False)
    assert "--resume" in res.output
    res = invoke(*args, "--resume", ok=False)
    assert "different settings" in res.output
    invoke(*args, "--force")
    # killed after its last checkpoint, while writing the run folder: --resume finishes it from the checkpoint
    (run / "finished.json").unlink()
    (run / "config.yaml").unlink()
    (run / ".weights.safetensors.abcd1234.tmp").write_bytes(b"partial")  # a torn write; cleaned when the run resumes
    invoke(*args, "--resume")
    assert not (run / ".weights.safetensors.abcd1234.tmp").exists()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 3 and (run / "finished.json").is_file()
    res = invoke("evaluate", run, "--data", manifest, "--out", tmp_path / "ev", "--quiet")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["method"] == "autoencoder" and m["pixel_ap"] is not None


def test_benchmark_two_methods(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ("benchmark", "--methods", "intensity,autoencoder", "--data", manifest, "--config-set", "test", "--out", out,
            "--quiet")
    invoke(*args)
    for ext in ("md", "csv", "html"):
        assert (out / f"comparison.{ext}").is_file()
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["method"] for r in rows] == ["intensity", "autoencoder"]
    for r in rows:
        assert float(r["seconds_per_image"]) > 0 and r["pixel_ap"] != "" and r["device"]
    assert (out / "eval" / "autoencoder" / "report.html").is_file()
    # a second call reuses the finished runs
    invoke(*args)
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert all(r["reused_run"] == "True" for r in rows)


# -- errors: one line, non-zero exit, no traceback ------------------------------------------------------------
def _one_line_error(res) -> str:  # noqa: ANN001
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_error_unknown_method(manifest: Path, tmp_path: Path) -> None:
    msg = _one_line_error(invoke("train", "nosuchmethod", "--data", manifest, "--out", tmp_path / "r", ok=False))
    assert "nosuchmethod" in msg and "intensity" in msg


def test_error_unknown_config_key(manifest: Path, tmp_path: Path) -> None:
    msg = _one_line_error(invoke("train", "intensity", "--data", manifest, "--out", tmp_path / "r", "--set", "bogus=1",
                                 ok=False))
    assert "bogus" in msg
    msg = _one_line_error(invoke("train", "intensity", "--data", manifest, "--out", tmp_path / "r", "--set", "novalue",
                                 ok=False))
    assert "key=value" in msg
    msg = _one_line_error(invoke("train", "intensity", "--data", manifest, "--out", tmp_path / "r", "--config-set",
                                 "nosuchset", ok=False))
    assert "nosuchset" in msg
    assert not (tmp_path / "r").exists()


def test_error_bad_run_folders(intensity_run: Path, manifest: Path, tmp_path: Path) -> None:
    msg = _one_line_error(invoke("evaluate", tmp_path / "missing", "--out", tmp_path / "e", ok=False))
    assert "does not exist" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _one_line_error(invoke("evaluate", empty, "--out", tmp_path / "e", ok=False))
    assert "config.yaml" in msg
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((intensity_run / "config.yaml").read_text())
    msg = _one_line_error(invoke("predict", broken, manifest.parent / "test_00.png", "--out", tmp_path / "p", ok=False))
    assert "did not finish" in msg and "finished.json" in msg
    # a benchmark folder whose run comes from another method
    bench = tmp_path / "bench"
    other = bench / "runs" / "autoencoder"
    other.mkdir(parents=True)
    for f in intensity_run.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    msg = _one_line_error(invoke("benchmark", "--methods", "autoencoder", "--data", manifest, "--config-set", "test",
                                 "--out", bench, ok=False))
    assert "other settings" in msg


def test_error_input_geometry_does_not_fit(intensity_run: Path, tmp_path: Path) -> None:
    import nibabel as nib

    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32), np.eye(4)), str(four_d))
    msg = _one_line_error(invoke("predict", intensity_run, four_d, "--out", tmp_path / "p", ok=False))
    assert "series.nii.gz" in msg and "shape" in msg
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    msg = _one_line_error(invoke("predict", intensity_run, bad, "--out", tmp_path / "p", ok=False))
    assert "bad.png" in msg
    msg = _one_line_error(invoke("predict", intensity_run, tmp_path / "nope.png", "--out", tmp_path / "p", ok=False))
    assert "nope.png" in msg


def test_demo_without_data_says_where_it_looked(tmp_path: Path) -> None:
    empty = tmp_path / "nodata"
    empty.mkdir()
    res = invoke("demo", "--out", tmp_path / "demo", ok=False, env={"MEDANOMALY_DATA": str(empty)})
    msg = _one_line_error(res)
    assert str(empty) in msg and "MEDANOMALY_DATA" in msg
    assert not (tmp_path / "demo").exists()


def test_synth_writes_grids(tmp_path: Path) -> None:
    res = invoke("synth", "cutpaste", "--data", "toy", "--out", tmp_path / "s", "-n", "2", "--quiet")
    assert (tmp_path / "s" / "cutpaste_toy.png").is_file() and "cutpaste_toy.png" in res.output
    msg = _one_line_error(invoke("synth", "nosuchtask", "--data", "toy", "--out", tmp_path / "s", ok=False))
    assert "nosuchtask" in msg
