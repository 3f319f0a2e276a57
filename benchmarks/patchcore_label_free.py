"""Label-free controlled case for a 2D brain run: synthetic anomalies on the healthy validation slices.

No lesion label of any split is read. On the tumour-free slices of the ``val`` patients (``normal_only=True``), each
slice gets one synthetic anomaly per task (``--tasks``, seeded by ``--seed``, task and slice; ground truth: synthetic
label > 0.25 inside the foreground). Printed per run (one JSON line and one markdown row):

- per task: pixel AP over the foreground pixels of the clean and the anomalous slices, and image AUROC (clean
  slices against the anomalous slices that got an anomaly); their means over the tasks;
- ``rho_area``: Spearman correlation of the image score with the brain area on the clean slices (negative: small
  slices at the top and bottom of the head score highest whatever their content);
- ``edge_ratio``: mean map within 3 px of the brain border over the mean map inside.

For ``patchcore`` runs, ``--set key=value`` (YAML values, repeatable) rebuilds the memory bank on the run's
trained backbone with other bank/prediction settings (``layers``, ``standardise``, ``coreset_fraction``,
``sigma``, ``image_score``, ...) from the healthy training slices, without training again. Used for
docs/results/patchcore_defect.md::

    python benchmarks/patchcore_label_free.py out/lgg64_seeds/runs/seed-0/patchcore /tmp/pc0
    python benchmarks/patchcore_label_free.py /tmp/pc0 --set standardise=false
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
import yaml
from scipy.ndimage import binary_erosion
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

TASKS = ("smooth-intensity", "fpi", "cutpaste")


def controlled_case(data: str, size: int, tasks: tuple[str, ...], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The healthy val slices and, per task, the same slices with one synthetic anomaly each (and its ground truth)."""
    from medanomaly.data import load_dataset, stack_dataset
    from medanomaly.synth import get_task

    val = stack_dataset(load_dataset(data, "val", normal_only=True, size=size))
    x, fg = val["image"], val["foreground"]
    synth = {}
    for t, name in enumerate(tasks):
        fn = get_task(name)
        imgs, gts = [], []
        for i in range(len(x)):
            r = fn(x[i].numpy(), fg[i, 0].numpy(), np.random.default_rng([seed, t, i]))
            imgs.append(torch.from_numpy(np.asarray(r.image).reshape(x[i].shape)))
            gts.append(torch.from_numpy(np.asarray(r.label).reshape(x[i].shape[1:]) > 0.25) & fg[i, 0])
        synth[name] = {"image": torch.stack(imgs), "gt": torch.stack(gts)}
    return {"image": x, "foreground": fg}, synth


def score(det: Any, clean: dict[str, Any], synth: dict[str, Any]) -> dict[str, float]:
    x, fg = clean["image"], clean["foreground"]
    f0 = fg[:, 0].numpy()
    r0 = det.predict(x, fg)
    m0, s0 = r0.pixel_scores.numpy(), r0.image_scores.numpy()
    area = f0.reshape(len(f0), -1).sum(1)
    edge = np.stack([f & ~binary_erosion(f, iterations=3) for f in f0])
    out = {"rho_area": float(spearmanr(s0, area)[0]), "edge_ratio": float(m0[edge].mean() / m0[f0 & ~edge].mean())}
    aps, aucs = [], []
    for name, d in synth.items():
        r1 = det.predict(d["image"], fg)
        gt = d["gt"].numpy()
        pos = gt.reshape(len(gt), -1).any(1)
        ap = average_precision_score(np.r_[np.zeros(int(f0.sum()), bool), gt[f0]],
                                     np.r_[m0[f0], r1.pixel_scores.numpy()[f0]])
        auc = roc_auc_score(np.r_[np.zeros(len(s0)), np.ones(int(pos.sum()))],
                            np.r_[s0, r1.image_scores.numpy()[pos]])
        out[f"{name} AP"], out[f"{name} AUROC"] = float(ap), float(auc)
        aps.append(ap)
        aucs.append(auc)
    out["mean AP"], out["mean AUROC"] = float(np.mean(aps)), float(np.mean(aucs))
    return out


def rebuilt(det: Any, sets: list[str], data: str, size: int) -> Any:
    """A patchcore detector with the run's trained backbone and a memory bank rebuilt with ``sets`` applied."""
    from medanomaly.data import load_dataset
    from medanomaly.methods import get_method
    from medanomaly.methods.base import RunContext, merge_params

    over = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in sets)}  # dotted keys
    keep = ("backbone", "encoder", "multitask", "seed", "device")
    if any(k.split(".")[0] in keep for k in over):
        raise SystemExit(f"--set may not change the trained backbone ({', '.join(keep)})")
    new = get_method(det.name, **merge_params(det.params, over, where=det.name))
    new.ae, new.mt = det.ae, det.mt
    new.context_ = RunContext(quiet=True)
    new._build_bank(load_dataset(data, "train", normal_only=True, size=size))
    new.is_fitted = True
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (2D, trained on the data set's train split)")
    p.add_argument("--data", default="lgg-flair-2d")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--tasks", default=",".join(TASKS), help="synthetic tasks (medanomaly.synth), comma-separated")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic anomalies")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="patchcore only: key=value bank/prediction setting; the bank is rebuilt (repeatable)")
    args = p.parse_args()
    from medanomaly.app.predict import load_run

    torch.manual_seed(0)
    clean, synth = controlled_case(args.data, args.size, tuple(args.tasks.split(",")), args.seed)
    n_pos = {k: int(v["gt"].flatten(1).any(1).sum()) for k, v in synth.items()}
    print(f"{len(clean['image'])} healthy val slices; slices with a synthetic anomaly: {n_pos}", flush=True)
    rows = []
    for run in args.runs:
        t0 = time.time()
        det, _ = load_run(run)
        if args.sets:
            det = rebuilt(det, args.sets, args.data, args.size)
        res = score(det, clean, synth)
        tag = run + ("" if not args.sets else " [" + ", ".join(args.sets) + "]")
        print(json.dumps({"run": tag, **{k: round(v, 4) for k, v in res.items()},
                          "seconds": round(time.time() - t0)}), flush=True)
        rows.append((tag, res))
    keys = [k for k in rows[0][1] if k not in ("rho_area", "edge_ratio")] + ["rho_area", "edge_ratio"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for tag, res in rows:
        print(f"| {tag} | " + " | ".join(f"{res[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
