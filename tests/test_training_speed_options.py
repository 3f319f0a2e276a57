"""Speed options of the training loop change nothing beyond float rounding (speed itself: benchmarks/throughput.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medanomaly.training import TrainConfig, train_model
from medanomaly.training.loop import make_adamw


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(),
                         nn.Conv2d(8, 1, 1))


def _batch(step: int) -> torch.Tensor:
    rng = np.random.default_rng([3, step])
    return torch.from_numpy(rng.standard_normal((4, 1, 16, 16)).astype(np.float32))


def _loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ((m(x) - x.flip(-1)) ** 2).mean()


def _train(impl: str) -> dict[str, torch.Tensor]:
    net = _net()
    cfg = TrainConfig(steps=12, lr=1e-2, warmup_steps=2, quiet=True, device="cpu", optimizer_impl=impl, threads=1)
    train_model(net, _loss, _batch, cfg)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_adamw_implementations_agree() -> None:
    single, foreach, fused, auto = (_train(i) for i in ("single", "foreach", "fused", "auto"))
    for k in single:
        assert torch.equal(single[k], foreach[k])  # the same arithmetic, batched over tensors
        torch.testing.assert_close(fused[k], single[k], rtol=1e-5, atol=1e-6)  # one kernel: float rounding only
        assert torch.equal(auto[k], fused[k])


def test_auto_is_fused_on_cpu_and_bad_names_are_refused() -> None:
    ps = list(_net().parameters())
    assert make_adamw(ps, TrainConfig(quiet=True)).defaults["fused"] is True
    assert make_adamw(ps, TrainConfig(optimizer_impl="foreach")).defaults["foreach"] is True
    with pytest.raises(ValueError, match="optimizer_impl"):
        TrainConfig(optimizer_impl="sgd")


def test_auto_threads_never_depend_on_the_load_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from medanomaly.training import loop

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MEDANOMALY_THREADS", raising=False)
    monkeypatch.setattr(loop, "usable_cores", lambda: 2)
    for load in (0.2, 7.5, None):  # the default: every core (minus data workers) whatever the load
        monkeypatch.setattr(loop, "_load_average", lambda load=load: load)
        assert loop.resolve_threads("auto") == 2 and loop.resolve_threads("auto", data_workers=1) == 1
    monkeypatch.setenv("MEDANOMALY_THREADS", "adaptive")  # opt-in: 1 thread on a busy machine
    monkeypatch.setattr(loop, "_load_average", lambda: 0.2)
    assert loop.resolve_threads("auto") == 2
    monkeypatch.setattr(loop, "_load_average", lambda: 7.5)
    assert loop.resolve_threads("auto") == 1
    monkeypatch.setattr(loop, "_load_average", lambda: None)  # no load average on this OS
    assert loop.resolve_threads("auto") == 2
    monkeypatch.setenv("MEDANOMALY_THREADS", "3")
    assert loop.resolve_threads("auto") == 3 and loop.resolve_threads(1) == 1
    monkeypatch.setenv("MEDANOMALY_THREADS", "many")
    with pytest.raises(ValueError, match="MEDANOMALY_THREADS"):
        loop.resolve_threads("auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert loop.resolve_threads("auto") == 4
