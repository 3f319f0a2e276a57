"""One training loop for every method.

The loop is step based. Data come from ``batch_fn(step)``, which must be a deterministic function of the
step (e.g. ``np.random.default_rng([seed, step])`` inside it): with model, optimiser and RNG state restored
from a checkpoint, a resumed run then reproduces an uninterrupted one exactly (tested with SIGKILL).

What the loop does for every method:

- device choice (``"auto"``: CUDA when present, else CPU) and bf16 autocast on CUDA (``amp``);
- CPU threads (``threads``, :func:`resolve_threads`, the one place where the choice is made): ``"auto"`` uses every
  usable core for intra-op parallelism, minus one per DataLoader worker of ``batch_fn`` (its ``num_workers``), 1 when
  the machine is already busy (load average), and respects an explicit ``OMP_NUM_THREADS``; the count used is stored
  in the checkpoint and in ``TrainResult.threads``;
- seeding at a fresh start (``seed``; ``deterministic=True`` also asks torch for deterministic kernels);
- AdamW (fused kernel by default, ``optimizer_impl``), linear warm-up then cosine (or constant) learning rate,
  gradient-norm clipping;
- validation every ``val_every`` steps with ``val_fn(model) -> float``, a quantity that must use **no real
  anomaly label** (e.g. reconstruction error of healthy validation images); the best-validation weights are
  kept and loaded at the end, and training stops after ``early_stopping_patience`` validations without
  improvement;
- checkpoints every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM; ``resume=True`` continues
  from the checkpoint. A checkpoint is ``checkpoints/<name>.safetensors`` (model, best and optimizer tensors, RNG
  states as uint8 tensors) plus ``checkpoints/<name>.json`` (counters, history, optimizer settings, python/numpy
  RNG scalars and the sha256 of the tensor file), each written atomically, the JSON last as the commit record.
  A torn checkpoint (hash mismatch) falls back to the previous pair or starts afresh, with a warning. Nothing
  in a run folder is ever unpickled: an old ``<name>.pt`` is ignored with a warning;
- a progress bar with loss and throughput (``quiet=True`` hides it), one history record per step;
- data-parallel training under ``torchrun`` (see :mod:`medanomaly.training.ddp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medanomaly.training import ddp
from medanomaly.training.atomic import atomic_write_bytes, atomic_write_text, clean_stale_tmp

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_model",
    "get_device",
    "seed_everything",
    "autocast",
    "config_from_dict",
    "lr_factor",
    "load_checkpoint",
    "make_adamw",
    "dump_history",
    "CheckpointError",
    "CheckpointFiles",
    "checkpoint_files",
    "remove_checkpoint",
    "resolve_threads",
    "usable_cores",
]

# keys whose change between a checkpoint and a resumed run changes the result; we warn about them
_RESUME_KEYS = ("steps", "lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "grad_clip", "seed")


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None: CUDA when present, else CPU. Under ``torchrun`` with CUDA, the local rank's GPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", ddp.get_local_rank()) if ddp.is_distributed() else torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this OS
        return None


def resolve_threads(threads: int | str = "auto", data_workers: int = 0) -> int:
    """Torch intra-op threads for a run: an int as given; ``"auto"``: ``OMP_NUM_THREADS`` when set, else
    ``MEDANOMALY_THREADS`` when set (a number, or ``adaptive``), else the usable cores minus ``data_workers`` (each
    DataLoader worker computes on a core of its own), at least 1.

    The default never looks at what else the machine is doing: on a CPU the thread count changes float reductions,
    so a fit's result must not depend on the load. ``MEDANOMALY_THREADS=adaptive`` opts in to 1 thread when the
    1-minute load average is above ``cores - 0.5``: measured on a 2-core machine (benchmarks/throughput.py,
    docs/results/throughput.md), 2 threads beat 1 by 1.1-1.6x when quiet but were 2-40x *slower* at load 7-10
    (OpenMP threads wait for a sibling that is not scheduled)."""
    if threads != "auto":
        n = int(threads)
        if n < 1:
            raise ValueError(f"threads must be >= 1 or 'auto', got {threads}")
        return n
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    mine = os.environ.get("MEDANOMALY_THREADS", "").strip().lower()
    if mine.isdigit() and int(mine) > 0:
        return int(mine)
    if mine not in ("", "adaptive"):
        raise ValueError(f"MEDANOMALY_THREADS must be a number >= 1 or 'adaptive', got {mine!r}")
    cores = usable_cores()
    n = max(1, cores - max(0, int(data_workers)))
    if mine == "adaptive":
        load = _load_average()
        if load is not None and load > cores - 0.5:
            n = 1
    return n


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
    deterministic: bool = False  # torch.use_deterministic_algorithms during training
    ddp_sync: str = "ddp"  # under torchrun: "ddp" (DistributedDataParallel) | "allreduce" (average grads after backward)
    threads: int | str = "auto"  # torch intra-op threads on CPU (see resolve_threads); does not change results
    # AdamW implementation: "auto" (fused where torch has it for the parameters, else foreach), "fused", "foreach",
    # "single" (torch's per-tensor loop, the CPU default before). foreach equals single bit for bit; fused differs by
    # float rounding (~1e-8 after 50 steps) and was 5x faster per optimiser step on the multitask U-Net (throughput.md)
    optimizer_impl: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if int(self.steps) < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if not float(self.lr) > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be 'cosine' or 'constant', got '{self.schedule}'")
        if self.val_mode not in ("min", "max"):
            problems.append(f"val_mode must be 'min' or 'max', got '{self.val_mode}'")
        if not (self.threads == "auto" or (isinstance(self.threads, int) and self.threads >= 1)):
            problems.append(f"threads must be 'auto' or an int >= 1, got {self.threads!r}")
        if self.optimizer_impl not in ("auto", "fused", "foreach", "single"):
            problems.append(f"optimizer_impl must be 'auto', 'fused', 'foreach' or 'single', got '{self.optimizer_impl}'")
        if self.ddp_sync not in ("ddp", "allreduce"):
            problems.append(f"ddp_sync must be 'ddp' or 'allreduce', got '{self.ddp_sync}'")
        for k in ("warmup_steps", "checkpoint_every", "val_every", "early_stopping_patience"):
            if int(getattr(self, k)) < 0:
                problems.append(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0.0 <= float(self.min_lr_ratio) <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    steps_done: int = 0
    stopped_early: bool = False
    resumed_from: int = 0
    seconds: float = 0.0
    threads: int = 0  # torch intra-op threads used


def make_adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """The loop's AdamW with ``cfg.optimizer_impl`` (see :class:`TrainConfig`); "auto" is fused when every parameter is
    a floating-point tensor on CPU or CUDA (torch's fused AdamW supports both), else foreach."""
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas)}
    impl = cfg.optimizer_impl
    if impl == "auto":
        ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        impl = "fused" if ok else "foreach"
    if impl == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = impl == "foreach"
    return torch.optim.AdamW(params, **kw)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at (0-based) ``step``: linear warm-up to 1, then cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    total = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, max(0.0, (step - cfg.warmup_steps) / total))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


_lr_factor = lr_factor  # backward-compatible name


def _progress(total: int, initial: int, desc: str, quiet: bool) -> Any:
    from medanomaly.training.progress import progress_bar

    return progress_bar(total=total, initial=initial, desc=desc, quiet=quiet)


# ---------------------------------------------------------------------------------------------- checkpoints
CKPT_FORMAT = 3
#: test hook: seconds to sleep between writing a checkpoint's tensor file and its JSON record
PAUSE_ENV = "MEDANOMALY_CKPT_WRITE_PAUSE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, torn, a pickle, or not this model's)."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of checkpoint ``name`` in ``folder`` (``run_dir/checkpoints``).

    ``tensors``/``meta`` the committed pair; ``prev_*`` the pair before it, kept only while a new one is written;
    ``legacy`` the pickle checkpoint of older versions (never loaded).
    """

    folder: Path
    name: str

    @property
    def tensors(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    @property
    def meta(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def prev_tensors(self) -> Path:
        return self.folder / f"{self.name}.prev.safetensors"

    @property
    def prev_meta(self) -> Path:
        return self.folder / f"{self.name}.prev.json"

    @property
    def legacy(self) -> Path:
        return self.folder / f"{self.name}.pt"

    def all(self) -> tuple[Path, ...]:
        return (self.meta, self.tensors, self.prev_meta, self.prev_tensors, self.legacy)


def checkpoint_files(run_dir: str | Path, name: str = "model") -> CheckpointFiles:
    """The checkpoint files :func:`train_model` uses for ``run_dir`` and ``name``."""
    return CheckpointFiles(Path(run_dir) / "checkpoints", name)


def remove_checkpoint(run_dir: str | Path, name: str = "model") -> None:
    """Delete every file of checkpoint ``name`` under ``run_dir`` (including an old pickle ``.pt``)."""
    for f in checkpoint_files(run_dir, name).all():
        f.unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares memory with nothing (safetensors refuses shared tensors)."""
    return t.detach().to("cpu", copy=True).contiguous()


def _numpy_key_tensor(key: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(key, dtype="<u4").view(np.uint8).copy())


def _checkpoint_payload(model: nn.Module, opt: torch.optim.Optimizer, step: int, result: TrainResult,
                        best_state: dict[str, torch.Tensor] | None, bad_vals: int, cfg: TrainConfig,
                        finished: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for the safetensors file, JSON-able record) of the training state."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in (("model/", model.state_dict()), ("best/", best_state or {})):
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{cfg.desc}: state entry '{k}' is a {type(v).__name__}, not a tensor; cannot checkpoint it")
            tensors[prefix + k] = _cpu(v)
    osd = opt.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    opt_keys: dict[str, list[str]] = {}
    for idx, st in osd["state"].items():
        opt_keys[str(idx)] = list(st)
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = _cpu(v)
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    tensors["rng/torch"] = _cpu(torch.get_rng_state())
    n_cuda = 0
    if torch.cuda.is_available():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = _cpu(t)
            n_cuda += 1
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG some libraries use
    tensors["rng/numpy_key"] = _numpy_key_tensor(np_state[1])
    py_state = random.getstate()
    meta: dict[str, Any] = {
        "format": CKPT_FORMAT,
        "name": cfg.desc,
        "step": int(step),
        "finished": bool(finished),
        "stopped_early": bool(result.stopped_early),
        "best_val": result.best_val,
        "best_step": result.best_step,
        "has_best": best_state is not None,
        "bad_vals": int(bad_vals),
        "history": result.history,
        "config": asdict(cfg),
        "optimizer": {"param_groups": osd["param_groups"], "state_keys": opt_keys, "scalars": opt_scalars},
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": {"bit_generator": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "cuda_devices": n_cuda,
        },
    }
    return tensors, meta


def _save_ckpt(files: CheckpointFiles, model: nn.Module, opt: torch.optim.Optimizer, step: int, result: TrainResult,
               best_state: dict[str, torch.Tensor] | None, bad_vals: int, cfg: TrainConfig, finished: bool) -> None:
    """Write the checkpoint: tensor file, then the JSON record (the commit, holding the tensor file's sha256).

    While the new pair is written the committed one is kept as ``<name>.prev.*``, so that a kill at any point
    leaves one complete pair (:func:`_read_checkpoint` matches records and tensor files by hash).
    """
    if not ddp.is_main_process():
        return
    from safetensors.torch import save as st_save

    tensors, meta = _checkpoint_payload(model, opt, step, result, best_state, bad_vals, cfg, finished)
    data = st_save(tensors)
    meta["tensors"] = {"file": files.tensors.name, "sha256": _sha256(data), "bytes": len(data)}
    text = json.dumps(meta, indent=None)
    files.folder.mkdir(parents=True, exist_ok=True)
    if files.meta.exists():  # the committed pair becomes the fallback (tensor file first: see the docstring)
        if files.tensors.exists():
            os.replace(files.tensors, files.prev_tensors)
        os.replace(files.meta, files.prev_meta)
    atomic_write_bytes(files.tensors, data)
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))
    atomic_write_text(files.meta, text)
    files.prev_meta.unlink(missing_ok=True)
    files.prev_tensors.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path} is not a JSON checkpoint record ({type(e).__name__}: {e})") from e
    sha = meta.get("tensors", {}).get("sha256") if isinstance(meta, dict) and isinstance(meta.get("tensors"), dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT or not isinstance(sha, str):
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a checkpoint record of format {CKPT_FORMAT} (format {fmt!r})")
    return meta


def _read_checkpoint(files: CheckpointFiles) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest complete checkpoint as (record with its ``tensors`` loaded, problems met on the way).

    Records are tried newest first; each is paired with whichever tensor file has the sha256 it records. Never
    unpickles anything: a ``.pt`` file is only reported.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    problems: list[str] = []
    if files.legacy.exists():
        problems.append(f"{files.legacy} is a pickle checkpoint of an older version: ignored, never loaded (unpickling "
                        "can run arbitrary code); delete it")
    blobs: dict[Path, bytes | None] = {}

    def blob(p: Path) -> bytes | None:
        if p not in blobs:
            try:
                blobs[p] = p.read_bytes() if p.is_file() else None
            except OSError:
                blobs[p] = None
        return blobs[p]

    metas = [m for m in (files.meta, files.prev_meta) if m.exists()]
    if not files.meta.exists() and files.tensors.exists():
        problems.append(f"{files.tensors} has no JSON record {files.meta.name} (a write was interrupted): torn checkpoint")
    for mpath in metas:
        try:
            meta = _read_meta(mpath)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        want = meta["tensors"]["sha256"]
        recorded = files.folder / Path(str(meta["tensors"].get("file", ""))).name
        cands = [c for c in dict.fromkeys((recorded, files.tensors, files.prev_tensors)) if c.parent == files.folder]
        for c in cands:
            data = blob(c)
            if data is None or _sha256(data) != want:
                continue
            try:
                meta["tensors"] = st_load(data)
            except (SafetensorError, ValueError) as e:
                raise CheckpointError(f"checkpoint {c} is unreadable ({type(e).__name__}: {e}); delete it to start afresh") from e
            meta["source"] = str(mpath)
            return meta, problems
        problems.append(f"{mpath}: no tensor file with the recorded sha256 {want[:12]}… (torn or altered checkpoint)")
    return None, problems


def _restore_rng(state: dict[str, Any]) -> None:
    rng, tensors = state["rng"], state["rng_tensors"]
    torch.set_rng_state(tensors["rng/torch"])
    v, internal, gauss = rng["python"]
    random.setstate((int(v), tuple(int(x) for x in internal), gauss))
    npst = rng["numpy"]
    key = tensors["rng/numpy_key"].numpy().view("<u4").astype(np.uint32)
    np.random.set_state((npst["bit_generator"], key, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))  # noqa: NPY002
    n = int(rng.get("cuda_devices", 0))
    if n and torch.cuda.is_available() and n == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(n)])


def _unflatten(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The checkpoint as a dict: model/best state dicts and the optimizer state dict rebuilt from flat keys."""
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} if meta.get("has_best") else None
    o = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for idx, keys in o["state_keys"].items():
        scal = o["scalars"].get(idx, {})
        st = {}
        for k in keys:
            tk = f"optim/{idx}/{k}"
            if tk in tensors:
                st[k] = tensors[tk]
            elif k in scal:
                st[k] = scal[k]
            else:
                raise CheckpointError(f"checkpoint {meta.get('source')} is inconsistent: optimizer state '{tk}' is missing")
        state[int(idx)] = st
    groups = []
    for g in o["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    out = {k: v for k, v in meta.items() if k not in ("tensors", "optimizer")}
    out.update({"model": model, "best_state": best, "optimizer": {"state": state, "param_groups": groups},
                "rng_tensors": {k: v for k, v in tensors.items() if k.startswith("rng/")}})
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train_model`: ``<name>.json`` (or ``.safetensors``, or the bare stem).

    Returns ``step``, ``model`` and ``best_state`` (state dicts), ``optimizer`` (a state dict), ``history``,
    ``best_val``/``best_step``, ``finished``, ``config`` ... Falls back to the previous pair when the newest is
    torn. A pickle (``.pt``) is refused, never loaded. Raises :class:`CheckpointError` when nothing is usable.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".pkl", ".pickle"):
        raise CheckpointError(f"{path} is a pickle checkpoint; these are never loaded (unpickling can run code)")
    name = path.name
    for suf in (".json", ".safetensors"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(".prev"):
        name = name[: -len(".prev")]
    meta, problems = _read_checkpoint(CheckpointFiles(path.parent, name))
    if meta is None:
        why = "; ".join(problems) or "no checkpoint there"
        raise CheckpointError(f"checkpoint {path} is unreadable ({why}); delete it to start afresh")
    out = _unflatten(meta, meta["tensors"])
    if str(map_location) != "cpu":
        out["model"] = {k: v.to(map_location) for k, v in out["model"].items()}
    return out


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped module (``model.encoder`` keeps working).

    Gradients are only averaged for computations that go through ``model(...)`` (DDP's forward); a loss that
    calls sub-modules directly must use ``TrainConfig.ddp_sync="allreduce"``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (during __init__): no recursion
                raise
            return getattr(self.module, name)


def _allreduce_grads(params: list[nn.Parameter]) -> None:
    import torch.distributed as dist

    ws = ddp.get_world_size()
    for p in params:
        if p.grad is None:  # keep ranks in step: a missing grad counts as zeros
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(ws)


def train_model(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
    batch_fn: Callable[[int], Any],
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    name: str = "model",
    resume: bool = True,
    params: Iterable[nn.Parameter] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps.

    loss_fn(model, batch) -> loss or (loss, logs); batch_fn(step) -> batch (deterministic in step).
    val_fn(model) -> a validation quantity that uses **no real anomaly label** (used for early stopping and
    for keeping the best weights). With ``run_dir``, checkpoints go to ``run_dir/checkpoints/<name>.{safetensors,json}``
    (see the module docstring), every ``cfg.checkpoint_every`` steps, at the end and on SIGINT/SIGTERM; with ``resume`` an
    existing checkpoint is continued (a finished one is simply loaded). At the end the best-validation weights
    (if any) are loaded into ``model``, which is left in eval mode on the training device.

    Under ``torchrun`` (an initialised process group) training is data-parallel; see
    :mod:`medanomaly.training.ddp` for how the batch is split. ``loss_fn`` then receives the DDP-wrapped model.
    """
    device = get_device(cfg.device)
    rank, world = ddp.get_rank(), ddp.get_world_size()
    distributed = ddp.is_distributed()
    prev_threads = torch.get_num_threads()
    threads = resolve_threads(cfg.threads, int(getattr(batch_fn, "num_workers", 0) or 0))
    if distributed and cfg.threads == "auto" and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, threads // ddp.get_world_size())  # processes of one machine share its cores
    torch.set_num_threads(threads)
    model.to(device)
    param_list = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not param_list:
        raise ValueError(f"{cfg.desc}: the model has no trainable parameters")
    opt = make_adamw(param_list, cfg)
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    bad_vals = 0
    start = 0
    finished = False
    files = checkpoint_files(run_dir, name) if run_dir is not None else None
    if files is not None and ddp.is_main_process():
        clean_stale_tmp(files.folder)  # left by a process killed while writing
    state = None
    if files is not None and resume:
        meta, problems = _read_checkpoint(files)
        if problems and ddp.is_main_process():
            what = f"resuming from {meta['source']} (step {meta['step']})" if meta is not None else "starting afresh"
            warnings.warn(f"{cfg.desc}: {'; '.join(problems)}; {what}", stacklevel=2)
        if meta is not None:
            try:
                state = _unflatten(meta, meta.pop("tensors"))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"checkpoint {meta.get('source')} is inconsistent ({type(e).__name__}: {e}); "
                                      "delete it to start afresh") from e
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {files.meta} does not fit this model ({e}); use another run folder or "
                                  "resume=False") from e
        old = state.get("config", {})
        changed = [k for k in _RESUME_KEYS if k in old and old[k] != getattr(cfg, k)]
        if changed and ddp.is_main_process():
            warnings.warn(f"{cfg.desc}: resuming {files.meta} with changed training settings {changed}; the result will "
                          "differ from an uninterrupted run", stacklevel=2)
        try:
            start = int(state["step"])
            result.history = list(state["history"])
            result.best_val, result.best_step = state["best_val"], state["best_step"]
            best_state = state["best_state"]
            bad_vals = int(state.get("bad_vals", 0))
            result.stopped_early = bool(state.get("stopped_early", False))
            finished = bool(state.get("finished", False)) or result.stopped_early
            _restore_rng(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {state.get('source')} is inconsistent ({type(e).__name__}: {e}); delete it "
                                  "to start afresh") from e
        result.resumed_from = start
        del state
    else:
        seed_everything(int(cfg.seed) + rank)

    train_net: nn.Module = model
    if distributed:
        if cfg.ddp_sync == "ddp":
            kw: dict[str, Any] = {}
            if device.type == "cuda":
                kw["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
            train_net = _DDP(model, **kw)
        else:  # same starting weights on every rank
            import torch.distributed as dist

            with torch.no_grad():
                for t in model.state_dict().values():
                    dist.broadcast(t, src=0)

    interrupted = {"flag": False}

    def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        interrupted["flag"] = True

    old_handlers: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # signals only in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, _on_signal)

    prev_det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False

    total = 0 if finished else cfg.steps
    bar = _progress(total, min(start, total), cfg.desc, cfg.quiet or not ddp.is_main_process())
    t0 = time.perf_counter()
    step = start
    try:
        train_net.train()
        while step < cfg.steps and not finished:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg)
            batch = batch_fn(step)
            if distributed:
                batch = ddp.shard_batch(batch, rank, world)
            with autocast(device, cfg.amp):
                out = loss_fn(train_net, batch)
            loss, logs = (out if isinstance(out, tuple) else (out, {}))
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(f"{cfg.desc}: loss_fn must return a scalar tensor (or (loss, logs)), got {type(loss).__name__}")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.desc}: loss became {loss.item()} at step {step}; lower lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if distributed and cfg.ddp_sync == "allreduce":
                _allreduce_grads(param_list)
            grad_norm = None
            if cfg.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(param_list, cfg.grad_clip))
            opt.step()
            step += 1
            loss_v = float(loss.detach())
            if distributed:  # average the loss for the log and agree on an interrupt
                loss_v, flag = ddp.all_reduce_mean([loss_v, float(interrupted["flag"])])
                interrupted["flag"] = flag > 0
            rec: dict[str, Any] = {"step": step, "loss": loss_v, "lr": opt.param_groups[0]["lr"],
                                   **{k: float(v) for k, v in logs.items()}}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if val_fn is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                v: float | None = None
                if ddp.is_main_process():
                    model.eval()
                    with torch.no_grad(), autocast(device, cfg.amp):
                        v = float(val_fn(model))
                    train_net.train()
                v = ddp.broadcast_float(v)
                if v is None or not math.isfinite(v):
                    raise FloatingPointError(f"{cfg.desc}: validation quantity is {v} at step {step}")
                rec["val"] = v
                better = result.best_val is None or (v < result.best_val if cfg.val_mode == "min" else v > result.best_val)
                if better:
                    result.best_val, result.best_step = v, step
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                    bad_vals = 0
                else:
                    bad_vals += 1
                rec["best_val"] = result.best_val
            elapsed = time.perf_counter() - t0
            rec["seconds"] = elapsed
            result.history.append(rec)
            bar.set_postfix(loss=f"{loss_v:.4g}", it_s=f"{(step - start) / max(elapsed, 1e-9):.2f}")
            bar.update(1)
            if cfg.early_stopping_patience and bad_vals >= cfg.early_stopping_patience:
                result.stopped_early = True
                break
            if files is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_ckpt(files, model, opt, step, result, best_state, bad_vals, cfg, finished=False)
            if interrupted["flag"]:
                if files is not None:
                    _save_ckpt(files, model, opt, step, result, best_state, bad_vals, cfg, finished=False)
                raise KeyboardInterrupt(
                    f"{cfg.desc}: interrupted at step {step}"
                    + ("; checkpoint saved, resume to continue" if files is not None else " (no run folder: nothing saved)")
                )
    finally:
        bar.close()
        torch.set_num_threads(prev_threads)
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(prev_det)
    result.steps_done = step
    result.seconds = time.perf_counter() - t0
    result.threads = threads
    if files is not None and not finished:
        _save_ckpt(files, model, opt, step, result, best_state, bad_vals, cfg, finished=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    ddp.barrier()
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
