"""Train and evaluate mim-ood, ar-restoration and token-critic on lgg-flair-2d (CPU-sized, 64x64 slices).

Train (healthy train slices; healthy validation slices only for the token-score threshold and best weights)::

    OMP_NUM_THREADS=1 python benchmarks/mim_ood_lgg.py train mim-ood /tmp/mimexp/mim-ood
    OMP_NUM_THREADS=1 python benchmarks/mim_ood_lgg.py train token-critic /tmp/mimexp/token-critic \
        --reuse /tmp/mimexp/mim-ood/run --reuse-modules tokenizer,mvtm
    OMP_NUM_THREADS=1 python benchmarks/mim_ood_lgg.py train ar-restoration /tmp/mimexp/ar \
        --reuse /tmp/mimexp/mim-ood/run --reuse-modules tokenizer

Evaluate on the test split (lesion masks used only here)::

    OMP_NUM_THREADS=1 python benchmarks/mim_ood_lgg.py eval /tmp/mimexp/results.json \
        mim-ood=/tmp/mimexp/mim-ood/run token-critic=/tmp/mimexp/token-critic/run ar=/tmp/mimexp/ar/run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def _load(split: str, size: int, normal_only: bool) -> object:
    from medanomaly.data import load_dataset

    return load_dataset("lgg-flair-2d", split, normal_only=normal_only, size=size)


def train(args: argparse.Namespace) -> None:
    from medanomaly.methods import get_method_class

    torch.set_num_threads(1)
    cls = get_method_class(args.method)
    params = cls.config_set(args.config)
    for kv in args.set:
        key, value = kv.split("=", 1)
        params[key] = yaml.safe_load(value)
    if args.reuse:
        params["reuse"] = {"run_dir": args.reuse, "modules": args.reuse_modules.split(",")}
    det = cls(**params)
    det.work_dir = Path(args.out) / "work"
    det.quiet = args.quiet
    t0 = time.perf_counter()
    det.fit(_load("train", args.size, True), _load("val", args.size, True))
    det.save(Path(args.out) / "run")
    print(json.dumps({"method": args.method, "train_s": time.perf_counter() - t0, "threshold": det.threshold,
                      "codebook_used": int(det.token_used.sum())}))


def evaluate(args: argparse.Namespace) -> None:
    from medanomaly.data import stack_dataset
    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
    from medanomaly.evaluation.tokens import token_metrics
    from medanomaly.methods import load_detector

    torch.set_num_threads(1)
    test = _load("test", args.size, False)
    idx = list(range(len(test)))[: args.max_slices] if args.max_slices else None
    batch = stack_dataset(test, idx)
    x, fg, masks = batch["image"], batch["foreground"], batch["mask"]
    labels = masks.flatten(1).any(1).long().numpy()
    results: dict[str, dict] = {}
    for spec in args.runs:
        label, run = spec.split("=", 1)
        det = load_detector(run)
        det.quiet = True
        det.params["restoration"]["extra_token_scores"] = args.token_scores
        if args.residual_to:
            det.params["restoration"]["residual_to"] = args.residual_to
        for r in args.R or [int(det.params["restoration"]["R"])]:
            det.params["restoration"]["R"] = r
            t0 = time.perf_counter()
            res = det.predict(x, fg)
            sec = time.perf_counter() - t0
            name = f"{label} R={r}" + (f" residual_to={args.residual_to}" if args.residual_to else "")
            out = {"seconds_per_32": sec / len(x) * 32, "threshold": det.threshold, "n_slices": len(x)}
            pm = pixel_metrics(res.pixel_scores, masks[:, 0], fg[:, 0], case_ids=batch["case_id"])
            out.update({f"pixel_{k}": pm[k] for k in ("ap", "auroc", "best_dice", "dice_per_case_mean")})
            sm = sample_metrics(res.image_scores, labels)
            out.update({"slice_ap": sm["ap"], "slice_auroc": sm["auroc"]})
            f = int(res.extras["token_factor"])
            for key in ("token_scores", "token_scores_mvtm"):
                if key in res.extras:
                    tm = token_metrics(res.extras[key], masks[:, 0], f, foreground=fg[:, 0])
                    out[f"{key}_ap"], out[f"{key}_auroc"] = tm["ap"], tm["auroc"]
            out["resampled_fraction"] = float(res.extras["token_resampled"].mean())
            results[name] = out
            print(name, json.dumps(out))
            if args.save_maps:
                np.savez_compressed(Path(args.out).with_suffix(f".{label}.R{r}.npz"), maps=res.pixel_scores.numpy(),
                                    restoration=res.extras["restoration"].numpy(), images=x.numpy(),
                                    masks=masks.numpy(), token_scores=res.extras["token_scores"].numpy())
    Path(args.out).write_text(json.dumps(results, indent=1))


def figure(args: argparse.Namespace) -> None:
    """Input, restoration, map and lesion contour for the best, median and worst lesion slices (per-slice AP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score

    d = np.load(args.npz)
    masks = d["masks"][:, 0]
    has = np.nonzero(masks.reshape(len(masks), -1).sum(1) >= args.min_pixels)[0]
    ap = np.array([average_precision_score(masks[i].ravel(), d["maps"][i].ravel()) for i in has])
    order = has[np.argsort(ap)[::-1]]
    pick = {"best": order[0], "median": order[len(order) // 2], "worst": order[-1]}
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 7.5))
    for row, (what, i) in enumerate(pick.items()):
        for col, (img, title) in enumerate([(d["images"][i, 0], "input"), (d["restoration"][i, 0], "restoration"),
                                            (d["maps"][i], "anomaly map")]):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray" if col < 2 else "magma")
            ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"{what} (AP {ap[list(has).index(i)]:.2f})" if col == 0 else title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out, {k: int(v) for k, v in pick.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("method")
    t.add_argument("out")
    t.add_argument("--config", default="cpu-small")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--reuse", default="")
    t.add_argument("--reuse-modules", default="tokenizer")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--set", nargs="*", default=[], help="parameter overrides key=value (dotted keys, YAML values)")
    e = sub.add_parser("eval")
    e.add_argument("out")
    e.add_argument("runs", nargs="+", help="label=run_dir")
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--R", type=int, nargs="*", default=None)
    e.add_argument("--max-slices", type=int, default=0)
    e.add_argument("--token-scores", action="store_true", help="also MVTM token NLL (extra forwards)")
    e.add_argument("--save-maps", action="store_true")
    e.add_argument("--residual-to", default="", help="override restoration.residual_to (input | reconstruction)")
    f = sub.add_parser("figure")
    f.add_argument("npz")
    f.add_argument("out")
    f.add_argument("--min-pixels", type=int, default=20)
    args = p.parse_args()
    {"train": train, "eval": evaluate, "figure": figure}[args.cmd](args)


if __name__ == "__main__":
    main()
