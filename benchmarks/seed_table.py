"""Mean ± std table from the per-seed evaluations a ``medanomaly benchmark --seeds`` run left behind, also when the
run was stopped before it wrote ``comparison.md`` (or when seeds were run by separate commands).

Reads ``OUT/eval/seed-<k>/<label>/metrics.json`` for every seed folder and label present, and writes
``<name>.md/.csv/.html`` (mean ± std over the seeds each label has; per-seed rows in the CSV) with the same table
writer as the benchmark. Example::

    python benchmarks/seed_table.py out/lgg64_seeds docs/results/lgg64_seeds --labels intensity,autoencoder,patchcore,multitask
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from medanomaly.evaluation.table import aggregate_seeds, write_comparison_table

#: metrics.json keys shown, in order (the benchmark table's columns without the run bookkeeping)
COLUMNS = ("pixel_ap", "pixel_auroc", "best_dice", "calibrated_dice", "calibrated_precision", "calibrated_recall",
           "calibrated_fpr", "sample_ap", "sample_auroc", "train_seconds", "seconds_per_image")


def _train_seconds(m: dict[str, Any]) -> float | None:
    """The run's train seconds as the evaluation reports them now (a resumed run: summed over its sessions), read
    from the run folder when it is still there; else what ``metrics.json`` recorded (older evaluations of a
    resumed run recorded only the last session's)."""
    from medanomaly.run_folder import RunFolder, RunFolderError

    run = m.get("run")
    if run and Path(run).is_dir():
        try:
            return RunFolder(run).train_seconds()[0]
        except RunFolderError:
            pass
    return m.get("train_seconds")


def collect(out: Path, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """Per-seed rows (label, seed, metrics) from ``out/eval/seed-<k>/<label>/metrics.json``, seeds in order."""
    rows: list[dict[str, Any]] = []
    seed_dirs = sorted((d for d in (out / "eval").glob("seed-*") if re.fullmatch(r"seed-\d+", d.name)),
                       key=lambda d: int(d.name.split("-")[1]))
    if not seed_dirs:
        raise SystemExit(f"{out}/eval holds no seed-<k> folders")
    for d in seed_dirs:
        k = int(d.name.split("-")[1])
        names = labels or sorted(p.name for p in d.iterdir() if (p / "metrics.json").is_file())
        for lab in names:
            f = d / lab / "metrics.json"
            if not f.is_file():
                continue
            m = json.loads(f.read_text())
            row = {"method": lab, "seed": k, **{c: m.get(c) for c in COLUMNS}}
            row["train_seconds"] = _train_seconds(m)
            rows.append(row)
    if not rows:
        raise SystemExit(f"no metrics.json under {out}/eval/seed-*/")
    if labels:
        order = {lab: i for i, lab in enumerate(labels)}
        rows.sort(key=lambda r: (order[r["method"]], r["seed"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the benchmark's --out folder")
    p.add_argument("dest", type=Path, help="output path without suffix (e.g. docs/results/lgg64_seeds)")
    p.add_argument("--labels", default=None, help="comma-separated labels, in table order (default: all found)")
    p.add_argument("--title", default="medanomaly benchmark, mean ± std over seeds")
    args = p.parse_args()
    rows = collect(args.out, args.labels.split(",") if args.labels else None)
    summary = aggregate_seeds(rows)
    md, _, _ = write_comparison_table(summary, args.dest.parent, name=args.dest.name, title=args.title, csv_rows=rows)
    print(md.read_text())


if __name__ == "__main__":
    main()
