"""MTMLW on LGG FLAIR 2D (size 64): train (cpu-small, T tasks, capped members), evaluate per member and ensemble.

Usage: OMP_NUM_THREADS=1 python benchmarks/multitask_lgg.py T MAX_MODELS OUT [JSON_OVERRIDES]
"""

import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from medanomaly.data import load_dataset, stack_dataset
from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import RunContext
from medanomaly.methods.multitask import MultiTaskDetector

torch.set_num_threads(1)

T, max_models, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
train = load_dataset("lgg-flair-2d", "train", normal_only=True, size=64, quiet=True)
test = load_dataset("lgg-flair-2d", "test", size=64, quiet=True)
print(f"train {len(train)} healthy slices, test {len(test)} slices", flush=True)
params = {**MultiTaskDetector.config_set("cpu-small"), **extra}
det = MultiTaskDetector(**params)
det.params["tasks"]["train_count"] = T
det.params["max_models"] = max_models
t1 = time.time()
det.fit(train, context=RunContext(work_dir=out / "work", resume=True, quiet=True))
fit_s = time.time() - t1
det.save(out / "run")
print(f"fit {fit_s:.0f}s", flush=True)
b = stack_dataset(test)
x, fg, masks, labels, cases = b["image"], b["foreground"], b["mask"], b["label"].numpy(), b["case_id"]
det.params["predict"]["member_maps"] = True
t1 = time.time()
r = det.predict(x, fg)
pred_s = time.time() - t1
res = {
    "T": T,
    "n_members": len(det.models),
    "fit_seconds": fit_s,
    "predict_seconds": pred_s,
    "n_test": len(test),
    "n_test_abnormal": int((labels == 1).sum()),
    "params": det.params,
    "members": [],
}


def evaluate(maps):
    maps = maps * fg[:, 0]
    img = image_scores(maps, fg, **det.params["image_score"])  # the method's own rule
    pm = pixel_metrics(maps, masks, fg, case_ids=cases)
    sm = sample_metrics(img, labels)
    return {
        "slice_ap": sm["ap"],
        "slice_auroc": sm["auroc"],
        "pixel_ap": pm["ap"],
        "pixel_auroc": pm["auroc"],
        "best_dice": pm["best_dice"],
        "dice_per_case_mean": pm["dice_per_case_mean"],
    }


for i, info in enumerate(det.member_info):
    m = evaluate(r.extras["member_maps"][i])
    res["members"].append(
        {
            **{
                k: info[k]
                for k in (
                    "name",
                    "train_task_names",
                    "val_task_names",
                    "synthetic_val_loss",
                    "synthetic_val_ap",
                    "best_step",
                    "steps_done",
                    "stopped_early",
                    "train_seconds_this_session",
                    "val_seconds",
                    "data_wait_seconds",
                    "train_samples_per_s",
                    "data_wait_fraction",
                )
            },
            **m,
        }
    )
    print(res["members"][-1], flush=True)
res["ensemble"] = evaluate(r.pixel_scores)
res["intensity_baseline"] = evaluate(x[:, 0].clone())
print("ensemble", res["ensemble"], "\nintensity", res["intensity_baseline"], flush=True)
if len(res["members"]) >= 3:
    for real in ("pixel_ap", "slice_ap", "best_dice"):
        a = spearmanr([-m["synthetic_val_loss"] for m in res["members"]], [m[real] for m in res["members"]])
        b2 = spearmanr([m["synthetic_val_ap"] for m in res["members"]], [m[real] for m in res["members"]])
        res[f"spearman_negvalloss_vs_{real}"] = float(a.statistic)
        res[f"spearman_valap_vs_{real}"] = float(b2.statistic)
res["total_seconds"] = time.time() - t0
(out / "results.json").write_text(json.dumps(res, indent=1, default=str))
print(json.dumps({k: v for k, v in res.items() if k.startswith("spearman")}), f"total {res['total_seconds']:.0f}s", flush=True)
