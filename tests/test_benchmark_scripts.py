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
