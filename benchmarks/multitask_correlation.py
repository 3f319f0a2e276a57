"""MTMLW's central claim: does the synthetic validation score of a fold's model predict its real test score?

Reads the ``results.json`` files written by ``benchmarks/multitask_lgg.py`` or ``benchmarks/multitask_members.py``
(one per T), plots synthetic
validation AP (held-out tasks on held-out folds; no real anomaly) against real test pixel AP per member, and
prints the Spearman rank correlation over all members.

Usage: python benchmarks/multitask_correlation.py OUT.png RESULTS.json [RESULTS.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402


def main(out: Path, files: list[Path]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    xs, ys, ds = [], [], []
    for f in files:
        res = json.loads(Path(f).read_text())
        m = res["members"]
        x = [r["synthetic_val_ap"] for r in m]
        y = [r["pixel_ap"] for r in m]
        d = [r["best_dice"] for r in m]
        t = res.get("T", len(m[0]["train_task_names"]) if m else "?")
        label = f"T={t}" + (f" ({res['data']})" if res.get("data") else "")
        axes[0].scatter(x, y, label=label, s=40)
        axes[1].scatter(x, d, label=label, s=40)
        for r, xi, yi in zip(m, x, y, strict=True):
            axes[0].annotate("+".join(t[:6] for t in r["train_task_names"]), (xi, yi), fontsize=6, alpha=0.7)
        xs += x
        ys += y
        ds += d
    rho_ap, p_ap = spearmanr(xs, ys)
    rho_d, p_d = spearmanr(xs, ds)
    axes[0].set(xlabel="synthetic validation AP (held-out tasks)", ylabel="real test pixel AP",
                title=f"Spearman rho = {rho_ap:.2f} (p = {p_ap:.2f}, n = {len(xs)})")
    axes[1].set(xlabel="synthetic validation AP (held-out tasks)", ylabel="real test best DICE",
                title=f"Spearman rho = {rho_d:.2f} (p = {p_d:.2f}, n = {len(xs)})")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"members: {len(xs)}; spearman(val AP, test pixel AP) = {rho_ap:.3f} (p={p_ap:.3f}); "
          f"spearman(val AP, test best DICE) = {rho_d:.3f} (p={p_d:.3f}); figure: {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
