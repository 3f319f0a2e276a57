"""Scale study table and figure: label-free validation and test metrics of runs trained at several budgets/widths.

Each point is ``LABEL=RUN_DIR:EVAL_DIR[:EVAL_DIR2]`` (a finished run folder, and ``medanomaly evaluate`` output
folders holding ``metrics.json``; the first is the in-domain test, the optional second another test set) plus its
family (``--family``). The label-free number is what the run itself recorded on healthy data only:

- ``multitask``: the members' synthetic validation AP (held-out tasks on held-out folds), their mean;
- other methods: the best validation loss of every trained module in ``train_log.jsonl`` (lower is better; a
  module's loss depends on the modules before it, e.g. the MVTM's on the tokenizer's codebook).

With ``--validate-dir DIR``, every point also gets ``synthetic_ap``: :func:`medanomaly.app.validate.validate_run`
(synthetic anomalies in the run's own healthy validation images, all default tasks; cached in ``DIR/<label>``), a
label-free score comparable across methods and budgets; the figure's label-free panel then shows it.

Training compute is the run's ``budget``: its configured optimiser steps (every ``train``/``pretrain``/``*_train``
section's ``steps``, summed) over the same sum for the method's ``cpu-small`` config set, so 4x means four times the
``cpu-small`` steps whatever the thread count or machine load; the figure's x axis. The table also has the recorded
training seconds (``RunFolder.train_seconds``: the wall seconds of one session, or a resumed run's training-loop
seconds summed over its sessions; comparable only between runs made under the same load) and,
for multitask, the optimiser steps done by its members (early stopping ends members before their budget). Usage::

    python benchmarks/scale_study.py docs/results/scale_study --family multitask \\
        1x=out/lgg64_seeds/runs/seed-0/multitask:out/lgg64_seeds/eval/seed-0/multitask:... \\
        steps4x=out/scale/mt_steps4x:out/scale/eval_lgg_mt_steps4x:out/scale/eval_brats_mt_steps4x

Seeds of one setting are points whose labels differ only by a ``-sK`` suffix (``steps16x``, ``steps16x-s1``,
``steps16x-s2``); every setting with two or more seeds also gets a row of mean ± std (sample std) in a second table,
``OUT.json``'s ``seed_groups``, and a black error bar in the figure.

Writes ``OUT.md`` (a table), ``OUT.json`` and ``OUT.png`` (or ``--figure``: label-free score and test pixel AP
against training seconds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

import yaml


def _label_free(run: Path) -> dict[str, Any]:
    state = json.loads((run / "state.json").read_text())
    if "members" in state:
        aps = [m["synthetic_val_ap"] for m in state["members"]]
        steps = sum(int(m.get("steps_done") or 0) for m in state["members"])
        return {"label_free": sum(aps) / len(aps), "label_free_kind": "synthetic val AP (mean of members)",
                "members": [round(a, 3) for a in aps], "steps": steps}
    best: dict[str, float] = {}
    log = run / "train_log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        rec = json.loads(line)
        if rec.get("best_val") is not None:
            best[str(rec.get("stage", "model"))] = round(float(rec["best_val"]), 4)
    return {"label_free": None, "label_free_kind": "best validation loss per trained module", "members": best}


def _train_seconds(run: Path) -> float | None:
    """The run's training seconds as the benchmark tables count them: a resumed run's sessions summed."""
    from medanomaly.run_folder import RunFolder

    return RunFolder(run).train_seconds()[0]


def _configured_steps(params: dict[str, Any]) -> int:
    """Sum of the optimiser steps configured in every training section of a method's parameters."""
    return sum(int(v["steps"]) for k, v in params.items()
               if (k in ("train", "pretrain") or k.endswith("_train")) and isinstance(v, dict) and "steps" in v)


def _budget(cfg: dict[str, Any]) -> float | None:
    """Configured steps of a run relative to its method's ``cpu-small`` config set (None when not comparable)."""
    from medanomaly.methods import get_method, get_method_class

    if not cfg.get("method"):
        return None
    cls = get_method_class(cfg["method"])
    if "cpu-small" not in cls.config_sets():
        return None
    ref = _configured_steps(get_method(cfg["method"], **cls.config_set("cpu-small")).params)
    return _configured_steps(cfg.get("params") or {}) / ref if ref else None


def _synthetic_ap(run: Path, cache: Path) -> float:
    """``mean_pixel_ap`` of :func:`~medanomaly.app.validate.validate_run` (default tasks, seed 0), cached."""
    from medanomaly.app.validate import validate_run

    f = cache / "synthetic_validation.json"
    rec = json.loads(f.read_text()) if f.is_file() else validate_run(run, cache, force=True, quiet=True)
    return float(rec["mean_pixel_ap"])


def _fmt_budget(b: float | None) -> str:
    return "" if b is None else f"{b:g}x"


def _setting(label: str) -> str:
    """The setting a point belongs to: its label without a trailing seed suffix ``-sK``."""
    return re.sub(r"-s\d+$", "", label)


def seed_groups(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, sample std and count of every numeric ``keys`` column over the seeds of each setting with >= 2 seeds."""
    settings: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        settings.setdefault(_setting(r["label"]), []).append(r)
    out = []
    for name, rs in settings.items():
        if len(rs) < 2:
            continue
        g: dict[str, Any] = {"setting": name, "seeds": [r["label"] for r in rs], "budget": rs[0].get("budget")}
        for k in keys:
            vals = [float(r[k]) for r in rs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if len(vals) == len(rs):
                g[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals), "n": len(vals)}
        out.append(g)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("points", nargs="+", help="LABEL=RUN:EVAL[:EVAL2]")
    p.add_argument("--family", default="")
    p.add_argument("--tests", default="test,other", help="names of the two test sets, comma-separated")
    p.add_argument("--figure", default=None, help="figure path (default: OUT.png)")
    p.add_argument("--reference", default=None, metavar="TEST=AP,...",
                   help="a reference pixel AP per test set (e.g. plain intensity's), drawn as a dashed line")
    p.add_argument("--reference-name", default="intensity", help="what the reference is (default: intensity)")
    p.add_argument("--validate-dir", default=None, help="also score every run with `medanomaly validate` (cached here)")
    a = p.parse_args()
    names = a.tests.split(",")
    refs: dict[str, float] = {}
    for item in (a.reference.split(",") if a.reference else []):
        name, eq, val = item.partition("=")
        try:
            refs[name] = float(val)
        except ValueError:
            p.error(f"--reference {item!r}: expected TEST=AP")
        if not eq or name not in names:
            p.error(f"--reference {item!r}: expected TEST=AP with TEST among --tests {names}")
    rows = []
    for spec in a.points:
        label, eq, rest = spec.partition("=")
        run, *evals = rest.split(":")
        if not eq or not label or not run or not evals:
            p.error(f"point {spec!r}: expected LABEL=RUN_DIR:EVAL_DIR[:EVAL_DIR2]")
        missing = [f for f in [Path(run) / "config.yaml", Path(run) / "state.json",
                               *(Path(e) / "metrics.json" for e in evals)] if not f.is_file()]
        if missing:
            p.error(f"point {label!r}: not a finished run / evaluation: {', '.join(map(str, missing))} missing")
        cfg = yaml.safe_load((Path(run) / "config.yaml").read_text())
        row: dict[str, Any] = {"label": label, "run": run, "budget": _budget(cfg),
                               "train_seconds": _train_seconds(Path(run)), **_label_free(Path(run))}
        if a.validate_dir:
            try:
                row["synthetic_ap"] = _synthetic_ap(Path(run), Path(a.validate_dir) / label)
            except (OSError, ValueError, KeyError) as e:
                p.error(f"point {label!r}: medanomaly validate failed on {run}: {e}")
        for name, ev in zip(names, evals, strict=False):
            m = json.loads((Path(ev) / "metrics.json").read_text())
            for k in ("pixel_ap", "best_dice", "calibrated_dice", "sample_auroc"):
                row[f"{name}_{k}"] = m.get(k)
        rows.append(row)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["label", "budget", "train_seconds", "steps", "label_free", "members", "synthetic_ap"] + [
        f"{n}_{k}" for n in names for k in ("pixel_ap", "best_dice", "calibrated_dice", "sample_auroc")]
    keys = [k for k in keys if any(k in r for r in rows)]

    def fmt(v: Any, k: str = "") -> str:
        if k == "budget":
            return _fmt_budget(v)
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# Scale study: {a.family}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k), k) for k in keys) + " |" for r in rows]
    stat_keys = [k for k in keys if k == "synthetic_ap" or k == "label_free" or k.endswith(
        ("_pixel_ap", "_best_dice", "_calibrated_dice", "_sample_auroc"))]
    groups = seed_groups(rows, stat_keys)
    if groups:
        gkeys = [k for k in stat_keys if any(k in g for g in groups)]
        lines += ["", "Mean ± std over seeds (settings with two or more seeds):", "",
                  "| setting | budget | seeds | " + " | ".join(gkeys) + " |", "|" + "---|" * (len(gkeys) + 3)]
        lines += [f"| {g['setting']} | {_fmt_budget(g['budget'])} | {len(g['seeds'])} | " + " | ".join(
            f"{g[k]['mean']:.3f} ± {g[k]['std']:.3f}" if k in g else "" for k in gkeys) + " |" for g in groups]
    lines += ["", "Runs: " + "; ".join(f"{r['label']}: `{r['run']}`" for r in rows), ""]
    if refs:
        lines += [f"Reference ({a.reference_name}) pixel AP: " + ", ".join(f"{k} {v:.3f}" for k, v in refs.items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    (out.with_suffix(".json")).write_text(json.dumps({"points": rows, "seed_groups": groups}, indent=1, default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["budget"] if r["budget"] is not None else 1.0 for r in rows]
    lf_key = "synthetic_ap" if a.validate_dir else "label_free"
    lf_kind = "synthetic val pixel AP (medanomaly validate)" if a.validate_dir else rows[0]["label_free_kind"]
    # one annotation per setting: a seed group is named once, at its first seed, with its seed count
    n_seeds = {g["setting"]: len(g["seeds"]) for g in groups}
    tags: list[str | None] = []
    for r in rows:
        name = _setting(r["label"])
        first = next(q for q in rows if _setting(q["label"]) == name) is r
        tags.append((f"{name} ({n_seeds[name]} seeds)" if name in n_seeds else r["label"]) if first else None)
    for i, r in enumerate(rows):
        if r.get(lf_key) is not None:
            ax[0].scatter(xs[i], r[lf_key], color="C0", s=14)
            if tags[i]:
                ax[0].annotate(tags[i], (xs[i], r[lf_key]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        for j, n in enumerate(names):
            if r.get(f"{n}_pixel_ap") is not None:
                ax[1].scatter(xs[i], r[f"{n}_pixel_ap"], color=f"C{j + 1}", s=14, label=n if i == 0 else None)
                if tags[i]:
                    ax[1].annotate(tags[i], (xs[i], r[f"{n}_pixel_ap"]), fontsize=7, xytext=(4, 2),
                                   textcoords="offset points")
    xlabel = "optimiser steps (x cpu-small)"
    ax[0].set(xlabel=xlabel, ylabel=lf_kind, title="label-free", xscale="log")
    ax[1].set(xlabel=xlabel, ylabel="test pixel AP", title="test (reported, not used to choose)", xscale="log")
    for axis in ax:
        axis.set_xticks(sorted(set(xs)), [_fmt_budget(x) for x in sorted(set(xs))])
        axis.minorticks_off()
    for g in groups:
        x = g["budget"] if g["budget"] is not None else 1.0
        for axis, k in [(ax[0], lf_key)] + [(ax[1], f"{n}_pixel_ap") for n in names]:
            if k in g:
                axis.errorbar(x, g[k]["mean"], yerr=g[k]["std"], fmt="_", color="k", capsize=4, ms=12, zorder=3)
    for j, n in enumerate(names):
        if n in refs:
            ax[1].axhline(refs[n], color=f"C{j + 1}", ls="--", lw=1, label=f"{n}: {a.reference_name}")
    ax[1].legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(a.family, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.figure or out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
