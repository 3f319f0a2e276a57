"""Trivial baseline every method must beat: the anomaly score is the preprocessed intensity itself.

FLAIR lesions are bright, so "score = normalised intensity inside the foreground" already localises part of them.
Scored sets (no training, nothing tuned):

- ``lgg-flair-2d`` test split (20 patients, preset brain-mri-2d, 160 x 160 by default; foreground = the unsupervised
  brain mask by default, ``--lgg-foreground head`` for the whole head as before);
- ``brats2018-3d`` FLAIR, all 10 cases as 3D volumes (preset brain-mri-3d: RAS, 2 mm, 96 x 128 x 128), with
  slice-level scores from the axial slices of those volumes;
- ``brats2018-3d`` FLAIR as 2D slices (``view="slices"``, brain-mri-2d at 160 x 160).

Printed: pixel metrics over foreground voxels (AP, AUROC, best DICE, per-case DICE at that threshold) and slice-level
sample metrics (AP/AUROC) with max / mean / top-1 % reductions of each slice's map over its foreground.

    OMP_NUM_THREADS=1 python benchmarks/trivial_baselines.py [--size 160] [--json out.json] [--quiet]
        [--lgg-foreground brain|head] [--min-brain-fraction 0.01] [--skip lgg brats3d brats2d]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medanomaly.data import load_dataset
from medanomaly.evaluation.metrics import MetricWarning, pixel_metrics, sample_metrics
from medanomaly.evaluation.scoring import image_scores


def _stack(ds: Any, quiet: bool, desc: str) -> dict[str, Any]:
    imgs, fgs, masks, labels, cases = [], [], [], [], []
    for i in tqdm(range(len(ds)), desc=desc, disable=quiet):
        s = ds[i]
        imgs.append(s["image"][0].numpy())
        fgs.append(s["foreground"][0].numpy())
        masks.append(s["mask"][0].numpy())
        labels.append(s["label"])
        cases.append(s["case_id"])
    return {"image": np.stack(imgs), "fg": np.stack(fgs), "mask": np.stack(masks), "label": np.array(labels),
            "case": cases}


def _slice_metrics(maps: np.ndarray, fg: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for how in ("max", "mean", "topk"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            sc = image_scores(torch.from_numpy(maps), torch.from_numpy(fg), how, 0.01).numpy()
        out[how if how != "topk" else "top1%"] = sample_metrics(sc, labels)
    return out


def evaluate(b: dict[str, Any]) -> dict[str, Any]:
    """Pixel metrics of score = intensity over the foreground, and slice-level metrics (2D inputs)."""
    scores = np.where(b["fg"], b["image"], 0.0).astype(np.float32)
    pix = pixel_metrics(scores, b["mask"], b["fg"], case_ids=b["case"])
    res: dict[str, Any] = {"pixel": pix, "n_images": int(len(scores))}
    if scores.ndim == 3:
        res["slice"] = _slice_metrics(scores, b["fg"], b["label"])
        res["n_slices"], res["n_slices_with_lesion"] = int(len(scores)), int((b["label"] == 1).sum())
    else:  # 3D volumes: axial slices (last axis in RAS) with some foreground
        sl = np.moveaxis(scores, -1, 1).reshape(-1, *scores.shape[1:3])
        fg = np.moveaxis(b["fg"], -1, 1).reshape(-1, *scores.shape[1:3])
        mk = np.moveaxis(b["mask"], -1, 1).reshape(-1, *scores.shape[1:3])
        keep = fg.mean(axis=(1, 2)) >= 0.05  # the same unsupervised rule as the 2D slice views
        lab = mk.reshape(len(mk), -1).any(1).astype(int)
        res["slice"] = _slice_metrics(sl[keep], fg[keep], lab[keep])
        res["n_slices"], res["n_slices_with_lesion"] = int(keep.sum()), int(lab[keep].sum())
    return res


def _print(name: str, r: dict[str, Any], secs: float) -> None:
    p = r["pixel"]
    print(f"\n== {name}  ({r['n_images']} images, {secs:.0f} s)")
    print(f"pixel (foreground): AP {p['ap']:.3f}  AUROC {p['auroc']:.3f}  best DICE {p['best_dice']:.3f} "
          f"(thr {p['best_threshold']:.3f}; per-case DICE {p['dice_per_case_mean']:.3f} +- {p['dice_per_case_std']:.3f}, "
          f"{p['n_cases_dice']} cases)  lesion fraction {p['positive_fraction']:.4f}")
    print(f"slice level ({r['n_slices']} slices, {r['n_slices_with_lesion']} with lesion):")
    for how, m in r["slice"].items():
        print(f"  {how:>6}: AP {m['ap']:.3f}  AUROC {m['auroc']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=160, help="2D slice size (brain-mri-2d)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--lgg-foreground", default="brain", choices=["brain", "head"], help="LGG foreground mask")
    ap.add_argument("--min-brain-fraction", type=float, default=None,
                    help="LGG with the brain foreground: drop slices whose brain mask covers less (preset default 0.01)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lgg", "brats3d", "brats2d"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    lgg_kw: dict[str, Any] = {"foreground": args.lgg_foreground}
    if args.min_brain_fraction is not None:
        lgg_kw["min_brain_fraction"] = args.min_brain_fraction
    sets = [
        ("lgg", f"lgg-flair-2d test ({args.lgg_foreground} foreground)",
         lambda: load_dataset("lgg-flair-2d", "test", size=args.size, quiet=args.quiet, **lgg_kw)),
        ("brats3d", "brats2018-3d FLAIR volumes (2 mm)", lambda: load_dataset("brats2018-3d", "test")),
        ("brats2d", "brats2018-3d FLAIR slices", lambda: load_dataset("brats2018-3d", "test", view="slices", size=args.size,
                                                                       quiet=args.quiet)),
    ]
    for key, name, make in sets:
        if key in args.skip:
            continue
        t0 = time.time()
        ds = make()
        r = evaluate(_stack(ds, args.quiet, name))
        r["dataset"] = {"name": name, "preset": getattr(ds, "preset_obj", None) and ds.preset_obj.config,
                        "dropped_slices": getattr(ds, "n_dropped", 0)}
        results[key] = r
        _print(name, r, time.time() - t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
