"""``medanomaly benchmark``: method variants, per-label settings, train/test data, shared tokenizer / MAE."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medanomaly.app.benchmark import parse_benchmark_methods, parse_benchmark_overrides, plan_sharing, run_benchmark
from medanomaly.app.config import resolve_config
from medanomaly.app.errors import PipelineError
from medanomaly.data import make_toy_dataset
from medanomaly.data.samples import parse_data_spec

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
SIZE = 32


def _write_manifest(root: Path, seed: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    parts = [("train", make_toy_dataset(16, SIZE, seed=seed)), ("val", make_toy_dataset(4, SIZE, seed=seed + 1)),
             ("test", make_toy_dataset(8, SIZE, abnormal_fraction=0.5, seed=seed + 2, lesion_intensity=0.5))]
    for split, ds in parts:
        for i in range(len(ds)):
            s = ds[i]
            name = f"{split}_{i:02d}"
            Image.fromarray(np.round(s["image"][0].numpy() * 255).astype(np.uint8)).save(root / f"{name}.png")
            row = {"case_id": name, "image": f"{name}.png", "mask": "", "label": int(s["label"]), "split": split}
            if split == "test":
                Image.fromarray((s["mask"][0].numpy() * 255).astype(np.uint8)).save(root / f"{name}_mask.png")
                row["mask"] = f"{name}_mask.png"
            rows.append(row)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# -- data specs ---------------------------------------------------------------------------------------------
def test_parse_data_spec() -> None:
    assert parse_data_spec("brats2018-3d:modality=t1,spacing=6") == ("brats2018-3d", {"modality": "t1", "spacing": 6})
    assert parse_data_spec("ixi-t1-3d:spacing=[6,6,4.5],view=slices") == (
        "ixi-t1-3d", {"spacing": [6, 6, 4.5], "view": "slices"})
    assert parse_data_spec("lgg-flair-2d") == ("lgg-flair-2d", {})
    assert parse_data_spec("C:/data/manifest.csv") == ("C:/data/manifest.csv", {})  # not a built-in name
    with pytest.raises(ValueError, match="key=value"):
        parse_data_spec("brats2018-3d:modality")


# -- methods, labels and settings --------------------------------------------------------------------------
def test_parse_methods_and_overrides() -> None:
    entries = parse_benchmark_methods(["intensity", " mim-ood-r8=mim-ood ", ""])
    assert entries == [("intensity", "intensity"), ("mim-ood-r8", "mim-ood")]
    with pytest.raises(PipelineError, match="twice"):
        parse_benchmark_methods(["intensity", "intensity"])
    with pytest.raises(KeyError):
        parse_benchmark_methods(["no-such-method"])
    with pytest.raises(PipelineError, match="empty"):
        parse_benchmark_methods([""])
    ov = parse_benchmark_overrides(["mim-ood-r8.restoration.R=8", "mim-ood.seed=3"], ["mim-ood", "mim-ood-r8"])
    assert ov == {"mim-ood-r8": {"restoration.R": 8}, "mim-ood": {"seed": 3}}
    with pytest.raises(PipelineError, match="labels"):
        parse_benchmark_overrides(["restoration.R=8"], ["mim-ood"])


def _params(entries: list[tuple[str, str]], overrides: dict[str, dict]) -> dict[str, dict]:
    return {lab: resolve_config(m, config_set="test", overrides=overrides.get(lab))[0] for lab, m in entries}


def test_plan_sharing_rules(tmp_path: Path) -> None:
    entries = [("intensity", "intensity"), ("ar", "ar-restoration"), ("mim", "mim-ood"), ("mim8", "mim-ood"),
               ("tc", "token-critic"), ("amae", "amae"), ("mae", "mae"), ("mp", "mae-pseudo")]
    ov = {"mim8": {"restoration.R": 8}}
    extra, notes = plan_sharing(entries, _params(entries, ov), ov, tmp_path)
    assert "intensity" not in extra and "ar" not in extra  # the first MIM method trains the tokenizer
    assert extra["mim"] == {"reuse.run_dir": str(tmp_path / "ar"), "reuse.modules": ["tokenizer"]}
    # an inference-only variant reuses every module of the earlier run of its method
    assert extra["mim8"] == {"reuse.run_dir": str(tmp_path / "mim"), "reuse.modules": ["tokenizer", "atd", "mvtm"]}
    assert extra["tc"] == {"reuse.run_dir": str(tmp_path / "mim"), "reuse.modules": ["tokenizer", "mvtm"]}
    # the MAE comes from 'mae' even though 'amae' is listed first
    assert extra["amae"] == {"pretrained": str(tmp_path / "mae")} and extra["mp"] == {"pretrained": str(tmp_path / "mae")}
    assert "mae" not in extra and notes["amae"] == "pre-trained MAE from mae"

    entries = [("mim", "mim-ood"), ("mim8", "mim-ood"), ("mimw", "mim-ood"), ("ar", "ar-restoration")]
    ov = {"mim8": {"restoration.R": 8}, "mimw": {"tokenizer.num_embeddings": 8}, "ar": {"reuse.run_dir": "/x"}}
    extra, notes = plan_sharing(entries, _params(entries, ov), ov, tmp_path)
    assert extra["mim8"]["reuse.modules"] == ["tokenizer", "atd", "mvtm"]
    assert "mimw" not in extra and "settings differ" in notes["mimw"]  # a new tokenizer: trains its own
    assert "ar" not in extra  # the user's own reuse wins

    entries = [("mt", "multitask"), ("mt5", "multitask"), ("mt2", "multitask")]
    ov = {"mt5": {"max_models": 5}, "mt2": {"tasks.train_count": 2}}
    extra, notes = plan_sharing(entries, _params(entries, ov), ov, tmp_path)
    assert extra == {"mt5": {"reuse_members_from": str(tmp_path / "mt")}}  # T=2 members differ: trained anew


@pytest.mark.slow
def test_benchmark_variants_sharing_and_train_data(tmp_path: Path) -> None:
    train_m = _write_manifest(tmp_path / "a", seed=1)
    test_m = _write_manifest(tmp_path / "b", seed=11)
    out = tmp_path / "bench"
    kw = dict(config_set="test", train_data=str(train_m), quiet=True, batch_size=8, size=SIZE,
              overrides={"mim-r2": {"restoration.R": 2}})
    rows = run_benchmark(["mim-ood", "mim-r2=mim-ood", "ar-restoration"], str(test_m), out, **kw)
    assert [r["method"] for r in rows] == ["mim-ood", "mim-r2", "ar-restoration"]
    assert [r["base_method"] for r in rows] == ["mim-ood", "mim-ood", "ar-restoration"]
    assert rows[1]["shares"] == "tokenizer, atd, mvtm from mim-ood" and rows[2]["shares"] == "tokenizer from mim-ood"
    assert all(r["n_test"] == 8 and r["pixel_ap"] is not None for r in rows)
    # the shared parts are the very same tensors
    w0, w1, w2 = (load_file(str(out / "runs" / lab / "weights.safetensors")) for lab in ("mim-ood", "mim-r2", "ar-restoration"))
    tok = [k for k in w0 if k.startswith("tokenizer.")]
    assert tok and all(torch.equal(w0[k], w2[k]) for k in tok)
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if not k.startswith("meta."))
    cfg = yaml.safe_load((out / "runs" / "mim-r2" / "config.yaml").read_text())
    assert cfg["params"]["restoration"]["R"] == 2 and cfg["data"]["name"] == str(train_m)
    rec = json.loads((out / "benchmark.json").read_text())
    assert rec["train_data"] == str(train_m) and rec["data"] == str(test_m) and rec["methods"]["mim-r2"] == "mim-ood"
    # a second call reuses all three runs; changed settings are refused
    rows = run_benchmark(["mim-ood", "mim-r2=mim-ood", "ar-restoration"], str(test_m), out, **kw)
    assert all(r["reused_run"] for r in rows)
    kw["overrides"] = {"mim-r2": {"restoration.R": 3}}
    with pytest.raises(PipelineError, match="other settings"):
        run_benchmark(["mim-ood", "mim-r2=mim-ood"], str(test_m), out, **kw)
    with pytest.raises(PipelineError, match="does not list"):
        run_benchmark(["mim-ood"], str(test_m), out, config_set="test", size=SIZE, overrides={"x": {"seed": 1}})


def test_benchmark_multitask_variant_reuses_members(tmp_path: Path) -> None:
    m = _write_manifest(tmp_path / "a", seed=3)
    out = tmp_path / "bench"
    kw = dict(config_set="test", quiet=True, batch_size=8, size=SIZE)
    rows = run_benchmark(["mt=multitask", "mt-all=multitask"], str(m), out,
                                  overrides={"mt": {"max_models": 1}, "mt-all": {"max_models": 2}}, **kw)
    assert rows[1]["shares"] == "members from mt"
    st = [json.loads((out / "runs" / lab / "state.json").read_text()) for lab in ("mt", "mt-all")]
    a, b = st[0]["members"], st[1]["members"]
    assert len(a) == 1 and len(b) == 2
    assert b[0]["reused_from"] == str(out / "runs" / "mt") and "reused_from" not in b[1]
    wa = load_file(str(out / "runs" / "mt" / a[0]["name"] / "member.safetensors"))
    wb = load_file(str(out / "runs" / "mt-all" / b[0]["name"] / "member.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_benchmark_patchcore_backbone_is_the_multitask_runs_member(tmp_path: Path) -> None:
    """patchcore's multitask backbone with the multitask run's settings: member 0 is loaded, not trained again."""
    from medanomaly.methods import get_method_class

    m = _write_manifest(tmp_path / "a", seed=6)
    out = tmp_path / "bench"
    mt = resolve_config("multitask", config_set="test")[0]
    keys = get_method_class("patchcore").defaults["multitask"]  # the multitask settings patchcore has a section for
    same = {f"multitask.{k}": mt[k] for k in keys if k != "reuse_members_from"}
    same["multitask.train"] = {k: v for k, v in mt["train"].items() if k != "device"}  # patchcore's device is its own
    kw = dict(config_set="test", quiet=True, batch_size=8, size=SIZE)
    rows = run_benchmark(["pc=patchcore", "pc-own=patchcore", "multitask"], str(m), out,
                         overrides={"pc": same, "pc-own": {**same, "multitask.train.steps": 3}}, **kw)
    assert rows[0]["shares"] == "members from multitask" and rows[1]["shares"].startswith("own members")
    cfg = yaml.safe_load((out / "runs" / "pc" / "config.yaml").read_text())
    assert cfg["params"]["multitask"]["reuse_members_from"] == str(out / "runs" / "multitask")
    wa = load_file(str(out / "runs" / "multitask" / "m00_t0-1-2-3" / "member.safetensors"))
    wb = load_file(str(out / "runs" / "pc" / "m00_t0-1-2-3" / "member.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (out / "runs" / "pc-own" / "m00_t0-1-2-3" / "member.json").read_text() == (
        out / "runs" / "multitask" / "m00_t0-1-2-3" / "member.json").read_text()
    # the finished runs are reused with or without the sharing source in the list (sharing = equal settings)
    assert all(r["reused_run"] for r in run_benchmark(["pc=patchcore", "multitask"], str(m), out,
                                                      overrides={"pc": same}, **kw))
    assert run_benchmark(["pc=patchcore"], str(m), out, overrides={"pc": same}, **kw)[0]["reused_run"]


def test_benchmark_shares_pretrained_mae(tmp_path: Path) -> None:
    m = _write_manifest(tmp_path / "a", seed=5)
    out = tmp_path / "bench"
    rows = run_benchmark(["mae-pseudo", "mae"], str(m), out, config_set="test", quiet=True, batch_size=8, size=SIZE)
    assert rows[0]["shares"] == "pre-trained MAE from mae" and rows[1]["shares"] == ""
    log = [json.loads(ln) for ln in (out / "runs" / "mae-pseudo" / "train_log.jsonl").read_text().splitlines() if ln]
    assert any(r.get("loaded_from") == str(out / "runs" / "mae") for r in log)
    a = load_file(str(out / "runs" / "mae" / "weights.safetensors"))
    b = load_file(str(out / "runs" / "mae-pseudo" / "weights.safetensors"))
    shared = [k for k in a if k.startswith("mae.") and k in b]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)


# -- seeds --------------------------------------------------------------------------------------------------
def test_aggregate_seeds_mean_std_and_table(tmp_path: Path) -> None:
    from medanomaly.evaluation.table import aggregate_seeds, write_comparison_table

    rows = [{"method": m, "seed": k, "pixel_ap": ap, "calibrated_dice": cd, "device": "cpu", "report": f"r{k}",
             "reused_run": False, "n_test": 8}
            for m, aps, cds in (("a", (0.1, 0.2, 0.3), (0.5, float("nan"), 0.7)), ("b", (0.4, 0.4, 0.4), (None,) * 3))
            for k, ap, cd in zip((0, 1, 2), aps, cds, strict=True)]
    agg = aggregate_seeds(rows)
    assert [r["method"] for r in agg] == ["a", "b"] and agg[0]["seeds"] == "0,1,2" and agg[0]["n_seeds"] == 3
    assert agg[0]["pixel_ap"] == pytest.approx(0.2) and agg[0]["pixel_ap_std"] == pytest.approx(0.1)  # ddof=1
    assert agg[1]["pixel_ap_std"] == 0.0
    assert agg[0]["calibrated_dice"] == pytest.approx(0.6)  # NaN seeds left out of the mean
    assert agg[1]["calibrated_dice"] is None  # no value at all
    assert agg[0]["device"] == "cpu" and "report" not in agg[0] and agg[0]["n_test"] == 8 and "n_test_std" not in agg[0]
    assert "seed" not in agg[0] and agg[0]["reused_run"] is False
    md, csv_path, _ = write_comparison_table(agg, tmp_path, csv_rows=rows)
    text = md.read_text()
    assert "**0.4 ± 0** |" in text.replace("0.4000", "0.4").replace(" ± 0.0000", " ± 0") or "**0.4" in text
    assert "0.2" in text and "±" in text and "pixel_ap_std" not in text.splitlines()[0]
    with open(csv_path) as f:
        flat = list(csv.DictReader(f))
    assert len(flat) == 6 and [r["seed"] for r in flat[:3]] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="no 'method'"):
        aggregate_seeds([{"x": 1}])


def test_benchmark_seeds_runs_each_seed_and_aggregates(tmp_path: Path) -> None:
    from medanomaly.app.benchmark import parse_seeds

    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds(None) is None
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(PipelineError, match="--seeds"):
            parse_seeds(bad)
    m = _write_manifest(tmp_path / "a", seed=7)
    out = tmp_path / "bench"
    kw = dict(config_set="test", quiet=True, batch_size=8, size=SIZE, seeds=[0, 1])
    rows = run_benchmark(["intensity", "zscore"], str(m), out, **kw)
    assert [(r["method"], r["seed"]) for r in rows] == [("intensity", 0), ("zscore", 0), ("intensity", 1), ("zscore", 1)]
    for k in (0, 1):
        cfg = yaml.safe_load((out / "runs" / f"seed-{k}" / "zscore" / "config.yaml").read_text())
        assert cfg["params"]["seed"] == k and (out / "eval" / f"seed-{k}" / "zscore" / "metrics.json").exists()
    cols = list(rows[0])
    assert cols.index("best_dice") + 1 == cols.index("calibrated_dice")  # calibrated metrics beside best DICE
    assert {"calibrated_precision", "calibrated_recall", "calibrated_fpr"} <= set(cols)
    header = (out / "comparison.md").read_text().splitlines()[0]
    assert "calibrated_dice" in header and "seeds" in header and "_std" not in header
    assert (out / "comparison.md").read_text().count("±") >= 2 * 5
    with open(out / "comparison.csv") as f:
        assert [(r["method"], r["seed"]) for r in csv.DictReader(f)] == [(r["method"], str(r["seed"])) for r in rows]
    rec = json.loads((out / "comparison.json").read_text())
    assert rec["seeds"] == [0, 1] and len(rec["rows"]) == 4 and [r["n_seeds"] for r in rec["summary"]] == [2, 2]
    rows = run_benchmark(["intensity", "zscore"], str(m), out, **kw)  # finished runs of each seed are reused
    assert all(r["reused_run"] for r in rows)
    with pytest.raises(PipelineError, match="either --seed or --seeds"):
        run_benchmark(["intensity"], str(m), out, config_set="test", seed=0, seeds=[0, 1])
    with pytest.raises(PipelineError, match="come from --seeds"):
        run_benchmark(["zscore"], str(m), out, config_set="test", seeds=[0], overrides={"zscore": {"seed": 3}})


def test_benchmark_seeds_share_within_a_seed_only(tmp_path: Path) -> None:
    m = _write_manifest(tmp_path / "a", seed=5)
    out = tmp_path / "bench"
    rows = run_benchmark(["mae-pseudo", "mae"], str(m), out, config_set="test", quiet=True, batch_size=8, size=SIZE,
                         seeds=[0, 1])
    assert [r["shares"] for r in rows] == ["pre-trained MAE from mae", "", "pre-trained MAE from mae", ""]
    mae = {}
    for k in (0, 1):
        run = out / "runs" / f"seed-{k}"
        log = [json.loads(ln) for ln in (run / "mae-pseudo" / "train_log.jsonl").read_text().splitlines() if ln]
        assert {r["loaded_from"] for r in log if r.get("loaded_from")} == {str(run / "mae")}  # this seed's MAE
        mae[k] = load_file(str(run / "mae" / "weights.safetensors"))
        b = load_file(str(run / "mae-pseudo" / "weights.safetensors"))
        shared = [key for key in mae[k] if key.startswith("mae.") and key in b]
        assert shared and all(torch.equal(mae[k][key], b[key]) for key in shared)
    assert any(not torch.equal(mae[0][key], mae[1][key]) for key in shared)  # the seeds trained different MAEs


def test_benchmark_refuses_a_run_whose_config_set_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config-set name, other contents (the set was edited since): the finished run is not silently reused."""
    from medanomaly.methods import get_method_class

    m = _write_manifest(tmp_path / "a", seed=4)
    out = tmp_path / "bench"
    kw = dict(config_set="test", quiet=True, batch_size=8, size=SIZE)
    run_benchmark(["autoencoder"], str(m), out, **kw)
    assert run_benchmark(["autoencoder"], str(m), out, **kw)[0]["reused_run"]
    cls = get_method_class("autoencoder")
    old = cls.config_set("test")
    edited = {**old, "train": {**old["train"], "steps": old["train"]["steps"] + 1}}
    monkeypatch.setattr(cls, "config_set", classmethod(lambda c, name: edited))
    with pytest.raises(PipelineError, match=r"other values of train\.steps.*config set 'test'"):
        run_benchmark(["autoencoder"], str(m), out, **kw)
