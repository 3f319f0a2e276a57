"""Label-free choice of the multitask domain-shift augmentation (issue 13): train without and with ``augment``, score
each member on synthetic anomalies in held-out tasks, on the clean healthy validation images and on domain-shifted
copies of them. No lesion mask or label is read anywhere.

Two arms, ``off`` (``augment.enabled=false``) and ``on`` (``augment.enabled=true`` + ``--aug-set`` overrides), are
trained with ``medanomaly train``'s pipeline (:func:`medanomaly.app.train.train_run`) into ``OUT/off`` and
``OUT/on`` with the same config set, seed and ``--set`` overrides, so their members hold out the same tasks and
folds (paired). A finished run folder is reused; an unfinished one is resumed; ``--runs off=DIR on=DIR`` scores
given run folders instead (any names; trained on the same data).

Scores, per member (its held-out tasks on its held-out folds of the healthy training images, exactly the method's
own synthetic validation set: same ``val_samples``, seed and member index):

- ``clean``: the synthetic validation pixel AP the method computes (reproduces the ``synthetic_val_ap`` recorded in
  the run, printed beside it as a check);
- ``shifted[kind]``: the same on a domain-shifted copy of the healthy images (the anomalies and their labels are
  made on the shifted image, as in training). The shifts are fixed "other scanners", deliberately NOT the training
  augmentation's distribution: ``gamma`` (gamma in [0.4, 0.6] or [1.7, 2.3], outside the training range),
  ``histogram`` (MONAI ``RandHistogramShift``: a random monotone piecewise-linear intensity remap), ``bias-noise``
  (a degree-2 bias field of coefficients +-0.5 and Gaussian noise of std 0.03; no noise in training), ``blur``
  (Gaussian PSF of sigma 1.2 px and intensities x 0.85; training down-samples by area) and ``thick`` (one axis
  down-sampled 3-4x, anisotropic; training is isotropic and at most 2x). All act inside the foreground only, clipped
  to the training images' range, background kept.

Selection rule (label-free): ``score = mean over members of (clean + mean over shifts) / 2``; the arm with the higher
score is chosen. ``OUT/selection.json`` keeps every number.

Usage (what the coordinator runs; 2 arms x 3 members of cpu-small on lgg-flair-2d at 64 px; each member ~4-5 min
on one free CPU core, early stopping may cut it)::

    OMP_NUM_THREADS=1 MEDANOMALY_THREADS=1 python benchmarks/augment_selection.py --out bench/augment_selection \\
        --data lgg-flair-2d --size 64 --config-set cpu-small

Other augmentation settings for the ``on`` arm: ``--aug-set augment.p=0.8 --aug-set augment.gamma=[0.6,1.6]``;
for both arms: ``--set max_models=2``. Smoke run (seconds per member, numbers meaningless)::

    OMP_NUM_THREADS=1 MEDANOMALY_THREADS=1 python benchmarks/augment_selection.py --out /tmp/aug_smoke \\
        --set train.steps=20 --set max_models=1 --set val_samples=16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHIFTS = ("gamma", "histogram", "bias-noise", "blur", "thick")


def shift_image(kind: str, image: np.ndarray, fg: np.ndarray, rng: np.random.Generator,
                value_range: tuple[float, float]) -> np.ndarray:
    """One validation shift of ``kind`` on ``image`` (C, *S) inside ``fg`` (*S); background kept; clipped to the range.

    Written here (not :class:`medanomaly.data.augment.DomainShift`) on purpose: these shifts must differ from the
    training augmentation. The anisotropic ``thick`` shift is written by hand because MONAI's
    ``RandSimulateLowResolution`` zooms all axes by one factor.
    """
    from monai.transforms import GaussianSmooth, RandBiasField, RandGaussianNoise, RandHistogramShift

    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
    dims = x.ndim - 1
    seed = int(rng.integers(0, 2**32))
    if kind == "gamma":
        g = float(rng.uniform(0.4, 0.6) if rng.random() < 0.5 else rng.uniform(1.7, 2.3))
        lo, hi = float(x.min()), float(x.max())
        y = lo + (hi - lo) * ((x - lo) / max(hi - lo, 1e-7)) ** g
    elif kind == "histogram":
        t = RandHistogramShift(num_control_points=(6, 10), prob=1.0)
        t.set_random_state(seed=seed)
        y = torch.as_tensor(t(x)).float()
    elif kind == "bias-noise":
        b = RandBiasField(degree=2, coeff_range=(-0.5, 0.5), prob=1.0)
        b.set_random_state(seed=seed)
        n = RandGaussianNoise(prob=1.0, mean=0.0, std=0.03)
        n.set_random_state(seed=seed + 1)
        y = torch.as_tensor(n(torch.as_tensor(b(x)).float())).float()
    elif kind == "blur":
        y = torch.as_tensor(GaussianSmooth(sigma=1.2)(x)).float() * 0.85
    elif kind == "thick":
        axis = int(rng.integers(dims))
        factor = float(rng.uniform(3.0, 4.0))
        size = list(x.shape[1:])
        small = list(size)
        small[axis] = max(1, round(size[axis] / factor))
        mode = "bilinear" if dims == 2 else "trilinear"
        down = torch.nn.functional.interpolate(x[None], size=small, mode="area")
        y = torch.nn.functional.interpolate(down, size=size, mode=mode, align_corners=False)[0]
    else:
        raise ValueError(f"unknown shift {kind!r}; known: {', '.join(SHIFTS)}")
    out = torch.where(torch.from_numpy(np.asarray(fg, bool)), y, x).numpy()
    return np.clip(out, *value_range).astype(np.float32)


def shifted_pool(pool: Any, kind: str, seed: int) -> Any:
    """A copy of the healthy pool with every image shifted by ``kind`` (seeded per image)."""
    from medanomaly.methods.multitask.pool import HealthyPool

    rng_range = (min(float(im.min()) for im in pool.images), max(float(im.max()) for im in pool.images))
    k = SHIFTS.index(kind)
    images = [shift_image(kind, im, fg, np.random.default_rng([seed, k, i]), rng_range)
              for i, (im, fg) in enumerate(zip(pool.images, pool.foregrounds, strict=True))]
    out = HealthyPool(images, pool.foregrounds, pool.case_ids)
    out.fingerprint = f"{pool.fingerprint}+shift:{kind}:{seed}"
    return out


def train_arm(name: str, run_dir: Path, a: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from medanomaly.app.train import train_run
    from medanomaly.run_folder import RunFolder

    if RunFolder(run_dir).is_finished:
        print(f"[{name}] {run_dir} is finished: reused", flush=True)
        return
    t0 = time.time()
    print(f"[{name}] training into {run_dir} with {json.dumps(overrides)}", flush=True)
    train_run("multitask", a.data, run_dir, config_set=a.config_set, overrides=overrides, seed=a.seed, size=a.size,
              resume=True, quiet=True)
    print(f"[{name}] trained in {time.time() - t0:.0f} s", flush=True)


def score_run(name: str, run_dir: Path, shift_seed: int, batch: int) -> dict[str, Any]:
    """Clean and shifted synthetic validation AP of every member of a finished multitask run (no label read)."""
    from medanomaly.app.datasets import load_sources, open_dataset
    from medanomaly.app.predict import load_run
    from medanomaly.methods.base import RunContext
    from medanomaly.methods.multitask import MultiTaskDetector
    from medanomaly.methods.multitask.folds import assign_folds
    from medanomaly.methods.multitask.pool import HealthyPool, inter_source_images
    from medanomaly.methods.multitask.synthesis import SynthSpec
    from medanomaly.methods.multitask.validation import make_validation_set, validation_ap
    from medanomaly.training.loop import get_device

    det, cfg = load_run(run_dir, expect_method="multitask")
    det.set_context(RunContext(quiet=True))
    p, d = det.params, cfg.get("data") or {}
    ds = open_dataset(d["name"], d.get("split", "train"), normal_only=True, preset_config=d.get("preset_config"),
                      max_cases=d.get("max_cases"))
    pool = HealthyPool.from_dataset(ds, quiet=True)
    if d.get("fingerprint") and pool.fingerprint != d["fingerprint"]:
        raise SystemExit(f"{run_dir}: the training images read now differ from the run's (fingerprint); cannot rebuild "
                         "its validation sets")
    tp = p["tasks"]
    sources, _ = load_sources(MultiTaskDetector, p)
    if not ((cfg.get("sources") or {}).get("inter_source") or {}).get("loaded", True):
        sources["inter_source"] = None  # trained with the fallback: the same here
    inter = inter_source_images(tp["inter_source"], pool, "inter-blend" in tp["names"], sources.get("inter_source"))
    folds = assign_folds(pool.case_ids, len(tp["names"]), seed=int(p["fold_seed"]))
    spec = SynthSpec(tp["names"], tp["params"], float(det.label_sigma_effective), inter)
    device = get_device(p["train"]["device"])
    pools = {"clean": pool, **{k: shifted_pool(pool, k, shift_seed) for k in SHIFTS}}
    members = []
    for net, info in zip(det.models, det.member_info, strict=True):
        val_idx = np.flatnonzero(np.isin(folds, info["val_folds"]))
        rec: dict[str, Any] = {"name": info["name"], "train_task_names": info.get("train_task_names"),
                               "val_task_names": info.get("val_task_names"),
                               "recorded_synthetic_val_ap": info.get("synthetic_val_ap"),
                               "best_step": info.get("best_step"), "steps_done": info.get("steps_done")}
        aps = {}
        for k, pl in pools.items():
            vs = make_validation_set(pl, val_idx, tuple(info["val_tasks"]), spec, int(p["val_samples"]), int(p["seed"]),
                                     int(info["index"]))
            aps[k] = validation_ap(net, vs, device, batch)
        rec["clean"] = aps.pop("clean")
        rec["shifted"] = aps
        vals = [v for v in aps.values() if v is not None]
        rec["shifted_mean"] = float(np.mean(vals)) if vals else None
        rec["score"] = None if rec["clean"] is None or rec["shifted_mean"] is None else (rec["clean"] + rec["shifted_mean"]) / 2
        members.append(rec)
        print(f"[{name}] {rec['name']}: clean AP {_f(rec['clean'])} (recorded {_f(rec['recorded_synthetic_val_ap'])}), "
              f"shifted {', '.join(f'{k} {_f(v)}' for k, v in aps.items())}; mean shifted {_f(rec['shifted_mean'])}",
              flush=True)

    def mean(key: str) -> float | None:
        vals = [m[key] for m in members if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"run": str(run_dir), "augment": p["augment"], "seed": int(p["seed"]), "members": members,
            "clean": mean("clean"), "shifted_mean": mean("shifted_mean"), "score": mean("score"),
            "shifted": {k: float(np.mean([m["shifted"][k] for m in members if m["shifted"][k] is not None] or [math.nan]))
                        for k in SHIFTS}}


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for the two run folders and selection.json")
    ap.add_argument("--data", default="lgg-flair-2d")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--config-set", default="cpu-small")
    ap.add_argument("--seed", type=int, default=None, help="training seed of both arms (default: the config's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for both arms (repeatable)")
    ap.add_argument("--aug-set", dest="aug_sets", action="append", default=[],
                    help="key=value for the 'on' arm only, e.g. augment.p=0.8 (repeatable)")
    ap.add_argument("--runs", nargs="+", default=None, metavar="NAME=RUN_DIR",
                    help="score these finished run folders instead of training")
    ap.add_argument("--shift-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="prediction batch size")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("MEDANOMALY_THREADS", "1")))
    a = ap.parse_args()
    torch.set_num_threads(max(1, a.threads))

    from medanomaly.app.config import parse_overrides

    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.runs:
        runs = dict(r.split("=", 1) for r in a.runs)
        runs = {k: Path(v) for k, v in runs.items()}
    else:
        both = parse_overrides(a.sets)
        arms = {"off": {**both, "augment.enabled": False}, "on": {**both, **parse_overrides(a.aug_sets), "augment.enabled": True}}
        runs = {k: a.out / k for k in arms}
        for k, ov in arms.items():
            train_arm(k, runs[k], a, ov)
    res: dict[str, Any] = {"data": a.data, "size": a.size, "config_set": a.config_set, "shift_seed": a.shift_seed,
                           "shifts": list(SHIFTS), "rule": "score = mean over members of (clean + mean shifted AP) / 2",
                           "arms": {}}
    for k, run in runs.items():
        res["arms"][k] = score_run(k, run, a.shift_seed, a.batch)
    names = list(res["arms"])
    if {"off", "on"} <= set(names):  # paired by member (same held-out tasks and folds)
        on = {m["name"]: m for m in res["arms"]["on"]["members"]}
        res["paired_delta_on_minus_off"] = [
            {"name": m["name"], **{key: (on[m["name"]][key] - m[key]) if on.get(m["name"]) and m[key] is not None
                                   and on[m["name"]][key] is not None else None
                                   for key in ("clean", "shifted_mean", "score")}}
            for m in res["arms"]["off"]["members"]]
    scored = {k: v["score"] for k, v in res["arms"].items() if v["score"] is not None}
    res["selected"] = max(scored, key=scored.get) if scored else None
    res["seconds"] = round(time.time() - t0, 1)
    (a.out / "selection.json").write_text(json.dumps(res, indent=1, default=str))
    print("\narm        clean   " + "  ".join(f"{k:>10}" for k in SHIFTS) + "   shifted   score")
    for k, v in res["arms"].items():
        print(f"{k:<9} {_f(v['clean']):>6}   " + "  ".join(f"{_f(v['shifted'][s]):>10}" for s in SHIFTS)
              + f"   {_f(v['shifted_mean']):>7}   {_f(v['score']):>5}")
    print(f"selected (label-free): {res['selected']}; {a.out / 'selection.json'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
