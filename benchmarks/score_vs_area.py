"""Label-free check of a 2D brain run: does its image score follow the brain area on healthy validation slices?

On the tumour-free slices of the ``val`` patients (no lesion label is read), prints the Spearman correlation of the
run's image score with the foreground area, and the mean map at the brain's edge (within 3 px of the foreground
border) over its interior. A strong negative correlation means small slices (top and bottom of the head) score
highest whatever their content. Used for patchcore's inverted slice scores (README, Results)::

    python benchmarks/score_vs_area.py out/lgg64_seeds/runs/seed-0/patchcore out/lgg64_seeds/runs/seed-0/multitask
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.stats import spearmanr

from medanomaly.app.predict import load_run
from medanomaly.data import load_dataset, stack_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (2D, lgg-flair-2d preset)")
    p.add_argument("--data", default="lgg-flair-2d")
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    val = stack_dataset(load_dataset(args.data, "val", normal_only=True, size=args.size))
    fg = val["foreground"].numpy()[:, 0]
    area = fg.reshape(len(fg), -1).sum(1)
    edge = np.stack([f & ~binary_erosion(f, iterations=3) for f in fg])
    for run in args.runs:
        det, _ = load_run(run)
        res = det.predict(val["image"], val["foreground"])
        m = res.pixel_scores.numpy()
        rho = spearmanr(res.image_scores.numpy(), area)[0]
        ratio = float(m[edge].mean() / m[fg & ~edge].mean())
        print(f"{run}: {len(fg)} healthy val slices, spearman(image score, brain area) {rho:.3f}, "
              f"map edge/interior {ratio:.3f}")


if __name__ == "__main__":
    main()
