"""Builders for small synthetic files: valid DICOM/NIfTI/PNG, and a corpus of bad inputs.

``build_corpus(folder)`` writes the bad files and returns ``BadCase`` records: the file, the call that must fail,
the error type and fragments its message must contain (the file name is always checked as well).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    slope: float | None = None,
    intercept: float | None = None,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = (1, 0, 0, 0, 1, 0),
    instance: int | None = None,
    spacing: tuple[float, float] | None = (0.5, 0.7),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    with_pixels: bool = True,
) -> Path:
    """Write a single-frame uint16 DICOM file with the given tags (None = tag left out)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    px = np.asarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None and position is not None:
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if with_pixels:
        ds.PixelData = px.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@dataclass
class BadCase:
    name: str
    path: Path
    call: Callable[[], Any]
    error: type[BaseException]
    fragments: tuple[str, ...]


def build_corpus(folder: Path) -> list[BadCase]:
    """Write the bad-input corpus into ``folder``."""
    import nibabel as nib
    from PIL import Image

    from medanomaly.data import load_dataset, read_image, read_mask
    from medanomaly.data.io import DataError
    from medanomaly.data.preprocess import get_preset

    folder.mkdir(parents=True, exist_ok=True)
    cases: list[BadCase] = []

    def add(name: str, path: Path, call: Callable[[], Any], error: type[BaseException], *frag: str) -> None:
        cases.append(BadCase(name, path, call, error, frag))

    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 100, (8, 9, 10)).astype(np.float32)

    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(good))
    raw = good.read_bytes()
    p = folder / "truncated.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    add("truncated nifti", p, lambda p=p: read_image(p), DataError, "truncated")

    p = folder / "garbage.nii"
    p.write_bytes(b"this is not a nifti header" * 4)
    add("garbage nifti", p, lambda p=p: read_image(p), DataError, "unreadable")

    p = folder / "image.xyz"
    p.write_bytes(b"\x00\x01\x02")
    add("unknown format", p, lambda p=p: read_image(p), DataError, "unknown image format")

    p = folder / "missing.nii.gz"
    add("missing file", p, lambda p=p: read_image(p), DataError, "not found")

    p = folder / "nan.nii.gz"
    v = vol.copy()
    v[1, 2, 3] = np.nan
    v[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(p))
    add("NaN/Inf", p, lambda p=p: read_image(p), DataError, "NaN/Inf")

    p = folder / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), str(p))
    add("empty (all zero)", p, lambda p=p: read_image(p), DataError, "empty")

    p = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(0, 1, (6, 6, 6, 3)).astype(np.float32), np.eye(4)), str(p))
    add("4D where 3D expected", p, lambda p=p: read_image(p, expect_dims=3), DataError, "expected a 3D image", "4D")

    p = folder / "not_binary_mask.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 4, (8, 9, 10)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), str(p))
    add("non-binary mask", p, lambda p=p: read_mask(p), DataError, "not binary")

    p = folder / "truncated.png"
    buf = folder / "ok.png"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(buf)
    p.write_bytes(buf.read_bytes()[:60])
    add("truncated png", p, lambda p=p: read_image(p), DataError, "truncated")

    p = folder / "empty.png"
    p.write_bytes(b"")
    add("zero-byte png", p, lambda p=p: read_image(p), DataError, "unreadable")

    p = folder / "nopixels.dcm"
    make_dicom(p, np.ones((4, 4)), with_pixels=False)
    add("DICOM without pixel data", p, lambda p=p: read_image(p), DataError, "PixelData")

    p = folder / "garbage.dcm"
    p.write_bytes(b"\x00" * 20)
    add("garbage DICOM", p, lambda p=p: read_image(p), DataError, "DICOM")

    series = folder / "series_unordered"
    series.mkdir(exist_ok=True)
    for k in range(3):
        make_dicom(series / f"s{k}.dcm", np.full((4, 4), k + 1), position=None, instance=None)
    add("series without position/instance", series, lambda p=series: read_image(p), DataError, "cannot order")

    p = folder / "bad_lgg.npz"
    np.savez(p, flair=np.ones((2, 4, 4), np.uint8))
    add("npz without mask", p, lambda p=p: read_image(p), DataError, "lacks the keys")

    # image/mask geometry mismatch, through a manifest
    img = folder / "img.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(img))
    m_shape = folder / "mask_shape.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 11), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), str(m_shape))
    m_aff = folder / "mask_affine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), str(m_aff))
    for tag, m in (("shape", m_shape), ("affine", m_aff)):
        man = folder / f"manifest_{tag}.csv"
        man.write_text(f"case_id,image,mask,split\nc1,{img.name},{m.name},test\n")
        add(f"mask {tag} mismatch", m, lambda man=man: load_dataset(man, "test")[0], DataError, "does not match" if tag == "shape"
            else "differs", img.name)

    man = folder / "manifest_missing.csv"
    man.write_text("case_id,image,split\nc1,nowhere.nii.gz,train\n")
    add("manifest with a missing file", man, lambda man=man: load_dataset(man), DataError, "nowhere.nii.gz", "not found")

    man = folder / "manifest_nocol.csv"
    man.write_text("case_id,split\nc1,train\n")
    add("manifest without image column", man, lambda man=man: load_dataset(man), DataError, "image")

    p = folder / "vol2d.nii.gz"
    nib.save(nib.Nifti1Image(vol[:, :, 0], np.eye(4)), str(p))
    add("2D where 3D expected", p, lambda p=p: get_preset("brain-mri-3d")(read_image(p)), DataError, "3D")
    return cases
