"""Stopping a fit and resuming it gives bit-identical weights and predictions, for every method that trains.

In-process, a SIGTERM after half the steps (the loop checkpoints and stops, as on Ctrl-C); in a subprocess, a
``kill -9`` for autoencoder (during a checkpoint write, between the tensor file and its JSON record) and multitask
(mid-training, one member finished). Plus: a multitask ``fit(B)`` in the work dir of ``fit(A)`` retrains its members.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.methods import get_method, get_method_class, list_methods
from medanomaly.methods.base import RunContext
from medanomaly.training import loop as loop_mod

torch.set_num_threads(1)

SIZE = 32
TRAIN = make_toy_dataset(12, SIZE, seed=0)
VAL = make_toy_dataset(4, SIZE, seed=1)
TEST = make_toy_dataset(4, SIZE, abnormal_fraction=0.5, seed=2)


class _CountingBar:
    """Wraps the loop's progress bar: counts optimiser steps; SIGTERM to itself at step ``stop_at`` (if set)."""

    count = 0
    stop_at: int | None = None

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        _CountingBar.count += n
        self._bar.update(n)
        if _CountingBar.stop_at is not None and _CountingBar.count == _CountingBar.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, checkpoints, raises KeyboardInterrupt

    def __getattr__(self, k: str) -> Any:
        return getattr(self._bar, k)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits here and in the killed subprocess (OMP_NUM_THREADS=1) use the same thread count: on a CPU the thread
    count changes float reductions, so a comparison across processes must pin it (the loop's "auto" would give this
    process every core)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_CountingBar]:
    real = loop_mod._progress
    monkeypatch.setattr(loop_mod, "_progress", lambda *a, **k: _CountingBar(real(*a, **k)))
    _CountingBar.count, _CountingBar.stop_at = 0, None
    return _CountingBar


def _fit(method: str, work: Path, resume: bool = True, data: Any = TRAIN, **over: Any) -> Any:
    params = get_method_class(method).config_set("test")
    params.update(over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "inter-blend uses contrast-inverted images"
        return get_method(method, **params).fit(data, VAL, context=RunContext(work_dir=work, resume=resume, quiet=True))


def _fingerprint(det: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    x = torch.stack([TEST[i]["image"] for i in range(len(TEST))])
    fg = torch.stack([TEST[i]["foreground"] for i in range(len(TEST))])
    res = det.predict(x, fg)
    return {k: v.detach().cpu() for k, v in det.state_tensors().items()}, res.pixel_scores, res.image_scores


def _assert_identical(a: Any, b: Any) -> None:
    (sa, pa, ia), (sb, pb, ib) = _fingerprint(a), _fingerprint(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"weights differ: {differ[:5]}"
    assert torch.equal(pa, pb) and torch.equal(ia, ib)


#: one pass of statistics, no training loop (checked by test_every_training_method_is_covered)
_NO_LOOP = ("intensity", "zscore")
_TRAINING = [m for m in list_methods() if m not in _NO_LOOP]


def test_every_training_method_is_covered(counting: type[_CountingBar], tmp_path: Path) -> None:
    """The methods skipped below really have no training loop (a new method is covered automatically)."""
    for m in sorted(set(list_methods()) - set(_TRAINING)):
        counting.count = 0
        _fit(m, tmp_path / m)
        assert counting.count == 0, f"{m} trains: add it to the kill/resume test"


@pytest.mark.parametrize("method", _TRAINING)
def test_stop_then_resume_is_bit_identical(method: str, counting: type[_CountingBar], tmp_path: Path) -> None:
    ref = _fit(method, tmp_path / "ref")
    total = counting.count
    assert total >= 2, f"{method}: the test config trains {total} step(s)"
    counting.count, counting.stop_at = 0, max(1, total // 2)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step"):
        _fit(method, tmp_path / "run")
    assert any((tmp_path / "run").rglob("checkpoints/*.json")), "no checkpoint was written on the stop"
    counting.stop_at = None
    resumed = _fit(method, tmp_path / "run")
    assert counting.count == total, f"{method}: {counting.count} steps in all, {total} uninterrupted: steps were trained again"
    _assert_identical(ref, resumed)


# ------------------------------------------------------------------------------------------ kill -9 (subprocess)
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    import torch
    torch.set_num_threads(1)
    from medanomaly.data import make_toy_dataset
    from medanomaly.methods import get_method, get_method_class
    from medanomaly.methods.base import RunContext
    from medanomaly.training import loop

    method, work, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    delay = float(os.environ.get("TEST_STEP_DELAY", "0"))
    real = loop._progress

    class Slow:
        def __init__(self, bar):
            self.bar = bar
        def update(self, n=1):
            self.bar.update(n)
            time.sleep(delay)
        def __getattr__(self, k):
            return getattr(self.bar, k)

    loop._progress = lambda *a, **k: Slow(real(*a, **k))
    params = get_method_class(method).config_set("test")
    params.update(over)
    warnings.simplefilter("ignore")
    size = int(sys.argv[4])
    get_method(method, **params).fit(make_toy_dataset(12, size, seed=0), make_toy_dataset(4, size, seed=1),
                                     context=RunContext(work_dir=work, resume=True, quiet=True))
    print("FINISHED")
    """
)


def _start(tmp_path: Path, method: str, work: Path, over: dict[str, Any], **env: str) -> subprocess.Popen:
    script = tmp_path / "fit.py"
    script.write_text(_SCRIPT)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDANOMALY_QUIET": "1", **env}
    return subprocess.Popen([sys.executable, str(script), method, str(work), json.dumps(over), str(SIZE)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, cond: Any, what: str) -> None:
    deadline = time.time() + 120
    while not cond() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    if not cond():
        out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
        proc.kill()
        pytest.fail(f"never saw {what} (rc {proc.returncode}): {out[-500:]} {err[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "FINISHED" not in out


def test_kill9_during_checkpoint_write_autoencoder(tmp_path: Path) -> None:
    over = {"train": {**get_method_class("autoencoder").config_set("test")["train"], "steps": 8, "checkpoint_every": 2}}
    work = tmp_path / "run"
    ck = work / "checkpoints"
    # each checkpoint write pauses between the tensor file and its JSON record; kill in the second one's pause
    proc = _start(tmp_path, "autoencoder", work, over, MEDANOMALY_CKPT_WRITE_PAUSE="1.5")
    ref = _fit("autoencoder", tmp_path / "ref", **over)
    _kill_when(proc, lambda: (ck / "autoencoder.prev.json").exists() and (ck / "autoencoder.safetensors").exists()
               and not (ck / "autoencoder.json").exists(), "the second checkpoint write")
    assert json.loads((ck / "autoencoder.prev.json").read_text())["step"] == 2
    with pytest.warns(UserWarning, match="torn checkpoint.*resuming from .*autoencoder.prev.json .step 2"):
        resumed = get_method("autoencoder", **{**get_method_class("autoencoder").config_set("test"), **over}).fit(
            TRAIN, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))
    _assert_identical(ref, resumed)
    assert sorted(p.name for p in ck.iterdir()) == ["autoencoder.json", "autoencoder.safetensors"]


def test_kill9_mid_training_multitask(tmp_path: Path) -> None:
    base = get_method_class("multitask").config_set("test")
    over = {"train": {**base["train"], "steps": 6, "checkpoint_every": 1}}
    det = get_method("multitask", **{**base, **over})
    first, second = (c.name for c in det.combinations())
    work = tmp_path / "run"
    proc = _start(tmp_path, "multitask", work, over, TEST_STEP_DELAY="0.3")
    ref = _fit("multitask", tmp_path / "ref", **over)
    _kill_when(proc, lambda: (work / second / "checkpoints" / "unet.json").exists(), "the second member's checkpoint")
    assert (work / first / "member.json").exists() and not (work / second / "member.json").exists()
    resumed = _fit("multitask", work, **over)
    _assert_identical(ref, resumed)


# ------------------------------------------------------------------------------------------ stale members
def test_multitask_fit_on_other_data_does_not_reuse_members(tmp_path: Path) -> None:
    from medanomaly.data.fingerprint import dataset_fingerprint

    work = tmp_path / "work"
    data_b = make_toy_dataset(12, SIZE, seed=7)
    a = _fit("multitask", work, data=TRAIN)
    names = [c.name for c in a.combinations()]
    rec = json.loads((work / names[0] / "member.json").read_text())
    assert rec["data_fingerprint"] == dataset_fingerprint(TRAIN)
    params = get_method_class("multitask").config_set("test")
    with pytest.warns(UserWarning, match="not resuming.*the training data differ"):
        b = get_method("multitask", **params).fit(data_b, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))
    fresh_b = _fit("multitask", tmp_path / "fresh", data=data_b)
    _assert_identical(b, fresh_b)
    sa = a.state_tensors()
    assert any(not torch.equal(sa[k], v) for k, v in b.state_tensors().items()), "fit(B) returned A's members"
    # same data again: the members are reused (no retraining, no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = get_method("multitask", **params).fit(data_b, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))
    _assert_identical(again, fresh_b)
    # reuse_members_from another run's folder: only with the same data
    with pytest.warns(UserWarning, match="other training data"):
        c = get_method("multitask", **{**params, "reuse_members_from": str(work)}).fit(
            TRAIN, VAL, context=RunContext(work_dir=tmp_path / "c", resume=False, quiet=True))
    assert not any("reused_from" in i for i in c.member_info)
    d = get_method("multitask", **{**params, "reuse_members_from": str(work)}).fit(
        data_b, VAL, context=RunContext(work_dir=tmp_path / "d", resume=False, quiet=True))
    assert all(i.get("reused_from") == str(work) for i in d.member_info)
    _assert_identical(d, fresh_b)
    # an unfinished checkpoint of other data is not resumed either
    for n in names:
        (work / n / "member.json").unlink()
    with pytest.warns(UserWarning, match="holds a checkpoint of other training data"):
        e = get_method("multitask", **params).fit(TRAIN, VAL, context=RunContext(work_dir=work, resume=True, quiet=True))
    _assert_identical(e, a)
