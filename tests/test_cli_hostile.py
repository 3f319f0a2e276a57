"""Hostile inputs through the real command line, by kind: each gives exit code 1 and ONE line ``error: ...`` that
names the file (or the key) and the cause, or a correct success.

Kinds: run folders (config.yaml, weights, log, marker, checkpoints, versions), manifests through ``evaluate``,
``predict`` inputs and outputs, ``train`` options. Two tiny intensity runs (2D PNG, 3D NIfTI) are trained once per
module. Every case is recorded; with ``MEDANOMALY_CLI_TABLE=<file.json>`` the records are written there at the end
(``python tests/badinput/report.py`` does that and adds them to docs/results/badinput.md).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from medanomaly.data import make_toy_dataset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "badinput"))
from make_corpus import make_series, npz_header_only, patch_nifti, png_header_only  # noqa: E402

from test_cli import _write_png, invoke  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SIZE = 32
TABLE_ENV = "MEDANOMALY_CLI_TABLE"
ROWS: list[dict[str, str]] = []
_BASE: list[str] = []


# -- recording and checking --------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    for base in _BASE:
        text = text.replace(base + os.sep, "")
    return text


def refused(kind: str, case: str, res: Any, *fragments: str) -> str:
    """Exit code 1, exactly one output line ``error: ...`` containing every fragment (case-insensitive)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1, f"{case}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {res.output}"
    for f in fragments:
        assert f.lower() in lines[0].lower(), f"{case}: {f!r} not in {lines[0]!r}"
    ROWS.append({"kind": kind, "case": case, "outcome": "exit 1, " + _clean(lines[0])})
    return lines[0]


def succeeded(kind: str, case: str, res: Any, what: str, warnings: int = 0) -> list[str]:
    """Exit code 0 and exactly ``warnings`` lines ``warning: ...``; ``what`` says what was checked."""
    assert res.exit_code == 0, f"{case}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == warnings, f"{case}: {res.output}"
    ROWS.append({"kind": kind, "case": case, "outcome": "ok, " + what + "".join(f"; {_clean(w)}" for w in warn)})
    return warn


@pytest.fixture(scope="module", autouse=True)
def _table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    _BASE.append(str(tmp_path_factory.getbasetemp()))
    yield
    if os.environ.get(TABLE_ENV):
        Path(os.environ[TABLE_ENV]).write_text(json.dumps(ROWS, indent=1))


# -- data and runs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 32 px PNGs: 6 healthy train, 4 test (2 with a lesion, all with masks)."""
    root = tmp_path_factory.mktemp("data2d")
    rows = []
    for split, ds in (("train", make_toy_dataset(6, SIZE, seed=1)),
                      ("test", make_toy_dataset(4, SIZE, abnormal_fraction=0.5, seed=3, lesion_intensity=0.5))):
        for i in range(len(ds)):
            s, name = ds[i], f"{split}_{i:02d}"
            _write_png(root / f"{name}.png", np.round(s["image"][0].numpy() * 255))
            _write_png(root / f"{name}_mask.png", s["mask"][0].numpy() * 255)
            rows.append({"case_id": name, "image": f"{name}.png", "mask": f"{name}_mask.png", "label": int(s["label"]),
                         "split": split})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of three healthy 16^3 NIfTI volumes (1 mm)."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("data3d")
    ds = make_toy_dataset(3, 16, spatial_dims=3, seed=5)
    lines = ["case_id,image,label,split"]
    for i in range(3):
        nib.save(nib.Nifti1Image((ds[i]["image"][0].numpy() * 100).astype(np.float32), np.eye(4)), str(root / f"v{i}.nii.gz"))
        lines.append(f"v{i},v{i}.nii.gz,0,train")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def run2d(data2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "intensity2d"
    invoke("train", "intensity", "--data", data2d, "--out", run, "--size", SIZE, "--quiet")
    return run


@pytest.fixture(scope="module")
def run3d(data3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "intensity3d"
    invoke("train", "intensity", "--data", data3d, "--out", run, "--quiet")
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _rehash(run: Path, *extra: str) -> None:
    """Rewrite finished.json for the files as they are now (a consistent but hostile folder), adding ``extra``."""
    marker = run / "finished.json"
    names = list(json.loads(marker.read_text())["files"]) + list(extra)
    files = {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in names}
    marker.write_text(json.dumps({"files": files}))


def _edit_config(run: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _rehash(run)


def _png(data2d: Path) -> Path:
    return data2d.parent / "test_01.png"


# -- run folders ---------------------------------------------------------------------------------------------------
K_RUN = "run folder (predict)"


def _deny_mkdir(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make creating anything below ``folder`` fail as the OS does without permission (root writes anywhere)."""
    real = pathlib.Path.mkdir

    def mkdir(self: Path, *a: Any, **k: Any) -> None:
        if str(self).startswith(str(folder)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_run_config_alias_bomb(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    text = (run / "config.yaml").read_text()
    levels = ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9 if i else ['lol'] * 9)}]" for i in range(9))
    (run / "config.yaml").write_text(text.replace(f"  name: {data2d}", f"  name: [{levels}]", 1))  # 9^9 strings
    assert "&a8 [*a7" in (run / "config.yaml").read_text()
    t = time.perf_counter()
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "config.yaml: YAML alias bomb in data.name", res, "config.yaml", "alias")
    assert time.perf_counter() - t < 5 and not (tmp_path / "p").exists()


def test_run_config_seed_of_wrong_type(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    _edit_config(run, lambda c: c["train"].update(seed="abc"))
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "config.yaml: train.seed = 'abc'", res, "config.yaml", "train.seed", "'abc'", "an int")


@pytest.mark.parametrize(("case", "value", "fragments"), [
    ("size 's'", "s", ("size = 's'", "whole number")),
    ("size 0", 0, ("size = 0", "whole number")),
    ("size 100000", 100000, ("size=100000", "MEDANOMALY_MAX_PIXELS")),
])
def test_run_preset_record_with_bad_size(run2d: Path, data2d: Path, tmp_path: Path, case: str, value: Any,
                                         fragments: tuple[str, ...]) -> None:
    run = _copy(run2d, tmp_path / "run")
    _edit_config(run, lambda c: c["data"]["preset_config"].update(size=value))
    t = time.perf_counter()
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, f"config.yaml: data.preset_config {case} (2D run)", res, str(run), "preset", *fragments)
    assert time.perf_counter() - t < 5 and not (tmp_path / "p").exists()


def test_run_3d_preset_record_implies_a_huge_grid(run3d: Path, data3d: Path, tmp_path: Path) -> None:
    run = _copy(run3d, tmp_path / "big")
    _edit_config(run, lambda c: c["data"]["preset_config"].update(size=100000))
    vol = data3d.parent / "v0.nii.gz"
    res = invoke("predict", run, vol, "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "config.yaml: data.preset_config size 100000 (3D run)", res, str(run), "size=[100000, 100000, 100000]",
            "MEDANOMALY_MAX_VOXELS")
    run = _copy(run3d, tmp_path / "fine")
    _edit_config(run, lambda c: c["data"]["preset_config"].update(spacing=0.01))
    t = time.perf_counter()
    res = invoke("predict", run, vol, "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "config.yaml: data.preset_config spacing 0.01 mm (3D run, 16^3 input)", res, "v0.nii.gz",
            "resampling", "MEDANOMALY_MAX_VOXELS")
    assert time.perf_counter() - t < 5
    run = _copy(run3d, tmp_path / "zero")
    _edit_config(run, lambda c: c["data"]["preset_config"].update(spacing=0))
    res = invoke("predict", run, vol, "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "config.yaml: data.preset_config spacing 0 (3D run)", res, str(run), "spacing = 0", "positive")


def test_run_planted_pickle_is_never_loaded(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    marker = tmp_path / "pickle_was_loaded"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return open, (str(marker), "w")

    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "x.pt").write_bytes(pickle.dumps(Payload()))
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", "--quiet", ok=False)
    succeeded(K_RUN, "planted pickle checkpoints/x.pt", res, "map written, the pickle never unpickled")
    assert (tmp_path / "p" / "test_01_anomaly.png").is_file() and not marker.exists()
    res = invoke("evaluate", run, "--data", data2d, "--out", tmp_path / "e", "--quiet", ok=False)
    succeeded("run folder (evaluate)", "planted pickle checkpoints/x.pt", res, "metrics written, the pickle never unpickled")
    assert (tmp_path / "e" / "metrics.json").is_file() and not marker.exists()


def test_run_truncated_weights(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "copied")
    w = run / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "truncated weights.safetensors (as copied)", res, "weights.safetensors", "changed since the run finished")
    _rehash(run)
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "truncated weights.safetensors (marker rehashed)", res, "weights.safetensors", "unreadable weights")


def test_run_corrupt_train_log(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    (run / "train_log.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n\xff\xfe garbage\n[1, 2]\n')
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", "--quiet", ok=False)
    (line,) = succeeded(K_RUN, "corrupt train_log.jsonl (not in the marker)", res, "map written, the log is not needed",
                        warnings=1)
    assert "train_log.jsonl" in line and "3 unreadable line(s) skipped" in line
    _rehash(run, "train_log.jsonl")
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p2", "--quiet", ok=False)
    succeeded(K_RUN, "corrupt train_log.jsonl (in the marker)", res, "map written, the log is not needed", warnings=1)
    assert (tmp_path / "p2" / "scores.csv").is_file()
    (run / "train_log.jsonl").write_text("edited after the run finished\n")
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p3", "--quiet", ok=False)
    changed, unreadable = succeeded(K_RUN, "train_log.jsonl changed after the run finished", res,
                                    "map written, the log is not needed", warnings=2)
    assert "changed since the run finished" in changed and "unreadable line" in unreadable


def test_run_missing_finished_marker(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    (run / "finished.json").unlink()
    res = invoke("predict", run, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_RUN, "missing finished.json", res, str(run), "did not finish", "finished.json", "--resume")


def test_run_written_by_another_version_loads_with_one_warning(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    run = _copy(run2d, tmp_path / "run")
    v = json.loads((run / "versions.json").read_text())
    v.update(medanomaly="0.0.1-other", torch="0.1.0")
    (run / "versions.json").write_text(json.dumps(v))
    _rehash(run)
    res = invoke("predict", run, _png(data2d), data2d.parent / "test_02.png", "--out", tmp_path / "p", "--quiet", ok=False)
    (line,) = succeeded(K_RUN, "versions.json of another medanomaly/torch", res, "2 maps written", warnings=1)
    assert "medanomaly 0.0.1-other" in line and "torch 0.1.0" in line and str(run) in line
    assert len(list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))) == 2


# -- manifests through evaluate ----------------------------------------------------------------------------------
K_MAN = "manifest (evaluate)"


def test_manifest_duplicated_case_ids(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    man = tmp_path / "dup.csv"
    man.write_text(f"case_id,image,mask,label,split\nc1,{data2d.parent}/test_00.png,,0,test\n"
                   f"c1,{data2d.parent}/test_01.png,,1,test\n")
    res = invoke("evaluate", run2d, "--data", man, "--out", tmp_path / "e", ok=False)
    refused(K_MAN, "duplicated case_id", res, "dup.csv", "case_id 'c1'", "unique")
    assert not (tmp_path / "e").exists()


def test_manifest_missing_files_all_in_one_error(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    man = tmp_path / "missing.csv"
    man.write_text(f"case_id,image,mask,label,split\nc0,{data2d.parent}/test_00.png,,0,test\n"
                   "c1,gone_a.png,,0,test\nc2,gone_b.png,,1,test\nc3,gone_c.png,,0,test\n")
    res = invoke("evaluate", run2d, "--data", man, "--out", tmp_path / "e", ok=False)
    refused(K_MAN, "three missing image files", res, "missing.csv", "gone_a.png", "gone_b.png", "gone_c.png", "not found")


# -- predict inputs and outputs ----------------------------------------------------------------------------------
K_IN = "predict input"
K_OUT = "predict --out"


def test_predict_lgg_npz(run2d: Path, tmp_path: Path) -> None:
    p = tmp_path / "patient.npz"
    np.savez(p, flair=np.ones((3, 8, 8), np.uint8), mask=np.zeros((3, 8, 8), bool))
    res = invoke("predict", run2d, p, "--out", tmp_path / "p", ok=False)
    refused(K_IN, "the LGG .npz of a patient", res, "patient.npz", "lgg-flair-2d", "manifest")
    p = npz_header_only(tmp_path / "claims.npz", {"flair": (1000, 1000, 1000), "mask": (1000, 1000, 1000)})
    res = invoke("predict", run2d, p, "--out", tmp_path / "p", ok=False)
    refused(K_IN, "an .npz claiming 1000^3", res, "claims.npz", "lgg-flair-2d")


def test_predict_2d_png_through_3d_run(run3d: Path, data2d: Path, tmp_path: Path) -> None:
    res = invoke("predict", run3d, _png(data2d), "--out", tmp_path / "p", ok=False)
    refused(K_IN, "2D PNG through a 3D run", res, "test_01.png", "expects 3D volumes", "2D image")


def test_predict_huge_headers(run2d: Path, run3d: Path, data3d: Path, tmp_path: Path) -> None:
    src = data3d.parent / "v0.nii.gz"
    nii = patch_nifti(src, tmp_path / "huge.nii.gz", dim=[3, 2000, 2000, 400, 1, 1, 1, 1])
    t = time.perf_counter()
    res = invoke("predict", run3d, nii, "--out", tmp_path / "p", ok=False)
    refused(K_IN, "NIfTI header claiming 2000x2000x400", res, "huge.nii.gz", "MEDANOMALY_MAX_VOXELS")
    png = png_header_only(tmp_path / "bomb.png", 9000, 9000)
    res = invoke("predict", run2d, png, "--out", tmp_path / "p", ok=False)
    msg = refused(K_IN, "PNG header claiming 9000x9000", res, "bomb.png", "MEDANOMALY_MAX_PIXELS")
    assert "DecompressionBomb" not in msg and time.perf_counter() - t < 10


def test_predict_irregular_dicom_series_needs_the_flag(run3d: Path, tmp_path: Path) -> None:
    series = make_series(tmp_path / "series", [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0], shape=(12, 10))
    res = invoke("predict", run3d, series, "--out", tmp_path / "p", ok=False)
    refused(K_IN, "DICOM series with uneven slice steps", res, "series", "varies", "--allow-irregular-spacing")
    res = invoke("predict", run3d, series, "--out", tmp_path / "p", "--allow-irregular-spacing", "--quiet", ok=False)
    succeeded(K_IN, "the same series with --allow-irregular-spacing", res, "resampled onto the median step, map written")
    import nibabel as nib

    assert nib.load(str(tmp_path / "p" / "series_anomaly.nii.gz")).shape == (10, 12, 9)  # cols, rows, 9 slices


def test_predict_out_is_an_existing_file(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    f = tmp_path / "taken.txt"
    f.write_text("x")
    res = invoke("predict", run2d, _png(data2d), "--out", f, ok=False)
    refused(K_OUT, "--out is an existing file", res, "taken.txt", "not a folder")
    res = invoke("predict", run2d, _png(data2d), "--out", f / "sub", ok=False)
    refused(K_OUT, "--out below an existing file", res, "taken.txt/sub", "not a folder", "NotADirectoryError")
    assert f.read_text() == "x"


def test_evaluate_out_is_an_existing_file(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    f = tmp_path / "taken.txt"
    f.write_text("x")
    res = invoke("evaluate", run2d, "--data", data2d, "--out", f, "--quiet", ok=False)
    # refused before any prediction
    refused("evaluate --out", "--out is an existing file", res, "taken.txt", "already exists", "not a folder")
    assert f.read_text() == "x"


def test_predict_out_not_writable(run2d: Path, data2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "readonly"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            res = invoke("predict", run2d, _png(data2d), "--out", ro / "maps", ok=False)
        finally:
            ro.chmod(0o755)
        refused(K_OUT, "--out in a read-only folder", res, "readonly/maps", "permission denied")
    # root writes anywhere: the same refusal as the OS gives it, from mkdir
    _deny_mkdir(monkeypatch, ro)
    res = invoke("predict", run2d, _png(data2d), "--out", ro / "maps", ok=False)
    refused(K_OUT, "--out where mkdir raises PermissionError", res, "readonly/maps", "permission denied", "PermissionError")


def test_predict_force_leaves_a_complete_scores_csv(run2d: Path, data2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    a, b, c = (data2d.parent / f"test_0{i}.png" for i in range(3))
    invoke("predict", run2d, a, b, "--out", out, "--quiet")
    first = {r["input"]: r["image_score"] for r in csv.DictReader(open(out / "scores.csv"))}
    res = invoke("predict", run2d, a, b, "--out", out, ok=False)
    refused(K_OUT, "existing output without --force", res, "already exists", "--force")
    res = invoke("predict", run2d, c, b, a, "--out", out, "--force", "--quiet", ok=False)
    succeeded(K_OUT, "--force onto an existing output", res, "scores.csv rewritten whole: 3 rows, same scores")
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [Path(r["input"]).name for r in rows] == ["test_02.png", "test_01.png", "test_00.png"]
    assert all(first[r["input"]] == r["image_score"] for r in rows if r["input"] in first)
    assert all((out / r["map"]).is_file() for r in rows)
    # an input that fails mid-way: one error naming it; scores.csv holds whole rows for the inputs done before it
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    res = invoke("predict", run2d, a, bad, "--out", out, "--force", "--quiet", ok=False)
    refused(K_OUT, "--force with a broken second input", res, "bad.png", "unreadable")
    text = (out / "scores.csv").read_text()
    assert text.endswith("\n") and [Path(r["input"]).name for r in csv.DictReader(text.splitlines())] == ["test_00.png"]


# -- train options -----------------------------------------------------------------------------------------------
K_TRAIN = "train option"


def test_train_set_value_of_wrong_type(data2d: Path, tmp_path: Path) -> None:
    res = invoke("train", "autoencoder", "--data", data2d, "--out", tmp_path / "r", "--config-set", "test",
                 "--set", "train.lr=abc", "--quiet", ok=False)
    refused(K_TRAIN, "--set train.lr=abc", res, "train.lr", "'abc'", "float")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("case", "size", "fragments"), [
    ("--size 0", "0", ("size = 0", "whole number")),
    ("--size 100000", "100000", ("size=100000", "MEDANOMALY_MAX_PIXELS")),
])
def test_train_bad_size_is_refused_up_front(data2d: Path, tmp_path: Path, case: str, size: str,
                                            fragments: tuple[str, ...]) -> None:
    t = time.perf_counter()
    res = invoke("train", "intensity", "--data", data2d, "--out", tmp_path / "r", "--size", size, "--quiet", ok=False)
    refused(K_TRAIN, case + " (2D manifest)", res, "preset 'brain-mri-2d'", *fragments)
    assert time.perf_counter() - t < 5
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_train_3d_size_implies_a_huge_grid(data3d: Path, tmp_path: Path) -> None:
    res = invoke("train", "intensity", "--data", data3d, "--out", tmp_path / "r", "--size", "100000", "--quiet", ok=False)
    refused(K_TRAIN, "--size 100000 (3D manifest)", res, "preset 'brain-mri-3d'", "MEDANOMALY_MAX_VOXELS")


def test_train_config_file_alias_bomb(data2d: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "params.yaml"
    cfg.write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n")
    res = invoke("train", "intensity", "--data", data2d, "--out", tmp_path / "r", "--config", cfg, "--quiet", ok=False)
    refused(K_TRAIN, "--config with YAML aliases", res, "params.yaml", "alias")


def test_train_out_is_a_file_or_not_writable(data2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "taken.txt"
    f.write_text("x")
    res = invoke("train", "intensity", "--data", data2d, "--out", f, "--quiet", ok=False)
    refused(K_TRAIN, "--out is an existing file", res, "taken.txt", "not a folder")
    ro = tmp_path / "readonly"
    ro.mkdir()
    _deny_mkdir(monkeypatch, ro)
    res = invoke("train", "intensity", "--data", data2d, "--out", ro / "run", "--size", SIZE, "--quiet", ok=False)
    refused(K_TRAIN, "--out where mkdir raises PermissionError", res, "readonly/run", "permission denied")


# -- the message of an OSError, without the CLI --------------------------------------------------------------------
def test_os_errors_name_their_file() -> None:
    from medanomaly.cli import error_message

    assert error_message(FileExistsError(errno.EEXIST, "File exists", "/x/out")) .startswith("/x/out: already exists")
    assert "/a -> /b" in error_message(PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b"))
    assert error_message(OSError(errno.ENOSPC, "No space left on device", "/x/f")) == "/x/f: No space left on device (OSError)"
    assert error_message(OSError("no file here")) == "OSError: no file here"
    assert error_message(FileNotFoundError("dataset folder /d not found")) == "dataset folder /d not found"
