"""2D runs scored on whole BraTS 2018 volumes: each volume through ``medanomaly predict`` (axial slices, the map put
back on the volume's own 1 mm grid), voxel metrics over the whole brain of each volume against the whole-tumour mask.

This is the "as volumes" view of the cross-dataset benchmark (issue 13): unlike ``--data brats2018-3d:view=slices``
(metrics on the 64 px slices the preset keeps), every brain voxel of the native grid counts, including those in slices
the 2D preset drops (their score is 0) and the detail lost by the 64 px maps. Brain = the volume's nonzero voxels
(BraTS is skull-stripped). The calibrated mask is the run's ``--threshold fpr=0.01`` mask (healthy validation only).

    python benchmarks/volumes_2d_runs.py OUT intensity=out/lgg64_seeds/runs/seed-0/intensity \\
        multitask=out/lgg64_seeds/runs/seed-0/multitask [--modality flair|t1] [--cases 0-9]

Writes ``OUT/volume_metrics.json`` and ``OUT/volume_metrics.md`` (one row per run: voxel AP, AUROC, best DICE,
calibrated DICE/precision/recall/FPR, mean per-case AP, seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _cases(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(t) for t in text.split(",")]


def score_run(run: str, root: Path, cases: list[int], modality: str, out: Path) -> dict[str, object]:
    from medanomaly.app.predict import predict_files
    from medanomaly.evaluation.metrics import pixel_metrics

    files = [root / f"case_{k}" / f"{modality.upper()}.nii.gz" for k in cases]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    maps = predict_files(run, files, out, threshold="fpr=0.01", force=True, quiet=True)
    secs = time.perf_counter() - t0
    S, M, F, C = [], [], [], []
    for f, mp in zip(files, maps, strict=True):
        img = np.asarray(nib.load(str(f)).dataobj, dtype=np.float32)
        gt = np.asarray(nib.load(str(f.parent / "GT_W.nii.gz")).dataobj) > 0
        amap = np.asarray(nib.load(str(mp)).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(str(mp).replace("_anomaly.nii.gz", "_mask.nii.gz")).dataobj) > 0
        if amap.shape != img.shape:
            raise SystemExit(f"{mp}: map shape {amap.shape} != volume {img.shape}")
        S.append(amap), M.append(gt), F.append(img != 0), C.append(mask)
    S_, M_, F_, C_ = (np.stack(a) for a in (S, M, F, C))
    pm = pixel_metrics(S_, M_, foreground=F_, case_ids=[str(k) for k in cases])
    tp = float((C_ & M_ & F_).sum())
    fp = float((C_ & ~M_ & F_).sum())
    fn = float((~C_ & M_ & F_).sum())
    return {
        "run": run, "n_volumes": len(cases), "voxel_ap": pm["ap"], "voxel_auroc": pm["auroc"], "best_dice": pm["best_dice"],
        "ap_per_case_mean": pm.get("ap_per_case_mean"),
        "calibrated_dice": 2 * tp / max(2 * tp + fp + fn, 1.0), "calibrated_precision": tp / max(tp + fp, 1.0),
        "calibrated_recall": tp / max(tp + fn, 1.0), "calibrated_fpr": fp / max(float((~M_ & F_).sum()), 1.0),
        "lesion_voxels_unscored": float((M_ & F_ & (S_ == 0)).sum() / max(float((M_ & F_).sum()), 1.0)),
        "predict_seconds": secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (2D brain runs)")
    ap.add_argument("--modality", default="flair", choices=["flair", "t1"])
    ap.add_argument("--cases", default="0-9")
    ap.add_argument("--root", default=None, help="the brain_brats2018_3d folder (default: from MEDANOMALY_DATA)")
    a = ap.parse_args()
    from medanomaly.data.roots import find_data_root

    root = Path(a.root) if a.root else (find_data_root(require="brain_brats2018_3d")[0] / "brain_brats2018_3d")
    out = Path(a.out)
    rows = []
    for spec in a.runs:
        label, run = spec.split("=", 1)
        rec = score_run(run, root, _cases(a.cases), a.modality, out / label)
        rec["label"] = label
        rows.append(rec)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "volume_metrics.json").write_text(json.dumps(rows, indent=1))
    keys = ["voxel_ap", "voxel_auroc", "best_dice", "calibrated_dice", "calibrated_precision", "calibrated_recall",
            "calibrated_fpr", "ap_per_case_mean", "lesion_voxels_unscored", "predict_seconds"]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    (out / "volume_metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
