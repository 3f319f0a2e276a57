"""One MAE-family experiment: fit on cached real data, evaluate on test, write metrics.json.

python benchmarks/mae_family.py --data lgg --method mae --out runs/lgg_mae
python benchmarks/mae_family.py --data lgg --method amae --pretrained runs/lgg_mae --pool all-train --out runs/lgg_amae
python benchmarks/mae_family.py --data pmn --method amae --pretrained runs/pmn_mae --pool 0.4 --out runs/pmn_amae_40
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from medanomaly.data import ArrayDataset
from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
from medanomaly.methods import get_method, get_method_class

torch.set_num_threads(1)
C = os.environ.get("MAE_CACHE", "/tmp/mae_exp")  # written by benchmarks/mae_family_cache.py


def ds_from(d, idx=None):
    idx = np.arange(len(d["label"])) if idx is None else np.asarray(idx)
    t = torch.as_tensor(idx)
    return ArrayDataset(
        d["image"][t],
        d["foreground"][t],
        d["mask"][t],
        d["label"][t].numpy(),
        [d["case_id"][i] for i in idx],
        [d["slice_index"][i] for i in idx],
    )


ap = argparse.ArgumentParser()
ap.add_argument("--data", choices=["lgg", "pmn"], required=True)
ap.add_argument("--method", required=True)
ap.add_argument("--pretrained", default=None)
ap.add_argument("--pool", default=None, help="lgg: all-train; pmn: anomaly ratio in [0,1]")
ap.add_argument("--out", required=True)
ap.add_argument("--set", nargs="*", default=[], help="key=yamlvalue overrides (dotted keys)")
ap.add_argument("--eval-run", default=None, help="only evaluate this saved run folder")
a = ap.parse_args()

params = get_method_class(a.method).config_set("cpu-small")
if a.data == "pmn" and "mae" in params:
    params["mae"] = {**params["mae"], "img_size": 32, "patch_size": 4}
    if a.method == "amae":
        params.setdefault("stage1", {})["anatomy"] = "cxr"
    if a.method == "mae-pseudo":
        params["classifier"] = {**params["classifier"], "patch_size": 4}
if a.pretrained:
    params["pretrained"] = a.pretrained
for kv in a.set:
    k, v = kv.split("=", 1)
    params[k] = yaml.safe_load(v)
det = get_method(a.method, **params)
det.quiet = True
out = Path(a.out)
det.work_dir = out / "work"
unlabeled = None
if a.data == "lgg":
    train, val = ds_from(torch.load(f"{C}/lgg64_train_normal.pt")), ds_from(torch.load(f"{C}/lgg64_val_normal.pt"))
    test = torch.load(f"{C}/lgg64_test_all.pt")
    if a.pool == "all-train":
        unlabeled = ds_from(torch.load(f"{C}/lgg64_train_all.pt"))
else:
    tr = torch.load(f"{C}/pmn32_train.pt")
    perm = np.random.default_rng(0).permutation(len(tr["label"]))
    n_half = len(perm) // 2
    normal_idx, held = np.sort(perm[:n_half]), perm[n_half:]
    vsplit = int(0.9 * len(normal_idx))
    train, val = ds_from(tr, normal_idx[:vsplit]), ds_from(tr, normal_idx[vsplit:])
    test = torch.load(f"{C}/pmn32_test.pt")
    if a.pool is not None:
        r, m = float(a.pool), 600
        n_abn = int(round(r * m))
        pn = torch.load(f"{C}/pmn32_train-pneumonia.pt")
        ia = np.random.default_rng(1).permutation(len(pn["label"]))[:n_abn]
        imgs = torch.cat([tr["image"][torch.as_tensor(held[: m - n_abn])], pn["image"][torch.as_tensor(ia)]])
        unlabeled = ArrayDataset(imgs, labels=None)  # labels are not given to the method at all
t0 = time.time()
if a.eval_run:
    from medanomaly.methods import load_detector

    det = load_detector(a.eval_run)
    out.mkdir(parents=True, exist_ok=True)
elif a.method == "amae":
    det.fit(train, val, unlabeled=unlabeled)
else:
    det.fit(train, val)
fit_s = time.time() - t0
if not a.eval_run:
    det.save(out / "run")
t0 = time.time()
res = {"fit_s": round(fit_s, 1), "params": params, "pool": a.pool}
maps, scores, extra_scores, resid = [], [], [], []
x, fg = test["image"], test["foreground"]
for i in range(0, len(x), 64):
    r = det.predict(x[i : i + 64], fg[i : i + 64])
    maps.append(r.pixel_scores)
    scores.append(r.image_scores)
    if "stage1_scores" in r.extras:
        extra_scores.append(r.extras["stage1_scores"])
    if "residuals" in r.extras:
        resid.append(r.extras["residuals"] * fg[i : i + 64, 0])
res["predict_s_per_image"] = round((time.time() - t0) / len(x), 4)
labels = test["label"].numpy()
maps, scores = torch.cat(maps), torch.cat(scores)
res["sample"] = sample_metrics(scores.numpy(), labels)
flat = maps.flatten(1)
res["sample_map_top1pct"] = sample_metrics(flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(1).numpy(), labels)
if extra_scores:
    res["sample_stage1"] = sample_metrics(torch.cat(extra_scores).numpy(), labels)
    res["sample_map_mean"] = sample_metrics(maps.flatten(1).mean(1).numpy(), labels)
if a.data == "lgg":
    res["pixel"] = {
        k: v
        for k, v in pixel_metrics(maps.numpy(), test["mask"][:, 0].numpy(), fg[:, 0].numpy()).items()
        if k in ("ap", "auroc", "best_dice", "best_threshold", "prevalence")
    }
    if resid:
        res["pixel_residual_only"] = {
            k: v
            for k, v in pixel_metrics(torch.cat(resid).numpy(), test["mask"][:, 0].numpy(), fg[:, 0].numpy()).items()
            if k in ("ap", "auroc", "best_dice")
        }
log = [r for r in det.train_log if "loss" in r or "val" in r]
res["curve"] = {}
for stage in sorted({r.get("stage") for r in log}):
    rs = [r for r in log if r.get("stage") == stage]
    pick = [rs[j] for j in sorted(set(np.linspace(0, len(rs) - 1, 11).astype(int)))]
    res["curve"][stage] = [
        {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items() if k in ("step", "loss", "val", "acc")} for r in pick
    ]
    vals = [r["val"] for r in rs if "val" in r]
    if vals:
        res["curve"][stage + "_val"] = [round(v, 5) for v in vals]
res["pool_info"] = getattr(det, "pool_info", None)
(out / "metrics.json").write_text(json.dumps(res, indent=1, default=str))
print(json.dumps({k: v for k, v in res.items() if k not in ("params", "curve")}, indent=1, default=str))
