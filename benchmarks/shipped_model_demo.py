"""The shipped model on real scans, through the command line as a user runs it: ``medanomaly models``, ``predict
--model`` on a NIfTI volume, on a DICOM series and on a BIDS dataset; wall time (start-up included), peak memory and
the files written, into a Markdown table.

    python benchmarks/shipped_model_demo.py brain-flair-2d OUT [--threshold fpr=0.01]

Inputs: BraTS 2018 FLAIR volumes from the shared data (``$MEDANOMALY_DATA`` or ../shared/data). The DICOM series is
the same NIfTI volume written as one MR file per axial slice (synthetic patient/study tags, the volume's geometry),
the BIDS dataset two volumes as ``sub-*/anat/*_FLAIR.nii.gz`` (plus a T1w that the FLAIR model must skip).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_to_dicom_series(src: Path, folder: Path) -> Path:
    """One MR Image Storage file per slice of the NIfTI's third axis, in the NIfTI's world geometry."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(src))
    a = np.asarray(img.dataobj, dtype=np.float32)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    col_sp, row_sp = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    iop = [*(lps[:3, 0] / col_sp), *(lps[:3, 1] / row_sp)]
    scale = 4000.0 / max(float(a.max()), 1e-6)
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(a.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "DEMO001", "Demo^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", 1, k + 1, "FLAIR"
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing, ds.SliceThickness = [row_sp, col_sp], float(np.linalg.norm(lps[:3, 2]))
        px = np.round(np.clip(a[:, :, k].T * scale, 0, 65535)).astype(np.uint16)
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = px.tobytes()
        ds.save_as(str(ds.filename), enforce_file_format=True)
    return folder


def run(cmd: list[str], log: list[str]) -> float:
    """Run a command under /usr/bin/time; append its line to the log; return the wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    peak_mb = int(p.stderr.strip().splitlines()[-1]) / 1024
    log.append(f"| `{' '.join(cmd)}` | {secs:.1f} | {peak_mb:.0f} |")
    return secs


def files(folder: Path) -> list[str]:
    return [f"`{p.relative_to(folder)}` ({p.stat().st_size / 1024:.0f} kB)" for p in sorted(folder.rglob("*")) if p.is_file()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--threshold", default="fpr=0.01")
    args = ap.parse_args()
    data = Path(os.environ.get("MEDANOMALY_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    brats = data / "brain_brats2018_3d"
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "in").mkdir(parents=True)
    nii = out / "in" / "brats_case0_FLAIR.nii.gz"
    shutil.copy(brats / "case_0" / "FLAIR.nii.gz", nii)
    series = nifti_to_dicom_series(nii, out / "in" / "brats_case0_dicom")
    bids = out / "in" / "bids"
    for k in (0, 1):
        anat = bids / f"sub-brats{k}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(brats / f"case_{k}" / "FLAIR.nii.gz", anat / f"sub-brats{k}_FLAIR.nii.gz")
        shutil.copy(brats / f"case_{k}" / "T1.nii.gz", anat / f"sub-brats{k}_T1w.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "BraTS 2018 demo", "BIDSVersion": "1.9.0"}\n')

    log = ["| command | wall s | peak MB |", "|---|---|---|"]
    m = args.model
    run(["medanomaly", "models"], log)
    run(["medanomaly", "predict", "--model", m, str(nii), "--out", str(out / "maps_nifti"), "--threshold", args.threshold,
         "--quiet"], log)
    run(["medanomaly", "predict", "--model", m, str(series), "--out", str(out / "maps_dicom"), "--threshold",
         args.threshold, "--quiet"], log)
    run(["medanomaly", "predict", "--model", m, "--bids", str(bids), "--threshold", args.threshold, "--quiet"], log)
    shape = nib.load(str(nii)).shape
    lines = [f"# `{m}` on real scans (BraTS 2018 FLAIR, {shape[0]}x{shape[1]}x{shape[2]} at 1 mm)", "",
             f"`python benchmarks/shipped_model_demo.py {m} {out} --threshold {args.threshold}`; wall time includes "
             f"start-up; {os.cpu_count()} CPU cores, shared with other jobs.", "", *log, "",
             "NIfTI outputs:", "", *[f"- {f}" for f in files(out / "maps_nifti")], "",
             "DICOM series outputs:", "", *[f"- {f}" for f in files(out / "maps_dicom")], "",
             "BIDS derivatives:", "", *[f"- {f}" for f in files(bids / "derivatives")], ""]
    (out / "demo.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
