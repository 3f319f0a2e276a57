"""Multi-GPU / multi-node training with PyTorch's own DDP, launched by ``torchrun``.

Nothing here starts processes: launch any training script with ``torchrun`` (or
``python -m torch.distributed.run``), e.g. on one machine with 4 GPUs::

    torchrun --standalone --nproc_per_node=4 train_script.py

or on CPU (gloo backend) with 2 processes::

    python -m torch.distributed.run --standalone --nproc_per_node=2 train_script.py

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`setup_distributed` reads them and joins the
process group (NCCL on CUDA, gloo on CPU). :func:`medanomaly.training.train_model` then notices the process group
and trains data-parallel:

- the model is wrapped in :class:`torch.nn.parallel.DistributedDataParallel` (rank 0's initial weights are
  broadcast to every rank, gradients are averaged during ``backward``);
- **data split:** every rank calls ``batch_fn(step)`` (deterministic in the step, so all ranks build the same
  *global* batch) and keeps its own contiguous slice along the first axis (:func:`shard_batch`). The global
  batch size therefore stays what the configuration says, whatever the number of processes;
- the validation quantity is computed on rank 0 and broadcast, so every rank takes the same early-stopping
  decision; an interrupt (SIGINT/SIGTERM on any rank) is agreed on by all ranks at the end of the step;
- only rank 0 writes checkpoints, logs and progress bars; every rank reads the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "setup_distributed",
    "cleanup_distributed",
    "distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "barrier",
    "broadcast_float",
    "all_reduce_mean",
    "shard_batch",
    "shard_indices",
    "print0",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_by_torchrun() -> bool:
    """True when the environment variables of ``torchrun`` are present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes files and shows progress."""
    return get_rank() == 0


def setup_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` prepared and return this process's device.

    Without ``torchrun``'s environment this does nothing and returns the default device (CUDA if present).
    ``backend``: None picks NCCL when CUDA is available, gloo otherwise.
    """
    if not launched_by_torchrun():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        n = torch.cuda.device_count()
        local = get_local_rank()
        if local >= n:
            raise RuntimeError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible; use --nproc_per_node<={n}")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return device


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(backend: str | None = None) -> Iterator[torch.device]:
    """``with distributed() as device:`` setup and guaranteed cleanup."""
    device = setup_distributed(backend)
    try:
        yield device
    finally:
        cleanup_distributed()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_float(value: float | None, src: int = 0) -> float | None:
    """Send rank ``src``'s float (None allowed) to every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([0.0 if value is None else float(value), 1.0 if value is None else 0.0],
                     dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=src)
    return None if t[1].item() else float(t[0].item())


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Average a few floats over all ranks (one collective call)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / get_world_size()).tolist()


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Maximum of a few floats over all ranks (used to agree on flags)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Contiguous share of ``range(n)`` for this rank (sizes differ by at most one); for sharded prediction."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_batch(batch: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's contiguous slice of a global batch.

    Tensors/arrays and lists whose first axis has the batch length are sliced; other values (scalars, strings,
    tensors of another length) are kept. The batch length is the first axis of the first tensor found.
    """
    world_size = get_world_size() if world_size is None else world_size
    if world_size == 1:
        return batch
    n = _batch_len(batch)
    if n is None:
        raise ValueError("shard_batch: the batch holds no tensor to split between ranks")
    if n < world_size:
        raise ValueError(f"global batch of {n} cannot be split over {world_size} processes; raise batch_size")
    idx = shard_indices(n, rank, world_size)
    return _slice(batch, n, idx.start, idx.stop)


def _batch_len(b: Any) -> int | None:
    if hasattr(b, "shape") and len(getattr(b, "shape", ())) > 0:
        return int(b.shape[0])
    if isinstance(b, dict):
        for v in b.values():
            n = _batch_len(v)
            if n is not None:
                return n
    if isinstance(b, list | tuple):
        for v in b:
            if hasattr(v, "shape"):
                return _batch_len(v)
    return None


def _slice(b: Any, n: int, lo: int, hi: int) -> Any:
    if hasattr(b, "shape") and len(getattr(b, "shape", ())) > 0:
        return b[lo:hi] if b.shape[0] == n else b
    if isinstance(b, dict):
        return {k: _slice(v, n, lo, hi) for k, v in b.items()}
    if isinstance(b, tuple):
        return tuple(_slice(v, n, lo, hi) for v in b)
    if isinstance(b, list):
        if len(b) == n and not any(hasattr(v, "shape") and len(getattr(v, "shape", ())) > 0 for v in b):
            return b[lo:hi]
        return [_slice(v, n, lo, hi) for v in b]
    return b


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)
