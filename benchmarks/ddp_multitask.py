"""Data-parallel training of the multitask U-Net: ``torchrun`` processes against one process, same global batch.

The real training step of the ``multitask`` method (its synthesis ``batch_fn``, U-Net and loss, through
:func:`medanomaly.training.train_model`, intercepted as in benchmarks/throughput.py to run ``--steps`` timed steps
after ``--warm`` untimed ones) on generated 2D brain-like images. Under ``torchrun`` every rank builds the same global
batch and keeps its slice (see :mod:`medanomaly.training.ddp`); gradients are averaged by DDP; with ``threads="auto"``
each of the N processes on one machine gets cores/N intra-op threads. Rank 0 prints one JSON line.

CPU, this machine (2 cores; gloo)::

    python benchmarks/ddp_multitask.py --steps 10                                   # 1 process, 2 threads
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/ddp_multitask.py --steps 10

GPU cluster node (NCCL, one process per GPU, bf16 autocast by the loop)::

    torchrun --standalone --nproc_per_node=4 benchmarks/ddp_multitask.py --device cuda --config paper --size 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: the loop's auto)")
    args = ap.parse_args()

    import throughput
    from medanomaly.data.toy import make_toy_dataset
    from medanomaly.methods import get_method_class
    from medanomaly.methods.base import RunContext
    from medanomaly.training.ddp import distributed, get_rank, get_world_size

    backend = "nccl" if args.device == "cuda" else "gloo"
    with distributed(backend=backend):
        ns = argparse.Namespace(steps=args.steps, warm=args.warm, threads=args.threads, channels_last=False, bf16=False,
                                compile=False)
        stages: list[dict] = []
        throughput.install_capture(ns, stages)
        cls = get_method_class("multitask")
        params = cls.config_set(args.config)
        params["max_models"] = 1
        params["train"] = {**params["train"], "device": args.device,
                           **({"batch_size": args.batch} if args.batch else {})}
        det = cls(**params)
        t0 = time.perf_counter()
        det.fit(make_toy_dataset(n=20, size=args.size, seed=0), context=RunContext(quiet=True))
        wall = time.perf_counter() - t0
        if get_rank() == 0:
            s = stages[0]
            print(json.dumps({"processes": get_world_size(), "threads_per_process": s["threads"],
                              "global_batch": s["batch"], "step_s": s["step_s"], "samples_per_s": s["samples_per_s"],
                              "data_wait_fraction": s["data_wait_fraction"], "fit_wall_s": wall, "load": s["load"],
                              "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
