"""DDP on CPU: 2 processes with the gloo backend, launched by torchrun (``python -m torch.distributed.run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medanomaly.training import TrainConfig, load_checkpoint, train_model
from medanomaly.training.ddp import is_distributed, shard_batch, shard_indices

torch.set_num_threads(1)

_COMMON = textwrap.dedent(
    """
    import numpy as np, torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    W = np.linspace(-1, 1, 8).astype(np.float32)

    def batch_fn(step):  # the same global batch on every rank; each rank keeps its slice
        rng = np.random.default_rng([0, step])
        x = rng.standard_normal((16, 8)).astype(np.float32)
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(np.tanh(x @ W)[:, None]), "ids": [str(i) for i in range(16)]}

    def loss_fn(m, b):
        assert len(b["ids"]) == b["x"].shape[0]
        return ((m(b["x"]) - b["y"]) ** 2).mean()

    def loss_fn_submodules(m, b):  # bypasses DDP's forward: needs ddp_sync="allreduce"
        h = torch.tanh(m[0](b["x"]))
        return ((m[2](h) - b["y"]) ** 2).mean()
    """
)

_SCRIPT = _COMMON + textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    from medanomaly.training import TrainConfig, train_model
    from medanomaly.training.ddp import distributed, get_rank, get_world_size, is_distributed

    out = sys.argv[1]
    with distributed(backend="gloo") as device:
        assert is_distributed() and get_world_size() == 2
        rank = get_rank()
        for mode, lf in (("ddp", loss_fn), ("allreduce", loss_fn_submodules)):
            model = make_model()
            if rank == 1:  # different initial weights on rank 1: DDP/broadcast must make them equal
                with torch.no_grad():
                    model[0].weight.add_(1.0)
            cfg = TrainConfig(steps=25, lr=2e-2, warmup_steps=2, val_every=5, checkpoint_every=10, quiet=True, device="cpu",
                              ddp_sync=mode)
            xv = batch_fn(999)
            res = train_model(model, lf, batch_fn, cfg, run_dir=os.path.join(out, mode), val_fn=lambda m: float(loss_fn(m, xv)))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"{mode}_rank{rank}.st"))
            with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
                json.dump([r["loss"] for r in res.history], f)
    """
)


def test_shard_helpers() -> None:
    assert [list(shard_indices(7, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    b = {"x": torch.arange(6).reshape(6, 1), "ids": list("abcdef"), "scale": 2.0, "other": torch.zeros(3)}
    s1 = shard_batch(b, 1, 2)
    assert s1["x"].flatten().tolist() == [3, 4, 5] and s1["ids"] == ["d", "e", "f"] and s1["scale"] == 2.0
    assert s1["other"].shape == (3,)
    assert shard_batch((torch.ones(4), torch.zeros(4)), 0, 2)[1].shape == (2,)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_batch({"x": torch.ones(1, 2)}, 0, 2)
    assert not is_distributed()


def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDANOMALY_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    ns: dict = {}
    exec(_COMMON, ns)  # the same model/data in this process, trained without DDP on the full global batch
    single = ns["make_model"]()
    cfg = TrainConfig(steps=25, lr=2e-2, warmup_steps=2, val_every=0, quiet=True, device="cpu")
    train_model(single, ns["loss_fn"], ns["batch_fn"], cfg)
    for mode in ("ddp", "allreduce"):
        w0, w1 = load_file(str(tmp_path / f"{mode}_rank0.st")), load_file(str(tmp_path / f"{mode}_rank1.st"))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"{mode}: ranks ended with different weights"
        losses = json.loads((tmp_path / f"{mode}_rank0.json").read_text())
        assert len(losses) == 25 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
        assert (tmp_path / mode / "checkpoints" / "model.json").exists()
        if mode == "ddp":  # two halves of the global batch with averaged gradients == the global batch
            last = load_checkpoint(tmp_path / mode / "checkpoints" / "model.json")["model"]
            for k, v in single.state_dict().items():
                torch.testing.assert_close(last[k], v, rtol=1e-4, atol=1e-5)


def test_allreduce_mode_without_process_group_is_plain_training() -> None:
    model = nn.Linear(4, 1)
    res = train_model(model, lambda m, b: (m(b) ** 2).mean(), lambda s: torch.ones(2, 4),
                      TrainConfig(steps=3, quiet=True, device="cpu", ddp_sync="allreduce"))
    assert res.steps_done == 3
