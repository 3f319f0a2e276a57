"""Label-free synthetic validation (``medanomaly validate``): the synthetic set, its metrics against scikit-learn,
and the command on a run whose validation split also holds a lesioned image (which it must not read)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from medanomaly.app.errors import PipelineError
from medanomaly.app.predict import load_run, predict_arrays
from medanomaly.app.validate import DEFAULT_TASKS, score_synthetic, synthetic_set, validate_run
from medanomaly.cli import app
from medanomaly.data import make_toy_dataset

torch.set_num_threads(1)
SIZE = 32


def _toy(n: int, spatial_dims: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ds = make_toy_dataset(n, 24 if spatial_dims == 2 else 16, spatial_dims=spatial_dims, seed=seed)
    x = np.stack([ds[i]["image"].numpy() for i in range(n)])
    fg = np.stack([ds[i]["foreground"][0].numpy().astype(bool) for i in range(n)])
    return x, fg


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_synthetic_set_is_seeded_and_inside_the_foreground(spatial_dims: int) -> None:
    x, fg = _toy(4, spatial_dims)
    tasks = ("intra-blend", "sink", "fpi", "cutpaste") if spatial_dims == 2 else ("sink", "cutpaste")
    a, info = synthetic_set(x, fg, tasks, draws=2, seed=3)
    b, _ = synthetic_set(x, fg, tasks, draws=2, seed=3)
    c, _ = synthetic_set(x, fg, tasks, draws=2, seed=4)
    for t in tasks:
        assert a[t]["image"].shape[1:] == x.shape[1:] and a[t]["mask"].shape[1:] == fg.shape[1:]
        assert len(a[t]["image"]) + info["left_out"][t] == 2 * len(x)
        np.testing.assert_array_equal(a[t]["image"], b[t]["image"])
        np.testing.assert_array_equal(a[t]["mask"], b[t]["mask"])
        assert not np.array_equal(a[t]["mask"], c[t]["mask"])
        idx = a[t]["index"]
        assert (a[t]["mask"] <= fg[idx]).all()  # positives only inside the foreground
        assert a[t]["mask"].reshape(len(idx), -1).any(1).all()  # every kept draw has an anomaly
        changed = np.abs(a[t]["image"] - x[idx]).reshape(len(idx), -1).max(1)
        assert (changed > 0).mean() > 0.5, t
    # the input is not modified
    x2, _ = _toy(4, spatial_dims)
    np.testing.assert_array_equal(x, x2)


def test_synthetic_set_refuses_bad_input() -> None:
    x, fg = _toy(3)
    with pytest.raises(ValueError, match="inter-blend needs a second data set"):
        synthetic_set(x, fg, ("inter-blend",))
    with pytest.raises(ValueError, match="among"):
        synthetic_set(x, fg, ("nosuchtask",))
    with pytest.raises(ValueError, match="repeat"):
        synthetic_set(x, fg, ("sink", "sink"))
    with pytest.raises(ValueError, match="draws"):
        synthetic_set(x, fg, ("sink",), draws=0)
    with pytest.raises(ValueError, match="foreground"):
        synthetic_set(x, fg[:, :5], ("sink",))
    with pytest.raises(ValueError, match="NaN"):
        synthetic_set(np.where(x > 0.5, np.nan, x), fg, ("sink",))


def test_score_synthetic_matches_scikit_learn_and_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, fg = _toy(5)
    synth, _ = synthetic_set(x, fg, ("sink", "cutpaste"), draws=1, seed=0)
    clean = rng.normal(size=fg.shape).astype(np.float32)
    maps = {k: (rng.normal(size=v["mask"].shape) + 1.5 * v["mask"]).astype(np.float32) for k, v in synth.items()}
    cs = rng.normal(size=len(x))
    sc = {k: rng.normal(size=len(v["mask"])) + 1 for k, v in synth.items()}
    res = score_synthetic(clean, cs, fg, synth, maps, sc)
    for k, v in synth.items():
        f = np.concatenate([fg, fg[v["index"]]])
        y = np.concatenate([np.zeros_like(fg), v["mask"]])[f]
        s = np.concatenate([clean, maps[k]])[f]
        assert res["per_task"][k]["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
        assert res["per_task"][k]["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
        # best DICE by brute force over every threshold
        best = max(2 * (y & (s >= t)).sum() / (y.sum() + (s >= t).sum()) for t in np.unique(s))
        assert res["per_task"][k]["best_dice"] == pytest.approx(best, abs=1e-9)
        yi = np.r_[np.zeros(len(cs)), np.ones(len(sc[k]))]
        assert res["per_task"][k]["image_auroc"] == pytest.approx(roc_auc_score(yi, np.r_[cs, sc[k]]), abs=1e-9)
    assert res["mean_pixel_ap"] == pytest.approx(np.mean([v["pixel_ap"] for v in res["per_task"].values()]))
    assert res["unseen_tasks"] == ["cutpaste"]
    assert res["unseen_pixel_ap"] == res["per_task"]["cutpaste"]["pixel_ap"]
    # an oracle map (the mask itself) is perfect; a constant map's AP is the positive fraction
    oracle = score_synthetic(np.zeros_like(clean), cs, fg, synth, {k: v["mask"].astype(np.float32) for k, v in synth.items()}, sc)
    assert oracle["pooled"]["pixel_ap"] == pytest.approx(1.0) and oracle["pooled"]["best_dice"] == pytest.approx(1.0)
    flat = score_synthetic(np.ones_like(clean), cs, fg, synth, {k: np.ones(v["mask"].shape, np.float32)
                                                                for k, v in synth.items()}, sc)
    assert flat["pooled"]["pixel_ap"] == pytest.approx(flat["pooled"]["positive_fraction"])


def _png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def run_with_lesioned_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An intensity run whose manifest's val split holds 5 healthy images and 1 lesioned one (with a mask)."""
    root = tmp_path_factory.mktemp("valdata")
    rows = []
    for split, ds in (("train", make_toy_dataset(8, SIZE, seed=1)), ("val", make_toy_dataset(5, SIZE, seed=2)),
                      ("val", make_toy_dataset(1, SIZE, abnormal_fraction=1.0, seed=3))):
        for i in range(len(ds)):
            s = ds[i]
            name = f"{split}_{len(rows):02d}"
            _png(root / f"{name}.png", np.round(s["image"][0].numpy() * 255))
            row = {"case_id": name, "image": f"{name}.png", "mask": "", "label": int(s["label"]), "split": split}
            if int(s["label"]):
                _png(root / f"{name}_mask.png", s["mask"][0].numpy() * 255)
                row["mask"] = f"{name}_mask.png"
            rows.append(row)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = root / "run"
    res = CliRunner().invoke(app, ["train", "intensity", "--data", str(root / "manifest.csv"), "--out", str(run),
                                   "--size", str(SIZE), "--quiet"])
    assert res.exit_code == 0, res.output
    return run


def test_validate_run_scores_the_healthy_val_images_only(run_with_lesioned_val: Path, tmp_path: Path) -> None:
    out = tmp_path / "v"
    r = validate_run(run_with_lesioned_val, out, tasks=("sink", "cutpaste"), seed=1, quiet=True)
    assert r["n_images"] == 5 and r["split"] == "val" and r["normal_only"] and not r["lesion_labels_read"]
    on_disk = json.loads((out / "synthetic_validation.json").read_text())
    assert on_disk["pooled"] == r["pooled"] and (out / "synthetic_examples.png").stat().st_size > 1000
    # the same numbers by hand: the run's maps on the same synthetic set
    det, cfg = load_run(run_with_lesioned_val)
    from medanomaly.app.datasets import open_dataset
    from medanomaly.data import stack_dataset

    d = cfg["data"]
    st = stack_dataset(open_dataset(d["name"], "val", normal_only=True, preset=d["preset"], size=d["size"],
                                    preset_config=d["preset_config"]))
    x, fg = st["image"].float().numpy(), st["foreground"][:, 0].bool().numpy()
    synth, _ = synthetic_set(x, fg, ("sink", "cutpaste"), 1, 1)
    cm, cs = predict_arrays(det, x, fg[:, None], 4)
    for k, v in synth.items():
        m, _ = predict_arrays(det, v["image"], fg[v["index"]][:, None], 4)
        f = np.concatenate([fg, fg[v["index"]]])
        y = np.concatenate([np.zeros_like(fg), v["mask"]])[f]
        assert r["per_task"][k]["pixel_ap"] == pytest.approx(average_precision_score(y, np.concatenate([cm, m])[f]))
    # same seed, same numbers; existing output needs --force
    again = validate_run(run_with_lesioned_val, None, tasks=("sink", "cutpaste"), seed=1, quiet=True)
    assert again["per_task"] == r["per_task"]
    with pytest.raises(PipelineError, match="force"):
        validate_run(run_with_lesioned_val, out, tasks=("sink",), quiet=True)
    with pytest.raises(PipelineError, match="inter-blend"):
        validate_run(run_with_lesioned_val, None, tasks=("inter-blend",), quiet=True)
    with pytest.raises(PipelineError, match="max-images"):
        validate_run(run_with_lesioned_val, None, max_images=1, quiet=True)
    sub = validate_run(run_with_lesioned_val, None, tasks=("sink",), max_images=3, quiet=True)
    assert sub["n_images"] == 3


def test_validate_command(run_with_lesioned_val: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["validate", str(run_with_lesioned_val), "--out", str(tmp_path / "v"),
                                   "--tasks", "sink,fpi", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "mean_pixel_ap=" in res.output and "fpi: pixel_ap=" in res.output
    bad = CliRunner().invoke(app, ["validate", str(run_with_lesioned_val), "--tasks", "inter-blend", "--quiet"])
    assert bad.exit_code == 1 and "error: " in bad.output and "Traceback" not in bad.output
    assert set(DEFAULT_TASKS) >= {"fpi", "cutpaste"}
