"""Cache lgg-flair-2d (size 64) and pneumoniamnist (size 32) as tensors for benchmarks/mae_family.py.

Usage: OMP_NUM_THREADS=1 MAE_CACHE=/tmp/mae_exp python benchmarks/mae_family_cache.py
"""

import os
from pathlib import Path

import torch

from medanomaly.data.samples import load_dataset

torch.set_num_threads(1)
C = Path(os.environ.get("MAE_CACHE", "/tmp/mae_exp"))
C.mkdir(parents=True, exist_ok=True)


def dump(ds, path):
    n = len(ds)
    s = [ds[i] for i in range(n)]
    out = {k: torch.stack([x[k] for x in s]) for k in ("image", "foreground", "mask")}
    out["label"] = torch.tensor([int(x["label"]) for x in s])
    out["case_id"] = [x["case_id"] for x in s]
    out["slice_index"] = [int(x["slice_index"]) for x in s]
    torch.save(out, path)
    print(path, n, int((out["label"] == 1).sum()))


for split, normal in [("train", True), ("val", True), ("train", False), ("test", False)]:
    dump(
        load_dataset("lgg-flair-2d", split, normal_only=normal, size=64), C / f"lgg64_{split}{'_normal' if normal else '_all'}.pt"
    )
for split in ("train", "train-pneumonia", "val", "test"):
    dump(load_dataset("pneumoniamnist", split, size=32), C / f"pmn32_{split}.pt")
