"""One training loop for every method.

The loop is step based. Data come from ``batch_fn(step)``, which must be a deterministic function of the
step (e.g. ``np.random.default_rng([seed, step])`` inside it): with model and optimiser state restored from a
checkpoint, a resumed run then reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medanomaly.methods.base import atomic_write_bytes

__all__ = ["TrainConfig", "TrainResult", "train_model", "get_device", "seed_everything", "autocast"]


def get_device(device: str | None = None) -> torch.device:
    """``"auto"``/None: CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - legacy global RNG used by some libraries
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU training stays in fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainConfig:
    """Every knob of the loop."""

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 0  # 0: only at the end / on interrupt
    val_every: int = 0  # 0: no validation
    early_stopping_patience: int = 0  # in validations; 0: off
    val_mode: str = "min"  # the validation quantity is minimised ("min") or maximised ("max")
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    quiet: bool = False
    desc: str = "train"


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    steps_done: int = 0
    stopped_early: bool = False


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule '{cfg.schedule}' (cosine | constant)")
    total = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / total)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _progress(total: int, initial: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


def _ckpt_path(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def _save_ckpt(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, result: TrainResult,
               best_state: dict[str, torch.Tensor] | None) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": result.history,
            "best_val": result.best_val,
            "best_step": result.best_step,
            "best_state": best_state,
            "torch_rng": torch.get_rng_state(),
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def train_model(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
    batch_fn: Callable[[int], Any],
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    name: str = "model",
    resume: bool = True,
    params: Iterator[nn.Parameter] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps.

    loss_fn(model, batch) -> loss or (loss, logs); batch_fn(step) -> batch (deterministic in step).
    val_fn(model) -> a validation quantity that uses **no real anomaly label** (used for early stopping and
    for keeping the best weights). With ``run_dir``, checkpoints go to ``run_dir/checkpoints/<name>.pt``
    (atomically), every ``cfg.checkpoint_every`` steps and on SIGINT/SIGTERM; with ``resume`` an existing
    checkpoint is continued. At the end the best-validation weights (if any) are loaded into ``model``.
    """
    device = get_device(cfg.device)
    model.to(device)
    opt = torch.optim.AdamW(
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
    )
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    ckpt = _ckpt_path(Path(run_dir), name) if run_dir is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)  # our own file, written by this loop
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        result.history = state["history"]
        result.best_val, result.best_step = state["best_val"], state["best_step"]
        best_state = state["best_state"]
        torch.set_rng_state(state["torch_rng"])

    interrupted = {"flag": False}

    def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        interrupted["flag"] = True

    old_handlers = {}
    with contextlib.suppress(ValueError):  # signals only in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, _on_signal)

    bad_vals = 0
    bar = _progress(cfg.steps, start, cfg.desc, cfg.quiet)
    t0 = time.perf_counter()
    step = start
    try:
        model.train()
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg)
            batch = batch_fn(step)
            with autocast(device, cfg.amp):
                out = loss_fn(model, batch)
            loss, logs = (out if isinstance(out, tuple) else (out, {}))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.desc}: loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            rec = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], **logs}
            if val_fn is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                model.eval()
                with torch.no_grad():
                    v = float(val_fn(model))
                model.train()
                rec["val"] = v
                better = result.best_val is None or (v < result.best_val if cfg.val_mode == "min" else v > result.best_val)
                if better:
                    result.best_val, result.best_step = v, step
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                    bad_vals = 0
                else:
                    bad_vals += 1
            result.history.append(rec)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{rec['loss']:.4g}", it_s=f"{(step - start) / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_ckpt(ckpt, model, opt, step, result, best_state)
            if interrupted["flag"]:
                if ckpt is not None:
                    _save_ckpt(ckpt, model, opt, step, result, best_state)
                raise KeyboardInterrupt(f"{cfg.desc}: interrupted at step {step}; checkpoint saved, resume to continue")
            if cfg.early_stopping_patience and bad_vals >= cfg.early_stopping_patience:
                result.stopped_early = True
                break
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    result.steps_done = step
    if ckpt is not None:
        _save_ckpt(ckpt, model, opt, step, result, best_state)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a (method config) dict; unknown keys raise."""
    valid = set(asdict(TrainConfig()))
    unknown = set(d) - valid
    if unknown:
        raise KeyError(f"unknown training parameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    d = dict(d)
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return TrainConfig(**d)


def dump_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in history))
