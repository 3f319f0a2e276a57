"""Chest X-ray at real resolution (issue 13): the MAE family and the autoencoder on ``cxr-kermany-256`` at 128 px.

Two steps, both deterministic:

    python benchmarks/cxr_kermany.py prepare out/cxr          # manifests + the test split as JPEG and as DICOM
    D=out/cxr/kermany_pool.csv:preset=cxr
    medanomaly benchmark -m autoencoder,mae,amae,mae-pseudo -d $D --size 128 -b 32 --seeds 0,1,2 \\
        --set amae.stage2.unlabeled_data=$D --set amae.stage2.unlabeled_split=pool \\
        $(for m in mae amae mae-pseudo; do echo --set $m.mae.img_size=128 --set $m.mae.patch_size=16; done) \\
        --set mae-pseudo.classifier.patch_size=16 --out out/cxr/bench --resume
    python benchmarks/cxr_kermany.py table out/cxr --bench out/cxr/bench --seeds 0,1,2 --md docs/results/cxr_kermany_128.md

The MAE family runs at 128 px with 16 px patches (the same 8 x 8 = 64 tokens as cpu-small's 64 px / 8 px), so its
cost per step is that of cpu-small; the autoencoder is convolutional and takes the 128 px images as they are.

``prepare`` splits the 280 normal train images by patient (seeded) into the normal training set T_n (180 images)
and 100 normals for AMAE's unlabeled pool, which also gets 67 of the 200 ``train-pneumonia`` images (40 % anomalies,
the ratio AMAE did best at on PneumoniaMNIST here). The pool is disjoint from T_n, so no method trains on an image
that is then pseudo-labelled; every method trains on the same T_n. Validation: the 50 normal ``val`` images; test:
the 100 + 100 ``test`` images, whose labels are read only for the reported metrics.

The same test images are also written as JPEG (quality 90) and as DICOM (12-bit MONOCHROME1 with a rescale and a
window, as a CR/DX file usually is) at their stored size (shorter side 256 px, aspect kept). ``table`` evaluates every
run on all three and prints sample AUROC / AP per format: the ``cxr`` preset (window, histogram equalisation, resize,
which stretches the radiograph to a square) must give the same answer whatever the file format.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

POOL_NORMALS = 100
POOL_RATIO = 0.4
FORMATS = ("png", "jpeg", "dicom")


def _kermany_root() -> Path:
    from medanomaly.data.roots import data_root

    return Path(data_root()) / "cxr_kermany_256"


def _records(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_pool(recs: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Records re-split: train (T_n), val, test as given; ``pool`` = POOL_NORMALS train normals (whole patients)
    + pneumonia images for a POOL_RATIO anomaly ratio. Labels are copied, never used to build T_n."""
    rng = np.random.default_rng(seed)
    normals = [r for r in recs if r["split"] == "train"]
    patients = sorted({r["patient_id"] for r in normals})
    rng.shuffle(patients)
    pool_pat: set[str] = set()
    n = 0
    for p in patients:
        if n >= POOL_NORMALS:
            break
        pool_pat.add(p)
        n += sum(r["patient_id"] == p for r in normals)
    pneu = [r for r in recs if r["split"] == "train-pneumonia"]
    n_abn = int(round(POOL_RATIO / (1 - POOL_RATIO) * n))
    pick = {pneu[i]["case_id"] for i in rng.choice(len(pneu), size=min(n_abn, len(pneu)), replace=False)}
    out = []
    for r in recs:
        r = dict(r)
        if r["split"] == "train" and r["patient_id"] in pool_pat:
            r["split"] = "pool"
        elif r["split"] == "train-pneumonia":
            if r["case_id"] not in pick:
                continue
            r["split"] = "pool"
        out.append(r)
    return out


def _write_csv(recs: list[dict[str, str]], path: Path, root: Path, image_key: str = "image") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "image", "label", "split", "patient_id"])
        w.writeheader()
        for r in recs:
            img = Path(r[image_key])
            w.writerow({"case_id": r["case_id"], "image": str(img if img.is_absolute() else (root / img).resolve()),
                        "label": r["label"], "split": r["split"], "patient_id": r["patient_id"]})


def write_cxr_dicom(img8: np.ndarray, path: Path, case_id: str) -> None:
    """A 12-bit MONOCHROME1 CR-like DICOM of an 8-bit radiograph (stored = 4095 - 16 * value, rescale + window)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.BodyPartExamined = "CR", case_id, "CHEST"
    ds.Rows, ds.Columns = int(img8.shape[0]), int(img8.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelData = (4095 - img8.astype(np.uint16) * 16).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def prepare(out: Path, seed: int) -> None:
    from PIL import Image

    root = _kermany_root()
    recs = split_pool(_records(root), seed)
    _write_csv(recs, out / "kermany_pool.csv", root)
    test = [r for r in recs if r["split"] == "test"]
    for fmt in ("jpeg", "dicom"):
        rows = []
        for r in test:
            img = np.asarray(Image.open(root / r["image"]).convert("L"))
            dst = out / fmt / f"{r['case_id']}.{'jpg' if fmt == 'jpeg' else 'dcm'}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "jpeg":
                Image.fromarray(img).save(dst, quality=90)
            else:
                write_cxr_dicom(img, dst, r["case_id"])
            rows.append({**r, "image": str(dst.resolve())})
        _write_csv(rows, out / f"kermany_test_{fmt}.csv", root)
    counts = {s: sum(r["split"] == s for r in recs) for s in ("train", "val", "test", "pool")}
    abn = sum(r["split"] == "pool" and r["label"] == "1" for r in recs)
    print(f"wrote {out}/kermany_pool.csv {counts} (pool: {abn} pneumonia = {abn / counts['pool']:.0%}), "
          f"and the {len(test)} test images as JPEG and DICOM")


def _data_for(out: Path, fmt: str) -> str:
    return str(out / ("kermany_pool.csv" if fmt == "png" else f"kermany_test_{fmt}.csv"))


def table(out: Path, bench: Path, seeds: list[int], md: Path | None) -> None:
    rows = []
    for seed in seeds:
        folder = bench / "runs" / f"seed-{seed}"
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder; run the benchmark of the docstring with --out {bench} and "
                             f"--seeds {seed} first")
        for run in sorted(folder.iterdir()):
            if not (run / "config.yaml").exists():
                continue
            row = {"seed": seed, "method": run.name}
            for fmt in FORMATS:
                # PNG: the benchmark's own evaluation; JPEG / DICOM: the same run through `medanomaly evaluate`
                ev = (bench / "eval" / f"seed-{seed}" / run.name if fmt == "png"
                      else out / "eval" / f"seed-{seed}" / run.name / fmt)
                if not (ev / "metrics.json").exists():
                    cli = str(Path(sys.executable).with_name("medanomaly"))
                    subprocess.run([cli, "evaluate", str(run), "--data", _data_for(out, fmt), "--split", "test",
                                    "--out", str(ev), "--force", "--quiet"], check=True)
                m = json.loads((ev / "metrics.json").read_text())
                row[f"{fmt}_auroc"], row[f"{fmt}_ap"] = m["sample_auroc"], m["sample_ap"]
                if fmt == "png":
                    row.update({k: m.get(k) for k in ("calibrated_sensitivity", "calibrated_specificity",
                                                      "train_seconds")})
            rows.append(row)
    lines = ["| seed | method | AUROC PNG | AUROC JPEG | AUROC DICOM | AP PNG | sens. / spec. at image-fpr 0.05 | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['method']} | {r['png_auroc']:.3f} | {r['jpeg_auroc']:.3f} | "
                     f"{r['dicom_auroc']:.3f} | {r['png_ap']:.3f} | {r['calibrated_sensitivity']:.2f} / "
                     f"{r['calibrated_specificity']:.2f} | {r['train_seconds'] or 0:.0f} |")
    text = "\n".join(lines)
    if len(seeds) > 1:
        text = "Mean ± std over the seeds (sample std):\n\n" + mean_table(rows) + "\n\nPer seed:\n\n" + text
    print(text)
    if md is not None:
        head = (f"# Chest X-ray at 128 px: cxr-kermany-256 (issue 13), seeds {','.join(map(str, seeds))}\n\n"
                "Sample AUROC / AP on the Kermany test split (100 normal + 100 pneumonia, patient-disjoint) as stored "
                "(PNG) and re-encoded as JPEG and as DICOM; sensitivity / specificity at the threshold calibrated on "
                "the 50 normal val images (image-fpr=0.05). Made by (see the script's docstring):\n\n```\n"
                + __doc__.split("Two steps, both deterministic:")[1].split("The MAE family runs")[0].strip("\n") + "\n```\n\n")
        md.write_text(head + text + "\n")
        md.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def mean_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± std (sample) over the seeds of each method, per file format."""
    import statistics as st

    out = ["| method | AUROC PNG | AUROC JPEG | AUROC DICOM | AP PNG | sens. / spec. at image-fpr 0.05 | train s |",
           "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]

        def ms(k: str, rs: list[dict[str, Any]] = rs) -> str:
            v = [float(r[k]) for r in rs]
            return f"{st.mean(v):.3f} ± {st.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

        sens = st.mean(float(r["calibrated_sensitivity"]) for r in rs)
        spec = st.mean(float(r["calibrated_specificity"]) for r in rs)
        secs = st.mean(float(r["train_seconds"] or 0) for r in rs)
        out.append(f"| {m} | {ms('png_auroc')} | {ms('jpeg_auroc')} | {ms('dicom_auroc')} | {ms('png_ap')} | "
                   f"{sens:.2f} / {spec:.2f} | {secs:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="manifests and the JPEG/DICOM copies of the test split")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the T_n / pool patient split")
    t = sub.add_parser("table", help="evaluate every run of a benchmark on PNG, JPEG and DICOM; print the table")
    t.add_argument("out", type=Path)
    t.add_argument("--bench", type=Path, required=True)
    t.add_argument("--seeds", default="0")
    t.add_argument("--md", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, a.seed)
    else:
        table(a.out, a.bench, [int(s) for s in a.seeds.split(",")], a.md)


if __name__ == "__main__":
    main()
