"""Before/after figure of the brain preprocessing on a skull-on (LGG) and a skull-stripped (BraTS) scan (issue 13).

For each scan, the axial slice with the most lesion: the raw input; the ``brain-mri-2d`` preset with
``foreground="brain"`` (the LGG runs' setting) as it was before skull-stripped input was detected (the morphological
skull strip on every scan); and as it is now. The BraTS volume is shown as distributed and z-scored over the brain
(background 0 in the middle of the brain's values, as many challenge pipelines ship it). The foreground is outlined
in cyan, the lesion in red; each panel says how much of the head the foreground covers in the scored slices, how
many lesion voxels fall outside the evaluated area and how many slices are dropped. On LGG both are the same
(bit-identical).

    python benchmarks/preprocessing_figure.py            # -> docs/figures/preprocessing_before_after.png

Needs the shared data (``MEDANOMALY_DATA`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medanomaly.data import data_root, get_preset
from medanomaly.data.geometry import volume_to_slices
from medanomaly.data.io import read_image, read_lgg_npz, read_mask
from medanomaly.data.masks import brain_mask, foreground_mask

LGG_PATIENT = "TCGA_CS_6666_20011109"  # a test patient
BRATS_CASE = "case_0"


def _old_strip(slices: np.ndarray) -> np.ndarray:
    """``foreground="brain"`` before issue 13: the morphological skull strip on every scan."""
    a = np.asarray(slices, np.float32)
    return brain_mask(a, head=foreground_mask(a, slice_axis=0), slice_axis=0)


def _run(slices: np.ndarray, lesion: np.ndarray, size: int) -> dict[str, object]:
    """The preset now and as it was (the old strip passed in as the brain mask gives exactly the old pipeline)."""
    new = get_preset("brain-mri-2d", size=size, foreground="brain").apply_slices(slices, lesion)
    old = get_preset("brain-mri-2d", size=size, foreground="mask").apply_slices(slices, lesion, brain=_old_strip(slices))
    return {"new": new, "old": old}


def _stats(st: object) -> dict[str, float]:
    keep = np.asarray(st.keep, bool)
    m, fg = st.masks[:, 0], st.foreground[:, 0]
    total = int(m.sum())
    outside = int(m[~keep].sum() + (m[keep] & ~fg[keep]).sum())
    return {"coverage": float(st.meta["foreground"].get("kept_coverage", 1.0)),
            "lesion_outside": outside / max(total, 1), "dropped": int((~keep).sum()), "slices": len(keep),
            "source": st.meta["foreground"]["source"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/figures/preprocessing_before_after.png"))
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = data_root()
    lgg = read_lgg_npz(root / "brain_lgg_flair_2d" / "volumes" / f"{LGG_PATIENT}.npz")
    case = root / "brain_brats2018_3d" / BRATS_CASE
    img, gt = read_image(case / "FLAIR.nii.gz"), read_mask(case / "GT_W.nii.gz")
    brats = volume_to_slices(img.array, img.affine)
    brain = brats != 0
    z = np.where(brain, (brats - brats[brain].mean()) / brats[brain].std(), 0).astype(np.float32)
    scans = [("LGG FLAIR (skull-on)", lgg.array.astype(np.float32), np.asarray(lgg.meta["mask"]) > 0),
             ("BraTS 2018 FLAIR (skull-stripped)", brats, volume_to_slices(gt.array, gt.affine)),
             ("same, z-scored over the brain (background 0)", z, volume_to_slices(gt.array, gt.affine))]
    fig, axes = plt.subplots(len(scans), 3, figsize=(12, 4.3 * len(scans)))
    record = {}
    for row, (name, slices, lesion) in enumerate(scans):
        res = _run(slices, lesion, args.size)
        k = int(np.argmax(lesion.reshape(len(lesion), -1).sum(1)))
        raw = slices[k]
        ax = axes[row, 0]
        ax.imshow(raw, cmap="gray", vmin=float(np.percentile(raw, 0.5)), vmax=float(np.percentile(raw, 99.5)))
        ax.contour(lesion[k], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{name}\nraw input, slice {k} of {len(slices)}", fontsize=9)
        record[name] = {}
        for col, key in ((1, "old"), (2, "new")):
            st = res[key]
            s = _stats(st)
            record[name][key] = s
            ax = axes[row, col]
            ax.imshow(st.images[k, 0], cmap="gray", vmin=0, vmax=1)
            if st.foreground[k, 0].any():
                ax.contour(st.foreground[k, 0], levels=[0.5], colors="cyan", linewidths=0.8)
            if st.masks[k, 0].any():
                ax.contour(st.masks[k, 0], levels=[0.5], colors="red", linewidths=0.8)
            when = "before (morphological strip on every scan)" if key == "old" else "now (skull-stripped input detected)"
            src = "morphological skull strip" if key == "old" else s["source"]
            ax.set_title(f"foreground='brain', {when}\n{src}", fontsize=9)
            ax.set_xlabel(f"covers {100 * s['coverage']:.0f} % of the head; {100 * s['lesion_outside']:.1f} % of lesion "
                          f"outside;\n{s['dropped']} of {s['slices']} slices dropped"
                          + ("" if st.keep[k] else " (this one too)"), fontsize=8.5)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("brain-mri-2d preprocessing (160 px, [0, 1], background exactly 0): cyan = foreground scored, "
                 "red = lesion", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
