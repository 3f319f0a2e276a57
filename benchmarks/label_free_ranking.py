"""Can a user choose a method or a seed without lesion labels? Label-free synthetic validation against the test split.

For every run of a ``medanomaly benchmark --seeds`` folder (``OUT/runs/seed-<k>/<label>``, with its test evaluation
``OUT/eval/seed-<k>/<label>/metrics.json``), runs :func:`medanomaly.app.validate.validate_run` (synthetic anomalies
in the run's own healthy validation images; no lesion label) and caches it in ``OUT/validate/seed-<k>/<label>``.
Then it writes ``PREFIX.md`` / ``PREFIX.json`` and a scatter figure ``PREFIX.png``:

- per label: the mean over seeds of the label-free scores (``unseen_pixel_ap``: FPI and CutPaste, which no method
  trains on; ``mean_pixel_ap``: all tasks) beside the test pixel AP;
- across labels (their seed means): Spearman's rho of each label-free score with the test pixel AP, with and
  without the labels that read intensity only (``--no-learn``, default ``intensity``: such a map has no training
  to validate);
- within each label with >= 3 seeds: whether the label-free best seed is the test-best seed.

Test numbers are read only to report how well the label-free scores would have chosen. Example::

    python benchmarks/label_free_ranking.py out/lgg64_cpu_long docs/results/label_free_lgg64_cpu_long \\
        --title "LGG FLAIR 64 px, cpu-long"
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

SCORES = ("unseen_pixel_ap", "mean_pixel_ap")


def runs(out: Path, labels: list[str] | None) -> list[tuple[int, str, Path, Path]]:
    """(seed, label, run folder, test metrics.json) for every finished and evaluated run."""
    found = []
    for d in sorted((out / "runs").glob("seed-*")):
        if not re.fullmatch(r"seed-\d+", d.name):
            continue
        k = int(d.name.split("-")[1])
        for r in sorted(d.iterdir()):
            m = out / "eval" / d.name / r.name / "metrics.json"
            if (labels is None or r.name in labels) and (r / "finished.json").is_file() and m.is_file():
                found.append((k, r.name, r, m))
    if not found:
        raise SystemExit(f"{out}: no finished, evaluated runs under runs/seed-<k>/ with eval/seed-<k>/<label>/metrics.json")
    return found


def validated(run: Path, cache: Path, max_images: int | None, draws: int, seed: int) -> dict[str, Any]:
    from medanomaly.app.validate import validate_run

    f = cache / "synthetic_validation.json"
    if f.is_file():
        rec = json.loads(f.read_text())
        if rec.get("max_images") == max_images and rec.get("draws") == draws and rec.get("seed") == seed:
            return rec
    return validate_run(run, cache, max_images=max_images, draws=draws, seed=seed, force=True, quiet=True)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:  # undefined for fewer than 3 points or a constant
        return float("nan")
    return float(spearmanr(a, b)[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a `medanomaly benchmark --seeds` output folder")
    p.add_argument("prefix", type=Path, help="write PREFIX.md, PREFIX.json and PREFIX.png")
    p.add_argument("--labels", help="comma-separated labels (default: every label found)")
    p.add_argument("--no-learn", default="intensity,intensity-dark",
                   help="labels with nothing learnt, left out of the second correlation")
    p.add_argument("--max-images", type=int, default=None, help="validation images per run (evenly spaced)")
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    rows = []
    for k, label, run, mfile in runs(a.out, labels):
        v = validated(run, a.out / "validate" / f"seed-{k}" / label, a.max_images, a.draws, a.seed)
        t = json.loads(mfile.read_text())
        rows.append({"seed": k, "label": label, "test_pixel_ap": t.get("pixel_ap"),
                     **{s: v.get(s) for s in SCORES}, "validate_seconds": v["seconds"]["total"]})
        print(json.dumps(rows[-1]), flush=True)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    table = []
    for label, rs in by.items():
        table.append({"label": label, "seeds": len(rs), **{c: float(np.mean([r[c] for r in rs]))
                                                          for c in ("test_pixel_ap", *SCORES)}})
    no_learn = set(a.no_learn.split(",")) if a.no_learn else set()
    corr = {}
    for s in SCORES:
        corr[s] = {"all": spearman([r[s] for r in table], [r["test_pixel_ap"] for r in table]),
                   "learned": spearman([r[s] for r in table if r["label"] not in no_learn],
                                       [r["test_pixel_ap"] for r in table if r["label"] not in no_learn])}
    seeds = {}
    for label, rs in by.items():
        if len(rs) >= 3:
            seeds[label] = {s: {"label_free_best_seed": max(rs, key=lambda r, s=s: r[s])["seed"],
                                "test_best_seed": max(rs, key=lambda r: r["test_pixel_ap"])["seed"],
                                "rho": spearman([r[s] for r in rs], [r["test_pixel_ap"] for r in rs])}
                        for s in SCORES}
    a.prefix.parent.mkdir(parents=True, exist_ok=True)
    rec = {"source": str(a.out), "title": a.title, "max_images": a.max_images, "draws": a.draws, "seed": a.seed,
           "rows": rows, "table": table, "spearman_across_labels": corr, "seed_choice": seeds}
    a.prefix.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    lines = [f"# Label-free synthetic validation against the test split: {a.title}", "",
             f"Source `{a.out}`; `python benchmarks/label_free_ranking.py {a.out} {a.prefix}` "
             f"(max_images={a.max_images}, draws={a.draws}, seed={a.seed}). Means over seeds.", "",
             "| method | seeds | label-free unseen-task pixel AP (FPI, CutPaste) | label-free all-task pixel AP "
             "| test pixel AP |", "|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: -r["test_pixel_ap"]):
        lines.append(f"| {r['label']} | {r['seeds']} | {r['unseen_pixel_ap']:.3f} | {r['mean_pixel_ap']:.3f} | "
                     f"{r['test_pixel_ap']:.3f} |")
    lines += ["", "Spearman's rho with the test pixel AP across methods (seed means):", ""]
    for s in SCORES:
        lines.append(f"- `{s}`: all methods {corr[s]['all']:.2f}; learned methods only {corr[s]['learned']:.2f}")
    if seeds:
        lines += ["", "Choosing a seed (methods with >= 3 seeds): label-free best seed / test-best seed (rho)", "",
                  "| method | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES)]
        for label, d in seeds.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{d[s]['label_free_best_seed']} / {d[s]['test_best_seed']} ({d[s]['rho']:.2f})" for s in SCORES) + " |")
    a.prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _figure(a.prefix.with_suffix(".png"), rows, a.title)
    print("\n".join(lines))


def _figure(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORES), figsize=(5.2 * len(SCORES), 4.4), squeeze=False)
    labels = sorted({r["label"] for r in rows})
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for ax, s in zip(axes[0], SCORES, strict=True):
        for i, lab in enumerate(labels):
            rs = [r for r in rows if r["label"] == lab]
            ax.scatter([r[s] for r in rs], [r["test_pixel_ap"] for r in rs], color=cmap(i), label=lab, s=28)
        ax.set_xlabel(f"label-free {s} (synthetic anomalies, healthy val)")
        ax.set_ylabel("test pixel AP (real lesions)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"label-free validation vs test, one point per run: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
