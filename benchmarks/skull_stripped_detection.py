"""Skull-stripped detection on every shared brain volume: the decision and the edge/interior ratio per scan.

Reads LGG FLAIR (per-patient .npz slice stacks, in-plane as the brain-mri-2d preset does), IXI T1 and BraTS 2018
FLAIR/T1 from the shared data and prints one line per scan plus the range of ``edge_ratio`` per set (the README's
"<= 0.33 skull-on, >= 0.74 skull-stripped")::

    python benchmarks/skull_stripped_detection.py            # MEDANOMALY_DATA or ../shared/data
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medanomaly.data.io import read_image, read_lgg_npz
from medanomaly.data.masks import detect_skull_stripped
from medanomaly.data.roots import data_root


def main() -> None:
    root = Path(data_root())
    sets = {
        "lgg-flair (skull-on)": sorted((root / "brain_lgg_flair_2d" / "volumes").glob("*.npz")),
        "ixi-t1 (skull-on)": sorted((root / "brain_ixi_t1_3d" / "t1").glob("*.nii*")),
        "brats-flair (stripped)": sorted((root / "brain_brats2018_3d").glob("case_*/FLAIR.nii.gz")),
        "brats-t1 (stripped)": sorted((root / "brain_brats2018_3d").glob("case_*/T1.nii.gz")),
    }
    for name, files in sets.items():
        ratios, decisions = [], []
        for f in files:
            ld = read_lgg_npz(f) if f.suffix == ".npz" else read_image(f, allow_constant=True)
            arr = np.asarray(ld.array)
            r = detect_skull_stripped(arr, 0 if f.suffix == ".npz" else None)  # LGG: (S, H, W) slices, as the preset
            ratios.append(np.nan if r["edge_ratio"] is None else float(r["edge_ratio"]))
            decisions.append(bool(r["skull_stripped"]))
            print(f"{name:24s} {f.parent.name}/{f.name:28s} stripped={r['skull_stripped']!s:5s} edge_ratio={r['edge_ratio']}")
        finite = [x for x in ratios if np.isfinite(x)]
        span = f"{min(finite):.3f}..{max(finite):.3f}" if finite else "n/a"
        print(f"== {name}: {len(files)} scans, {sum(decisions)} taken as skull-stripped, edge_ratio {span}")


if __name__ == "__main__":
    main()
