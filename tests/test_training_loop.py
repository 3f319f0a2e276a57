"""The training loop: schedules, early stopping, safetensors checkpoints, interrupt + resume (SIGTERM, SIGKILL, torn writes)."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medanomaly.training import BatchSampler, TrainConfig, config_from_dict, load_checkpoint, lr_factor, train_model
from medanomaly.training import loop as loop_mod
from medanomaly.training.atomic import atomic_write_bytes, clean_stale_tmp, is_atomic_tmp

torch.set_num_threads(1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([0, step])
    x = rng.standard_normal((16, 8)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(x.sum(1, keepdims=True))


def _loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = b
    return ((m(x) - y) ** 2).mean()


_XV, _YV = _batch(10_000)


def _val(m: nn.Module) -> float:
    return float(_loss(m, (_XV, _YV)))


def _cfg(**kw: object) -> TrainConfig:
    base = {"steps": 30, "lr": 1e-2, "warmup_steps": 3, "val_every": 5, "quiet": True, "device": "cpu", "deterministic": True}
    base.update(kw)
    return TrainConfig(**base)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=20, warmup_steps=4, schedule="constant")
    assert [lr_factor(s, const) for s in range(20)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)
    # the loop really applies it
    res = train_model(_model(), _loss, _batch, _cfg(steps=12, lr=0.5, warmup_steps=4, val_every=0))
    cfg12 = _cfg(steps=12, warmup_steps=4)
    assert [r["lr"] for r in res.history] == pytest.approx([0.5 * lr_factor(s, cfg12) for s in range(12)])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="val_mode"):
        TrainConfig(val_mode="best")
    with pytest.raises(KeyError, match="unknown training parameter"):
        config_from_dict({"stepz": 3})
    assert config_from_dict({"steps": 3, "betas": [0.5, 0.9]}).betas == (0.5, 0.9)


def test_early_stopping_keeps_best_weights() -> None:
    vals = iter([5.0, 3.0, 4.0, 4.5, 6.0, 7.0, 1.0])
    snaps: list[dict[str, torch.Tensor]] = []

    def val_fn(m: nn.Module) -> float:
        snaps.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(vals)

    model = _model()
    res = train_model(model, _loss, _batch, _cfg(steps=100, val_every=2, early_stopping_patience=3), val_fn=val_fn)
    assert res.stopped_early and res.steps_done == 10  # validations at 2, 4 (best), then 6, 8, 10 without improvement
    assert res.best_step == 4 and res.best_val == 3.0
    assert all(torch.equal(model.state_dict()[k], snaps[1][k]) for k in snaps[1])  # best weights restored


def test_nan_loss_is_reported() -> None:
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train_model(_model(), lambda m, b: _loss(m, b) * float("nan"), _batch, _cfg(steps=3))


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpt.pt"
    atomic_write_bytes(target, b"old")

    def boom(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content that must not appear")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_sigterm_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    ref = _model()
    ref_res = train_model(ref, _loss, _batch, _cfg(), val_fn=_val)

    def batch_with_signal(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 11:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: finish the step, checkpoint, stop
        return _batch(step)

    model = _model()
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 12"):
        train_model(model, _loss, batch_with_signal, _cfg(checkpoint_every=5), run_dir=tmp_path, val_fn=_val)
    assert load_checkpoint(tmp_path / "checkpoints" / "model.json")["step"] == 12
    model = _model(seed=123)  # different initial weights: everything must come from the checkpoint
    res = train_model(model, _loss, _batch, _cfg(checkpoint_every=5), run_dir=tmp_path, val_fn=_val)
    assert res.resumed_from == 12
    assert _same(model, ref)
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref_res.history]
    # a finished run is loaded, not trained again
    again = _model(seed=7)
    res2 = train_model(again, _loss, _batch, _cfg(checkpoint_every=5), run_dir=tmp_path, val_fn=_val)
    assert _same(again, ref) and res2.steps_done == 30


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    train_model(_model(), _loss, _batch, _cfg(steps=2), run_dir=tmp_path)
    other = nn.Linear(8, 1)
    with pytest.raises(RuntimeError, match="does not fit this model"):
        train_model(other, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), _batch, _cfg(steps=4), run_dir=tmp_path)
    # garbage where the record is: a warning, then a fresh start (never an unpickling attempt)
    (tmp_path / "checkpoints" / "model.json").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="not a JSON checkpoint record.*starting afresh"):
        res = train_model(_model(), _loss, _batch, _cfg(steps=4), run_dir=tmp_path)
    assert res.resumed_from == 0 and res.steps_done == 4
    with pytest.raises(RuntimeError, match="unreadable"):
        load_checkpoint(tmp_path / "checkpoints" / "missing.json")
    with pytest.raises(RuntimeError, match="pickle"):
        load_checkpoint(tmp_path / "checkpoints" / "model.pt")


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from torch import nn
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    from medanomaly.training import TrainConfig, train_model

    run_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def batch_fn(step):
        rng = np.random.default_rng([0, step])
        x = rng.standard_normal((16, 8)).astype(np.float32)
        time.sleep(delay)
        return torch.from_numpy(x), torch.from_numpy(x.sum(1, keepdims=True))

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    xv, yv = batch_fn(10_000)
    cfg = TrainConfig(steps=40, lr=1e-2, warmup_steps=3, val_every=5, checkpoint_every=4, quiet=True, device="cpu",
                      deterministic=True)
    train_model(model, loss_fn, batch_fn, cfg, run_dir=run_dir, val_fn=lambda m: float(loss_fn(m, (xv, yv))))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    """
)


def test_sigkill_midway_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDANOMALY_QUIET": "1"}
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "model.json"
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(tmp_path / "killed.st"), "0.2"], env=env)
    # meanwhile: the uninterrupted reference run
    ref = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ref"), str(tmp_path / "ref.st"), "0"], env=env)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert ckpt.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.st").exists(), "the run finished before it was killed"
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 40
    assert ref.wait(timeout=120) == 0
    subprocess.run([sys.executable, str(script), str(run), str(tmp_path / "resumed.st"), "0"], env=env, check=True, timeout=120)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "resumed.st")), load_file(str(tmp_path / "ref.st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = load_checkpoint(ckpt)["model"]
    last_b = load_checkpoint(tmp_path / "ref" / "checkpoints" / "model.json")["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def test_batch_sampler_is_deterministic_and_label_free() -> None:
    from medanomaly.data import make_toy_dataset

    ds = make_toy_dataset(n=10, size=16, abnormal_fraction=0.5)
    s1, s2 = BatchSampler(ds, 4, seed=3), BatchSampler(ds, 4, seed=3, cache_mb=0)  # cached vs read per step
    b1, b2 = s1(7), s2(7)
    assert set(b1) == {"image", "foreground"}
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["foreground"], b2["foreground"])
    assert not torch.equal(s1(7)["image"], s1(8)["image"])
    with pytest.raises(ValueError, match="empty"):
        BatchSampler(ds.subset([]), 4)
    assert math.isfinite(float(b1["image"].sum()))


def test_checkpoint_is_safetensors_plus_json_record(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    train_model(_model(), _loss, _batch, _cfg(steps=6), run_dir=tmp_path, val_fn=_val)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((ck / "model.json").read_text())
    import hashlib

    assert meta["tensors"]["sha256"] == hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()
    assert meta["step"] == 6 and meta["finished"] and len(meta["history"]) == 6
    t = load_file(str(ck / "model.safetensors"))
    assert t["rng/torch"].dtype == torch.uint8 and t["rng/numpy_key"].dtype == torch.uint8
    assert t["rng/numpy_key"].numel() == 624 * 4
    assert any(k.startswith("optim/0/") for k in t) and any(k.startswith("best/") for k in t)
    st = load_checkpoint(ck / "model.safetensors")
    assert st["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and st["best_step"] is not None


def test_rng_state_round_trip(tmp_path: Path) -> None:
    """python, numpy (legacy global) and torch RNG continue exactly after a resume."""
    import random

    draws: dict[str, list[tuple[float, float, float]]] = {"ref": [], "run": []}

    def loss_with_rng(key: str):  # noqa: ANN202
        def f(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            draws[key].append((random.random(), float(np.random.standard_normal()), float(torch.rand(()))))  # noqa: NPY002
            return _loss(m, b)
        return f

    train_model(_model(), loss_with_rng("ref"), _batch, _cfg(steps=10, val_every=0))

    def stop_at_4(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return _batch(step)

    with pytest.raises(KeyboardInterrupt):
        train_model(_model(), loss_with_rng("run"), stop_at_4, _cfg(steps=10, val_every=0), run_dir=tmp_path)
    random.seed(99)
    np.random.seed(99)  # noqa: NPY002
    torch.manual_seed(99)
    train_model(_model(), loss_with_rng("run"), _batch, _cfg(steps=10, val_every=0), run_dir=tmp_path)
    assert draws["run"] == draws["ref"]


def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the tensor file and its JSON record: the previous pair is used, and the result is unchanged."""
    ref = _model()
    train_model(ref, _loss, _batch, _cfg(), val_fn=_val)
    real = loop_mod.atomic_write_text
    calls = {"n": 0}

    def crash_on_third(path: object, text: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise SystemExit("killed while writing")  # as a kill: the tensor file of save 3 is written, its record not
        real(path, text)

    monkeypatch.setattr(loop_mod, "atomic_write_text", crash_on_third)
    with pytest.raises(SystemExit):
        train_model(_model(), _loss, _batch, _cfg(checkpoint_every=5), run_dir=tmp_path, val_fn=_val)
    monkeypatch.undo()
    ck = tmp_path / "checkpoints"
    assert {"model.prev.json", "model.prev.safetensors", "model.safetensors"} <= {p.name for p in ck.iterdir()}
    assert not (ck / "model.json").exists()
    assert load_checkpoint(ck / "model.json")["step"] == 10  # the fallback pair
    model = _model(seed=5)
    with pytest.warns(UserWarning, match="torn checkpoint.*resuming from .*model.prev.json .step 10"):
        res = train_model(model, _loss, _batch, _cfg(checkpoint_every=5), run_dir=tmp_path, val_fn=_val)
    assert res.resumed_from == 10 and _same(model, ref)
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.safetensors"]
    # an altered tensor file (hash mismatch) with no fallback: a warning and a fresh start
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:-3] + b"xyz")
    with pytest.warns(UserWarning, match="sha256.*starting afresh"):
        res = train_model(_model(), _loss, _batch, _cfg(), run_dir=tmp_path, val_fn=_val)
    assert res.resumed_from == 0


def test_legacy_pickle_checkpoint_is_ignored_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "model.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.warns(UserWarning, match="pickle checkpoint.*never loaded"):
        res = train_model(_model(), _loss, _batch, _cfg(steps=3), run_dir=tmp_path)
    assert res.resumed_from == 0 and not marker.exists()


def test_clean_stale_tmp(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    stale = tmp_path / ".a.bin.k3j_9xq2.tmp"
    stale.write_bytes(b"partial")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / ".a.bin.tmp"]
    for k in keep:
        k.write_bytes(b"mine")
    assert is_atomic_tmp(stale.name) and not any(is_atomic_tmp(k.name) for k in keep)
    assert clean_stale_tmp(tmp_path, min_age_s=3600) == []  # too recent: could be another writer's
    assert clean_stale_tmp(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.bin", *(k.name for k in keep)])
    assert clean_stale_tmp(tmp_path / "missing") == []
    # the loop cleans its checkpoint folder at start
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / ".model.safetensors.abcdefgh.tmp").write_bytes(b"left by a kill")
    train_model(_model(), _loss, _batch, _cfg(steps=2), run_dir=tmp_path / "run")
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.safetensors"]


def test_consistent_but_malformed_record_is_a_clear_error(tmp_path: Path) -> None:
    train_model(_model(), _loss, _batch, _cfg(steps=3), run_dir=tmp_path)
    meta_path = tmp_path / "checkpoints" / "model.json"
    meta = json.loads(meta_path.read_text())
    for broken in ({k: v for k, v in meta.items() if k != "rng"}, {**meta, "step": "three"},
                   {**meta, "optimizer": {"state_keys": {"0": ["nope"]}, "scalars": {}, "param_groups": []}}):
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(RuntimeError, match="inconsistent|does not fit"):
            train_model(_model(), _loss, _batch, _cfg(steps=3), run_dir=tmp_path)
