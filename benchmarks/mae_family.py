"""MAE-family experiments on cached real data (1 thread per process).

Anomaly-ratio experiment (AMAE paper fig. 3a) on PneumoniaMNIST at 64 px, one command:

    python benchmarks/mae_family.py ratio --out runs/pmn_ratio --ratios 0 0.4 0.8 --seeds 0 1 --jobs 2

Normal set T_n = half of the 1214 normal train images (90 % train / 10 % val, healthy only); the unlabeled pool
(fixed size, default 600) = the other normal train images mixed with pneumonia train images at each ratio. The pool
is handed to AMAE without labels; its hidden labels are read here only afterwards, to measure the pseudo-label
quality. One MAE is pre-trained on T_n (or ``--pretrained RUN``) and reused by ``mae``, every seed and every ratio;
stage 1 is trained once per seed and adapted (stage 2) once per ratio. Test = the 624 test images (labels used for
the reported metrics only). Writes ``results.json``, ``ratio.png`` and prints the table.

A single run (as before):

    python benchmarks/mae_family.py single --data lgg --method mae --out runs/lgg_mae
    python benchmarks/mae_family.py single --data pmn --method amae --pretrained runs/pmn_mae --pool 0.4 --out runs/x

Data are cached as tensors in ``$MAE_CACHE`` (default /tmp/mae_exp; LGG by benchmarks/mae_family_cache.py,
PneumoniaMNIST at 64 px built here when missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medanomaly.methods.base import RunContext

torch.set_num_threads(1)
C = Path(os.environ.get("MAE_CACHE", "/tmp/mae_exp"))
POOL_SEED, SPLIT_SEED = 1, 0


# -- data ---------------------------------------------------------------------------------------
def pmn64(split: str) -> dict[str, torch.Tensor]:
    """PneumoniaMNIST ``split`` at 64 px (preset cxr) as tensors, cached in $MAE_CACHE."""
    path = C / f"pmn64_{split}.pt"
    if not path.exists():
        from medanomaly.data.samples import load_dataset

        ds = load_dataset("pneumoniamnist", split, size=64)
        s = [ds[i] for i in range(len(ds))]
        out = {k: torch.stack([torch.as_tensor(x[k]) for x in s]) for k in ("image", "foreground")}
        out["label"] = torch.tensor([int(x["label"]) for x in s])
        C.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return torch.load(path)


def arrays(d: dict[str, Any], idx: np.ndarray | None = None) -> Any:
    """Images and foreground only (no label, no mask reaches the method)."""
    from medanomaly.data import ArrayDataset

    idx = np.arange(len(d["image"])) if idx is None else np.asarray(idx)
    t = torch.as_tensor(idx, dtype=torch.long)
    return ArrayDataset(d["image"][t], d["foreground"][t])


def pmn_sets(pool_size: int = 600) -> dict[str, Any]:
    """T_n (train, val), the held-out normals for the pool, the pneumonia images, the test set."""
    tr = pmn64("train")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(tr["label"]))
    n_half = len(perm) // 2
    normal_idx, held = np.sort(perm[:n_half]), perm[n_half:]
    if pool_size > len(held):
        raise ValueError(f"pool size {pool_size} > {len(held)} held-out normal images")
    v = int(0.9 * len(normal_idx))
    return {"tr": tr, "train": arrays(tr, normal_idx[:v]), "val": arrays(tr, normal_idx[v:]), "held": held,
            "pn": pmn64("train-pneumonia"), "test": pmn64("test"), "pool_size": pool_size}


def make_pool(sets: dict[str, Any], ratio: float) -> tuple[Any, np.ndarray]:
    """(unlabeled pool dataset, its hidden labels) with ``round(ratio * pool_size)`` pneumonia images."""
    m = int(sets["pool_size"])
    n_abn = int(round(ratio * m))
    tr, pn = sets["tr"], sets["pn"]
    ia = np.random.default_rng(POOL_SEED).permutation(len(pn["label"]))[:n_abn]
    imgs = torch.cat([tr["image"][torch.as_tensor(sets["held"][: m - n_abn])], pn["image"][torch.as_tensor(ia)]])
    hidden = np.r_[np.zeros(m - n_abn, dtype=int), np.ones(n_abn, dtype=int)]
    from medanomaly.data import ArrayDataset

    return ArrayDataset(imgs), hidden


def test_scores(det: Any, test: dict[str, torch.Tensor], bs: int = 64) -> dict[str, np.ndarray]:
    """Image scores of the test set: the detector's own and, for amae, the stage-1 probability."""
    s, s1 = [], []
    for i in range(0, len(test["image"]), bs):
        r = det.predict(test["image"][i:i + bs], test["foreground"][i:i + bs])
        s.append(r.image_scores)
        if "stage1_scores" in r.extras:
            s1.append(r.extras["stage1_scores"])
    out = {"score": torch.cat(s).numpy()}
    if s1:
        out["stage1"] = torch.cat(s1).numpy()
    return out


def auc_ap(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from medanomaly.evaluation.metrics import sample_metrics

    m = sample_metrics(scores, labels)
    return {"auroc": round(float(m["auroc"]), 4), "ap": round(float(m["ap"]), 4)}


def params_for(method: str, overrides: list[str], pretrained: str | None = None) -> dict[str, Any]:
    from medanomaly.methods import get_method_class

    p = get_method_class(method).config_set("cpu-small")
    if method == "amae":
        p.setdefault("stage1", {})["anatomy"] = "cxr"
    if pretrained:
        p["pretrained"] = pretrained
    for kv in overrides:  # dotted keys: stage1.steps=2000
        k, v = kv.split("=", 1)
        node = p
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = yaml.safe_load(v)
    return p


# -- the ratio experiment -----------------------------------------------------------------------
def run_seed(seed: int, ratios: list[float], pretrained: str, out: str, overrides: list[str], pool_size: int) -> dict:
    """Stage 1 once, then stage 2 per ratio, for one seed (runs in its own process)."""
    torch.set_num_threads(1)
    from medanomaly.methods import get_method

    sets = pmn_sets(pool_size)
    y_test = sets["test"]["label"].numpy()
    p = params_for("amae", overrides, pretrained)
    p["seed"] = seed
    det = get_method("amae", **p)
    t0 = time.time()
    det.fit(sets["train"], sets["val"], context=RunContext(quiet=True))
    res: dict[str, Any] = {"seed": seed, "stage1_fit_s": round(time.time() - t0, 1),
                           "stage1_synthetic_val": det.stage1_info}
    s1 = test_scores(det, sets["test"])["stage1"]
    res["stage1_test"] = auc_ap(s1, y_test)
    res["ratios"] = {}
    for r in ratios:
        pool, hidden = make_pool(sets, r)
        d2 = copy.deepcopy(det)
        t0 = time.time()
        d2.adapt(sets["train"], sets["val"], pool)
        fit_s = time.time() - t0
        sc = test_scores(d2, sets["test"])
        # evaluation only: the pool's hidden labels against the pseudo-labels the method chose without them
        pn, pa = d2.pseudo_labels["normal"], d2.pseudo_labels["abnormal"]
        p_pool = d2.stage1_scores(pool.images.to(d2.device)).cpu().numpy()
        q = {"n_pseudo_normal": int(len(pn)), "n_pseudo_abnormal": int(len(pa)),
             "true_anomaly_frac_in_pseudo_abnormal": round(float(hidden[pa].mean()), 4) if len(pa) else None,
             "true_anomaly_frac_in_pseudo_normal": round(float(hidden[pn].mean()), 4) if len(pn) else None,
             "pool_anomaly_frac": round(float(hidden.mean()), 4), "fallback": d2.pool_info.get("fallback"),
             "stage1_pool_auroc": auc_ap(p_pool, hidden)["auroc"] if 0 < hidden.sum() < len(hidden) else None,
             "predicted_abnormal_frac": round(float((p_pool >= 0.5).mean()), 4)}
        res["ratios"][str(r)] = {"stage2_test": auc_ap(sc["score"], y_test), "pseudo": q, "stage2_fit_s": round(fit_s, 1)}
        print(f"seed {seed} ratio {r}: stage 2 {res['ratios'][str(r)]['stage2_test']} pseudo {q}", flush=True)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"seed{seed}.json").write_text(json.dumps(res, indent=1))
    return res


def pretrain(out: Path, overrides: list[str]) -> str:
    from medanomaly.methods import get_method

    sets = pmn_sets()
    det = get_method("mae", **params_for("mae", overrides))
    t0 = time.time()
    det.fit(sets["train"], sets["val"], context=RunContext(quiet=True))
    run = det.save(out / "mae")
    print(f"pre-trained MAE on {len(sets['train'])} normal images in {time.time() - t0:.0f} s -> {run}", flush=True)
    return str(run)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [float(r) for r in summary["ratios"]]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for rs in summary["per_seed"].values():
        ax.plot(ratios, [rs["stage2"][str(r)] for r in ratios], "o:", color="C0", alpha=0.45, lw=1)
        ax.axhline(rs["stage1"], color="C1", alpha=0.35, lw=1, ls=":")
    ax.plot(ratios, [summary["stage2_mean"][str(r)] for r in ratios], "o-", color="C0", label="AMAE stage 2 (mean)")
    ax.axhline(summary["stage1_mean"], color="C1", label="AMAE stage 1 (mean)")
    ax.axhline(summary["mae"], color="C2", ls="--", label="MAE residual")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("anomaly ratio of the unlabeled pool")
    ax.set_ylabel("test AUROC")
    ax.set_title("PneumoniaMNIST 64 px (dots: seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_experiment(a: argparse.Namespace) -> None:
    from medanomaly.methods import load_detector

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pre = a.pretrained or pretrain(out, a.set_mae)
    sets = pmn_sets(a.pool_size)
    y_test = sets["test"]["label"].numpy()
    mae = load_detector(pre)
    mae_res = auc_ap(test_scores(mae, sets["test"])["score"], y_test)
    print(f"mae (pre-trained, residual): {mae_res}", flush=True)
    args = [(s, a.ratios, pre, str(out), a.set, a.pool_size) for s in a.seeds]
    if a.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as ex:
            per_seed = list(ex.map(run_seed, *zip(*args, strict=True)))
    else:
        per_seed = [run_seed(*x) for x in args]
    rs = [str(r) for r in a.ratios]
    summary = {
        "ratios": rs, "mae": mae_res["auroc"], "mae_ap": mae_res["ap"],
        "per_seed": {str(r["seed"]): {"stage1": r["stage1_test"]["auroc"],
                                      "stage2": {k: r["ratios"][k]["stage2_test"]["auroc"] for k in rs}} for r in per_seed},
        "stage1_mean": round(float(np.mean([r["stage1_test"]["auroc"] for r in per_seed])), 4),
        "stage2_mean": {k: round(float(np.mean([r["ratios"][k]["stage2_test"]["auroc"] for r in per_seed])), 4) for k in rs},
    }
    result = {"command": a.command_line, "pretrained": pre, "pool_size": a.pool_size, "overrides": a.set,
              "amae_params": params_for("amae", a.set, pre), "mae_test": mae_res, "seeds": per_seed,
              "summary": summary, "wall_s": round(time.time() - t0, 1), "threads_per_process": 1}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    plot(summary, out / "ratio.png")
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """Markdown table: one row per (seed, ratio)."""
    lines = ["| seed | ratio | stage 1 AUROC / AP | stage 2 AUROC / AP | synth. val AUROC | pseudo-abn. (true anom. frac) "
             "| pseudo-norm. (true anom. frac) | stage-1 pool AUROC |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in result["seeds"]:
        s1 = r["stage1_test"]
        for k, v in r["ratios"].items():
            q = v["pseudo"]
            lines.append(
                f"| {r['seed']} | {float(k):.0%} | {s1['auroc']:.3f} / {s1['ap']:.3f} | {v['stage2_test']['auroc']:.3f} / "
                f"{v['stage2_test']['ap']:.3f} | {f(r['stage1_synthetic_val'].get('auroc'))} | {q['n_pseudo_abnormal']} "
                f"({f(q['true_anomaly_frac_in_pseudo_abnormal'])}) | {q['n_pseudo_normal']} "
                f"({f(q['true_anomaly_frac_in_pseudo_normal'])}) | {f(q['stage1_pool_auroc'])} |")
    m = result["mae_test"]
    lines.append(f"\nmae (residual of the shared pre-trained MAE): AUROC {m['auroc']:.3f} / AP {m['ap']:.3f}")
    return "\n".join(lines)


# -- a single run (LGG or PneumoniaMNIST) --------------------------------------------------------------
def single(a: argparse.Namespace) -> None:
    from medanomaly.data import ArrayDataset
    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics
    from medanomaly.methods import get_method, load_detector

    params = params_for(a.method, a.set, a.pretrained)
    det = get_method(a.method, **params)
    out = Path(a.out)
    ctx = RunContext(work_dir=out / "work", resume=True, quiet=True)
    unlabeled = None
    if a.data == "lgg":
        def lgg(name: str) -> Any:
            d = torch.load(C / f"lgg64_{name}.pt")
            return ArrayDataset(d["image"], d["foreground"], d["mask"], d["label"].numpy(), d["case_id"], d["slice_index"])

        train, val = lgg("train_normal"), lgg("val_normal")
        test = torch.load(C / "lgg64_test_all.pt")
        if a.pool == "all-train":
            unlabeled = arrays(torch.load(C / "lgg64_train_all.pt"))
    else:
        sets = pmn_sets()
        train, val, test = sets["train"], sets["val"], sets["test"]
        if a.pool is not None:
            unlabeled = make_pool(sets, float(a.pool))[0]
    t0 = time.time()
    if a.eval_run:
        det = load_detector(a.eval_run)
        out.mkdir(parents=True, exist_ok=True)
    elif a.method == "amae":
        det.fit(train, val, unlabeled=unlabeled, context=ctx)
    else:
        det.fit(train, val, context=ctx)
    res: dict[str, Any] = {"fit_s": round(time.time() - t0, 1), "params": params, "pool": a.pool}
    if not a.eval_run:
        det.save(out / "run")
    t0 = time.time()
    maps, scores, s1 = [], [], []
    x, fg = test["image"], test["foreground"]
    for i in range(0, len(x), 64):
        r = det.predict(x[i:i + 64], fg[i:i + 64])
        maps.append(r.pixel_scores)
        scores.append(r.image_scores)
        if "stage1_scores" in r.extras:
            s1.append(r.extras["stage1_scores"])
    res["predict_s_per_image"] = round((time.time() - t0) / len(x), 4)
    labels = test["label"].numpy()
    maps_t = torch.cat(maps)
    res["sample"] = sample_metrics(torch.cat(scores).numpy(), labels)
    if s1:
        res["sample_stage1"] = sample_metrics(torch.cat(s1).numpy(), labels)
        res["stage1_synthetic_val"] = getattr(det, "stage1_info", None)
    if a.data == "lgg":
        pm = pixel_metrics(maps_t.numpy(), test["mask"][:, 0].numpy(), fg[:, 0].numpy())
        res["pixel"] = {k: v for k, v in pm.items() if k in ("ap", "auroc", "best_dice", "best_threshold", "prevalence")}
    res["pool_info"] = getattr(det, "pool_info", None)
    (out / "metrics.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "params"}, indent=1, default=str))


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratio", help="AMAE anomaly-ratio experiment on PneumoniaMNIST")
    r.add_argument("--out", required=True)
    r.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.4, 0.8])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--pool-size", type=int, default=600)
    r.add_argument("--pretrained", default=None, help="a pre-trained mae run folder (default: pre-train on T_n)")
    r.add_argument("--jobs", type=int, default=1, help="seeds in parallel (one thread each)")
    r.add_argument("--set", nargs="*", default=[], help="amae overrides, dotted keys: stage1.steps=2000")
    r.add_argument("--set-mae", nargs="*", default=[], help="mae overrides for the pre-training")
    s = sub.add_parser("single", help="one method, one run")
    s.add_argument("--data", choices=["lgg", "pmn"], required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--pretrained", default=None)
    s.add_argument("--pool", default=None, help="lgg: all-train; pmn: anomaly ratio in [0,1]")
    s.add_argument("--out", required=True)
    s.add_argument("--set", nargs="*", default=[], help="key=yamlvalue overrides (dotted keys)")
    s.add_argument("--eval-run", default=None, help="only evaluate this saved run folder")
    a = ap.parse_args()
    a.command_line = "python benchmarks/mae_family.py " + " ".join(sys.argv[1:])
    ratio_experiment(a) if a.cmd == "ratio" else single(a)


if __name__ == "__main__":
    main()
