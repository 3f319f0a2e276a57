"""Logic of the benchmark scripts that is not timing itself (timings are never asserted)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_ar_estimate_equals_the_real_loop_under_a_linear_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that advances by the sequence length of every AR forward pass (cost linear in the prefix), the
    estimate from a few timed loop steps must equal the cost of the real restoration loop exactly."""
    mod = _load("mim_ood_speed")
    torch.manual_seed(0)
    det = mod.build("ar-restoration-naive", "test", 32, "cpu", 2, 1)  # the estimate is of the naive loop
    clock = {"t": 0.0}
    det.nets["ar"].register_forward_pre_hook(lambda _m, args: clock.__setitem__("t", clock["t"] + args[0].shape[1]))
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    x = torch.rand(3, 1, 32, 32)
    n = 64  # 8 x 8 tokens
    est = mod.estimate_ar(det, x, 5)
    assert est["timed_lengths"][0] == 1 and est["timed_lengths"][-1] == n and len(est["timed_lengths"]) == 5
    assert est["loop_seconds"] == pytest.approx(n * (n + 1) / 2)  # sum of prefix lengths 1..n
    measured = mod.time_predict(det, x, 1, warmup=False)
    assert est["seconds"] == pytest.approx(measured)
    assert det.threshold == 0.0  # restored after the no-flag base timing
    with pytest.raises(ValueError, match="at least 2"):
        mod.estimate_ar(det, x, 1)


def test_seed_table_collects_every_seed_and_aggregates(tmp_path: Path) -> None:
    """seed_table.py reads eval/seed-<k>/<label>/metrics.json of a stopped or split --seeds run: label order, the
    seeds each label has (a label may lack a seed), mean ± std in Markdown, per-seed rows in the CSV."""
    import csv
    import json

    mod = _load("seed_table")
    vals = {("a", 0): 0.1, ("a", 1): 0.3, ("a", 10): 0.2, ("b", 0): 0.5}
    for (lab, k), ap in vals.items():
        d = tmp_path / "eval" / f"seed-{k}" / lab
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"pixel_ap": ap, "best_dice": ap / 2, "sample_auroc": 0.5}))
    (tmp_path / "eval" / "seed-x").mkdir()  # not a seed folder: ignored
    rows = mod.collect(tmp_path, ["b", "a"])
    assert [(r["method"], r["seed"]) for r in rows] == [("b", 0), ("a", 0), ("a", 1), ("a", 10)]
    summary = mod.aggregate_seeds(rows)
    assert summary[1]["pixel_ap"] == pytest.approx(0.2) and summary[1]["pixel_ap_std"] == pytest.approx(0.1)
    assert summary[1]["seeds"] == "0,1,10" and summary[0]["n_seeds"] == 1
    md, csv_path, _ = mod.write_comparison_table(summary, tmp_path, name="t", csv_rows=rows)
    assert "0.2000 ± 0.1000" in md.read_text()
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == 4
    with pytest.raises(SystemExit, match="no seed"):
        mod.collect(tmp_path / "nothing")


def test_seed_table_train_seconds_from_the_run_folder(tmp_path: Path) -> None:
    """A resumed run's train seconds come from its run folder (summed over its sessions), not from an older
    metrics.json that held only the last session's; a missing or unreadable run folder falls back to metrics.json."""
    import json

    import yaml

    mod = _load("seed_table")
    runs = {"resumed": tmp_path / "runs" / "resumed", "broken": tmp_path / "runs" / "broken"}
    runs["resumed"].mkdir(parents=True)
    (runs["resumed"] / "config.yaml").write_text(yaml.safe_dump(
        {"method": "autoencoder", "params": {}, "train": {"seconds": 3.0, "resumed": True}}))
    log = [{"step": i, "seconds": s, "stage": "s"} for i, s in enumerate([1.0, 2.0, 40.0, 0.5, 1.5, 3.0])]
    (runs["resumed"] / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    runs["broken"].mkdir(parents=True)
    (runs["broken"] / "config.yaml").write_text("params: [not a run]\n")
    where = {"resumed": str(runs["resumed"]), "broken": str(runs["broken"]), "gone": str(tmp_path / "runs" / "gone")}
    for lab, run in where.items():
        d = tmp_path / "eval" / "seed-0" / lab
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"pixel_ap": 0.1, "train_seconds": 3.0, "run": run}))
    got = {r["method"]: r["train_seconds"] for r in mod.collect(tmp_path)}
    assert got == {"resumed": pytest.approx(43.0), "broken": 3.0, "gone": 3.0}


def test_scale_study_table_from_run_folders_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """scale_study.py: multitask's label-free score is the mean of its members' synthetic val AP, other methods
    report each module's best validation loss; test metrics come from the evaluation folders; table, JSON and
    figure are written. A malformed point or an unfinished run is one argparse error, not a traceback."""
    import json
    import sys

    import yaml

    mod = _load("scale_study")

    def run(name: str, state: dict, log: list[dict], seconds: float, method: str | None = None,
            params: dict | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        cfg = {"train": {"seconds": seconds}, **({"method": method, "params": params} if method else {})}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        (d / "state.json").write_text(json.dumps(state))
        (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return d

    def ev(name: str, ap: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"pixel_ap": ap, "best_dice": ap / 2, "calibrated_dice": ap / 3,
                                                    "sample_auroc": 0.6}))
        return d

    mt = run("mt", {"members": [{"synthetic_val_ap": 0.4, "steps_done": 10}, {"synthetic_val_ap": 0.6,
                                                                             "steps_done": 30}]}, [], 12.0,
             "multitask", {"train": {"steps": 6000}})
    # budget: configured steps over the method's cpu-small ones (mim-ood cpu-small: tokenizer 2000 + transformers 1500)
    mim = run("mim", {}, [{"stage": "tokenizer", "best_val": 0.5}, {"stage": "tokenizer", "best_val": 0.25},
                          {"stage": "mvtm", "best_val": 3.0}], 20.0, "mim-ood",
              {"tokenizer_train": {"steps": 8000}, "transformer_train": {"steps": 6000}, "tokenizer": {"steps": 9}})
    out = tmp_path / "res" / "scale"
    fig = tmp_path / "fig.png"
    monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), "--figure", str(fig), "--tests", "in,other",
                                      f"a={mt}:{ev('e1', 0.3)}:{ev('e2', 0.7)}", f"b={mim}:{ev('e3', 0.2)}"])
    mod.main()
    rows = json.loads(out.with_suffix(".json").read_text())["points"]
    assert rows[0]["label_free"] == pytest.approx(0.5) and rows[0]["steps"] == 40
    assert rows[0]["in_pixel_ap"] == 0.3 and rows[0]["other_pixel_ap"] == 0.7 and rows[0]["train_seconds"] == 12.0
    assert rows[1]["label_free"] is None and rows[1]["members"] == {"tokenizer": 0.25, "mvtm": 3.0}
    assert "other_pixel_ap" not in rows[1]
    assert rows[0]["budget"] == pytest.approx(4.0) and rows[1]["budget"] == pytest.approx(4.0)
    md = out.with_suffix(".md").read_text()
    assert "| a | 4x | 12.000 | 40 | 0.500 |" in md and "| b | 4x | 20.000 |" in md and fig.stat().st_size > 0
    # --validate-dir: every point also gets the synthetic validation AP (here from its cache)
    for lab, v in (("a", 0.41), ("b", 0.22)):
        (tmp_path / "val" / lab).mkdir(parents=True)
        (tmp_path / "val" / lab / "synthetic_validation.json").write_text(json.dumps({"mean_pixel_ap": v}))
    monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), "--figure", str(fig), "--tests", "in,other",
                                      "--validate-dir", str(tmp_path / "val"), "--reference", "in=0.35",
                                      f"a={mt}:{tmp_path / 'e1'}:{tmp_path / 'e2'}", f"b={mim}:{tmp_path / 'e3'}"])
    mod.main()
    rows = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [r["synthetic_ap"] for r in rows] == [0.41, 0.22] and "synthetic_ap" in out.with_suffix(".md").read_text()
    assert "Reference (intensity) pixel AP: in 0.350" in out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["seed_groups"] == []  # one seed per setting: no group
    # two seeds of one setting (labels b and b-s1): a mean ± std row with the sample std, the other setting left out
    # mim1 was resumed once: its train seconds are the loop seconds of both sessions (5 + 2), not the last session's 30
    mim1 = run("mim1", {}, [{"stage": "tokenizer", "seconds": 5.0}, {"stage": "tokenizer", "seconds": 2.0}], 30.0,
               "mim-ood", {"tokenizer_train": {"steps": 8000}, "transformer_train": {"steps": 6000}})
    cfg1 = yaml.safe_load((mim1 / "config.yaml").read_text())
    cfg1["train"]["resumed"] = True
    (mim1 / "config.yaml").write_text(yaml.safe_dump(cfg1))
    (tmp_path / "val" / "b-s1").mkdir(parents=True)
    (tmp_path / "val" / "b-s1" / "synthetic_validation.json").write_text(json.dumps({"mean_pixel_ap": 0.26}))
    monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), "--figure", str(fig), "--tests", "in,other",
                                      "--validate-dir", str(tmp_path / "val"), f"a={mt}:{tmp_path / 'e1'}",
                                      f"b={mim}:{tmp_path / 'e3'}", f"b-s1={mim1}:{ev('e4', 0.4)}"])
    mod.main()
    groups = json.loads(out.with_suffix(".json").read_text())["seed_groups"]
    assert json.loads(out.with_suffix(".json").read_text())["points"][2]["train_seconds"] == pytest.approx(7.0)
    assert [g["setting"] for g in groups] == ["b"] and groups[0]["seeds"] == ["b", "b-s1"]
    assert groups[0]["in_pixel_ap"]["mean"] == pytest.approx(0.3) and groups[0]["in_pixel_ap"]["n"] == 2
    assert groups[0]["in_pixel_ap"]["std"] == pytest.approx(0.1 * 2 ** 0.5)  # sample std of 0.2 and 0.4
    assert groups[0]["synthetic_ap"]["mean"] == pytest.approx(0.24) and "other_pixel_ap" not in groups[0]
    assert "| b | 4x | 2 | 0.240 ± 0.028 | 0.300 ± 0.141 |" in out.with_suffix(".md").read_text()
    # only a trailing -sK is a seed suffix: a setting whose name merely contains "-s" stays its own setting
    assert [mod._setting(x) for x in ("steps4x-smooth", "1x-smooth-s2", "steps16x-s10", "a-s")] == [
        "steps4x-smooth", "1x-smooth", "steps16x", "a-s"]
    capsys.readouterr()
    # a point whose run cannot be validated (no recorded data) is one clear error, not a traceback
    monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), "--validate-dir", str(tmp_path / "val2"),
                                      f"b={mim}:{tmp_path / 'e3'}"])
    with pytest.raises(SystemExit):
        mod.main()
    assert "point 'b': medanomaly validate failed" in capsys.readouterr().err
    for ref in ("nope=0.3", "in=x"):
        monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), "--tests", "in,other", "--reference", ref,
                                          f"b={mim}:{tmp_path / 'e3'}"])
        with pytest.raises(SystemExit):
            mod.main()
        assert "expected TEST=AP" in capsys.readouterr().err
    for bad, msg in [("nolabel", "expected LABEL=RUN_DIR"), (f"x={mt}", "expected LABEL=RUN_DIR"),
                     (f"x={tmp_path / 'nope'}:{tmp_path / 'e1'}", "not a finished run")]:
        monkeypatch.setattr(sys, "argv", ["scale_study.py", str(out), bad])
        with pytest.raises(SystemExit):
            mod.main()
        assert msg in capsys.readouterr().err


def test_cxr_kermany_pool_is_disjoint_and_dicom_reads_back(tmp_path: Path) -> None:
    """benchmarks/cxr_kermany.py: the AMAE pool takes whole patients out of the normal training set, has the 40 %
    pneumonia ratio, keeps val/test as given; its CR DICOM (MONOCHROME1, 12 bit) reads back as the 8-bit image x 16."""
    import numpy as np

    from medanomaly.data.io import read_image

    mod = _load("cxr_kermany")
    recs = [{"case_id": f"n{i}", "image": f"n{i}.png", "label": "0", "split": "train", "patient_id": f"p{i // 2}"}
            for i in range(300)]
    recs += [{"case_id": f"a{i}", "image": f"a{i}.png", "label": "1", "split": "train-pneumonia", "patient_id": f"q{i}"}
             for i in range(200)]
    recs += [{"case_id": f"v{i}", "image": f"v{i}.png", "label": "0", "split": "val", "patient_id": f"v{i}"}
             for i in range(5)]
    out = mod.split_pool(recs, seed=0)
    assert out == mod.split_pool(recs, seed=0) and out != mod.split_pool(recs, seed=1)
    train = [r for r in out if r["split"] == "train"]
    pool = [r for r in out if r["split"] == "pool"]
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in pool}
    n_norm = sum(r["label"] == "0" for r in pool)
    assert n_norm == mod.POOL_NORMALS and len(train) == 300 - n_norm
    assert abs(sum(r["label"] == "1" for r in pool) / len(pool) - mod.POOL_RATIO) < 0.01
    assert [r for r in out if r["split"] == "val"] == recs[-5:]
    assert not any(r["split"] == "train-pneumonia" for r in out)
    img = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(np.uint8)
    mod.write_cxr_dicom(img, tmp_path / "x.dcm", "case")
    back = read_image(tmp_path / "x.dcm")
    assert back.meta["photometric"] == "MONOCHROME1" and back.meta["modality"] == "CR"
    np.testing.assert_array_equal(back.array, img.astype(np.float32) * 16)


def test_cxr_kermany_mean_table_and_missing_benchmark(tmp_path: Path) -> None:
    """The per-format mean ± std (sample std) of the CXR table, checked by hand; a missing benchmark is one clear error."""
    mod = _load("cxr_kermany")
    rows = [{"method": "mae", "png_auroc": a, "jpeg_auroc": a + 0.01, "dicom_auroc": a, "png_ap": 0.5,
             "calibrated_sensitivity": 0.4, "calibrated_specificity": 0.9, "train_seconds": 100.0} for a in (0.8, 0.9)]
    rows.append({**rows[0], "method": "autoencoder", "train_seconds": None})
    lines = mod.mean_table(rows).splitlines()
    assert lines[2] == "| mae | 0.850 ± 0.071 | 0.860 ± 0.071 | 0.850 ± 0.071 | 0.500 ± 0.000 | 0.40 / 0.90 | 100 |"
    assert lines[3] == "| autoencoder | 0.800 | 0.810 | 0.800 | 0.500 | 0.40 / 0.90 | 0 |"
    with pytest.raises(SystemExit, match="no such folder; run the benchmark"):
        mod.table(tmp_path, tmp_path / "bench", [0], None)


def test_mae_smoothing_selection_helpers() -> None:
    """benchmarks/mae_smoothing_selection.py: the edge band on a known square, the post-processing equals mae's
    predict with that setting, the 'edge' share by brute force, pixel AP against scikit-learn, bad --sizes refused."""
    import argparse

    import numpy as np
    from sklearn.metrics import average_precision_score

    from medanomaly.data import make_toy_dataset, stack_dataset
    from medanomaly.methods import get_method, get_method_class
    from medanomaly.methods.base import RunContext

    mod = _load("mae_smoothing_selection")
    fg = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    fg[0, 0, 5:15, 5:15] = True
    band = mod.edge_band(fg, r=2)
    want = fg[0, 0].clone()
    want[7:13, 7:13] = False  # the 10 x 10 square minus its 6 x 6 interior
    assert torch.equal(band[0], want)

    det = get_method("mae", **get_method_class("mae").config_set("test"))
    det.fit(make_toy_dataset(n=8, size=32, seed=1), context=RunContext(quiet=True))
    test = stack_dataset(make_toy_dataset(n=4, size=32, abnormal_fraction=0.5, seed=2))
    x, f = test["image"], test["foreground"].bool()
    raw = mod.predict_maps(det, x, f)
    for s in ((1, 1), (3, 5), (5, 5)):
        assert torch.equal(mod.predict_maps(mod.with_setting(det, s), x, f), mod.smoothed(raw, f, s))

    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.random((2, 20, 20)), dtype=torch.float32)
    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[0, 8:11, 8:11] = True
    fg2 = fg.expand(2, 1, 20, 20)
    band2 = mod.edge_band(fg2, r=2)
    m = mod.metrics(maps, masks, fg2, band2)
    sel = fg2[:, 0]
    assert m["ap"] == pytest.approx(average_precision_score(masks[sel].numpy(), maps[sel].numpy()))
    v, b = maps[sel].numpy(), band2[sel].numpy()
    top = np.argsort(v)[-int(masks.sum()):]  # the k highest foreground pixels (no ties in random floats)
    assert m["edge"] == pytest.approx(b[top].mean())

    p = argparse.ArgumentParser()
    assert mod.parse_sizes("1,3,5", p) == (1, 3, 5)
    for bad in ("3,5", "1,2", "1,x", "0,1"):
        with pytest.raises(SystemExit):
            mod.parse_sizes(bad, p)


def test_label_free_ranking_tables_from_cached_validations(tmp_path: Path) -> None:
    """label_free_ranking.py: means over seeds per label, Spearman across labels (with and without the labels that
    learn nothing) and the seed choice, from cached ``synthetic_validation.json`` files; a stale cache (other
    settings) is not reused, and a folder without evaluated runs is one clear error."""
    import json

    from scipy.stats import spearmanr

    mod = _load("label_free_ranking")
    test_ap = {"a": [0.5, 0.6, 0.4], "b": [0.3, 0.2, 0.25], "c": [0.1, 0.1, 0.1], "intensity": [0.35] * 3}
    lf = {"a": [0.40, 0.45, 0.30], "b": [0.20, 0.10, 0.15], "c": [0.05, 0.06, 0.04], "intensity": [0.07] * 3}
    for label, aps in test_ap.items():
        for k, ap in enumerate(aps):
            run = tmp_path / "bench" / "runs" / f"seed-{k}" / label
            run.mkdir(parents=True)
            (run / "finished.json").write_text("{}")
            ev = tmp_path / "bench" / "eval" / f"seed-{k}" / label
            ev.mkdir(parents=True)
            (ev / "metrics.json").write_text(json.dumps({"pixel_ap": ap}))
            c = tmp_path / "bench" / "validate" / f"seed-{k}" / label
            c.mkdir(parents=True)
            (c / "synthetic_validation.json").write_text(json.dumps(
                {"max_images": None, "draws": 1, "seed": 0, "unseen_pixel_ap": lf[label][k],
                 "mean_pixel_ap": lf[label][k] + 0.01, "seconds": {"total": 1.0}}))
    prefix = tmp_path / "res" / "lf"
    mod.main([str(tmp_path / "bench"), str(prefix), "--title", "toy"])
    rec = json.loads(prefix.with_suffix(".json").read_text())
    table = {r["label"]: r for r in rec["table"]}
    assert table["a"]["unseen_pixel_ap"] == pytest.approx(np.mean(lf["a"]))
    assert table["a"]["test_pixel_ap"] == pytest.approx(0.5)
    means = {lab: (np.mean(lf[lab]), np.mean(test_ap[lab])) for lab in test_ap}
    rho_all = spearmanr([v[0] for v in means.values()], [v[1] for v in means.values()])[0]
    assert rec["spearman_across_labels"]["unseen_pixel_ap"]["all"] == pytest.approx(rho_all)
    assert rec["spearman_across_labels"]["unseen_pixel_ap"]["learned"] == pytest.approx(1.0)  # a > b > c
    assert rec["seed_choice"]["a"]["unseen_pixel_ap"] == {"label_free_best_seed": 1, "test_best_seed": 1,
                                                          "rho": pytest.approx(1.0)}
    assert prefix.with_suffix(".png").stat().st_size > 0 and "| a | 3 |" in prefix.with_suffix(".md").read_text()
    # a cache made with other settings is not reused: it would be recomputed (here: no real run, so it fails)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the fake run folder cannot be loaded
        mod.main([str(tmp_path / "bench"), str(prefix), "--draws", "2", "--labels", "a"])
    with pytest.raises(SystemExit, match="no finished, evaluated runs"):
        mod.main([str(tmp_path / "empty"), str(prefix)])
