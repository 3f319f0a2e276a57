"""Logic of the benchmark scripts that is not timing itself (timings are never asserted)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

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
