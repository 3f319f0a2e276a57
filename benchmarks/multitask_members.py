"""Score every member of a finished ``multitask`` run on a test split, next to its synthetic validation score.

Writes a ``results.json`` that ``benchmarks/multitask_correlation.py`` reads (one record per member: tasks,
synthetic validation AP/loss, real test pixel AP/AUROC/best DICE, slice AUROC) plus the ensemble. The lesion masks
are read here only, after training; no member or setting is chosen from them.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/multitask_members.py RUN_DIR DATA OUT.json [--split test] [--batch 16]

e.g. ``RUN_DIR=bench/runs/multitask-t2x5 DATA=lgg-flair-2d`` or ``DATA=brats2018-3d:modality=t1`` for a run trained
on ``ixi-t1-3d``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medanomaly.methods.base import RunContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)

    from medanomaly.app.datasets import open_dataset
    from medanomaly.app.predict import load_run
    from medanomaly.data.dataset import stack_dataset
    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
    from medanomaly.evaluation.scoring import image_scores

    det, cfg = load_run(a.run, expect_method="multitask")
    det.set_context(RunContext(quiet=True))
    det.params["predict"]["member_maps"] = True
    ds = open_dataset(a.data, a.split, preset_config=(cfg.get("data") or {}).get("preset_config"))
    b = stack_dataset(ds)
    x, fg, masks, labels, cases = b["image"], b["foreground"], b["mask"], b["label"], list(b["case_id"])
    maps, members = [], []
    with torch.no_grad():
        for i in range(0, len(x), a.batch):
            r = det.predict(x[i : i + a.batch], fg[i : i + a.batch])
            maps.append(r.pixel_scores)
            members.append(r.extras["member_maps"])
    ens, mem = torch.cat(maps), torch.cat(members, dim=1)

    def score(m: torch.Tensor) -> dict[str, float]:
        pm = pixel_metrics(m, masks[:, 0], fg[:, 0], case_ids=cases)
        out = {"pixel_ap": pm["ap"], "pixel_auroc": pm["auroc"], "best_dice": pm["best_dice"],
               "pixel_ap_per_case_mean": pm.get("ap_per_case_mean")}
        lab = labels.numpy()
        if len(set(lab.tolist())) == 2:
            top = image_scores(m, fg, **det.params["image_score"])  # the method's own rule
            out["slice_auroc"] = sample_metrics(top, lab)["auroc"]
        return out

    res = {"run": str(a.run), "data": a.data, "split": a.split, "n_images": len(x), "members": [], "ensemble": score(ens)}
    for info, m in zip(det.member_info, mem, strict=True):
        rec = {k: info.get(k) for k in ("name", "train_task_names", "val_task_names", "synthetic_val_ap",
                                        "synthetic_val_loss", "best_step", "steps_done")}
        rec.update(score(m))
        res["members"].append(rec)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    print("ensemble", json.dumps(res["ensemble"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))


if __name__ == "__main__":
    main()
