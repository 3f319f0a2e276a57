"""Builders for small synthetic files: valid DICOM/NIfTI/PNG, and a corpus of bad inputs.

``build_corpus(folder)`` writes the bad files and returns ``BadCase`` records: the file, the call that must fail,
the error type and fragments its message must contain (the file name is always checked as well), or, for inputs
that must be accepted, ``error=None`` and the shape of the result. Every file is small: headers that claim huge
sizes carry almost no data. ``python tests/badinput/report.py`` turns the corpus into docs/results/badinput.md.
"""

from __future__ import annotations

import json
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
    ds.StudyInstanceUID = series_uid + ".0"  # a real series has a study and a frame of reference (DICOM outputs need them)
    ds.FrameOfReferenceUID = series_uid + ".1"
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


def patch_nifti(src: Path, dst: Path, data: bytes | None = None, **fields: Any) -> Path:
    """Copy the NIfTI ``src`` to ``dst`` (``.nii`` or ``.nii.gz``) with header fields changed (``pixdim=[...]``,
    ``dim=[...]``, ``srow_x=[...]``, ``sform_code=1``...), optionally replacing the voxel bytes by ``data``."""
    import gzip
    import io

    import nibabel as nib

    raw = src.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for k, v in fields.items():
        hdr[k] = v
    off = int(hdr["vox_offset"])
    out = hdr.binaryblock + raw[348:off] + (raw[off:] if data is None else data)
    dst.write_bytes(gzip.compress(out, compresslevel=1) if dst.name.endswith(".gz") else out)
    return dst


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width x height`` 8-bit grey pixels, with a tiny (truncated) image stream."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


def npz_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """An .npz whose .npy members claim ``shapes`` (uint8) but hold no data."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for key, shape in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
            z.writestr(f"{key}.npy", buf.getvalue())
    return path


def make_series(folder: Path, depths: list[float], shape: tuple[int, int] = (6, 5)) -> Path:
    """A DICOM series folder with one slice per entry of ``depths`` (mm along z)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(depths))
    for k, z in enumerate(depths):
        make_dicom(folder / f"s{k:03d}.dcm", rng.integers(1, 1000, shape), position=(0.0, 0.0, float(z)), instance=k + 1)
    return folder


@dataclass
class BadCase:
    name: str
    path: Path
    call: Callable[[], Any]
    error: type[BaseException] | None  # None: the input must be accepted
    fragments: tuple[str, ...]
    kind: str = "format"
    shape: tuple[int, ...] | None = None  # the result's shape, for accepted inputs
    needs_non_root: bool = False  # file permissions do not stop root


def result_shape(value: Any) -> tuple[int, ...]:
    """The shape of what a corpus call returns (a Loaded, a Preprocessed, a dataset, an array)."""
    if hasattr(value, "image"):
        return tuple(value.image.shape)
    if hasattr(value, "array"):
        return tuple(value.array.shape)
    if hasattr(value, "__len__") and not hasattr(value, "shape"):
        return (len(value),)
    return tuple(np.shape(value))


def build_corpus(folder: Path) -> list[BadCase]:
    """Write the bad-input corpus into ``folder``."""
    import nibabel as nib
    from PIL import Image

    from medanomaly.data import load_dataset, read_image, read_mask
    from medanomaly.data.io import DataError, read_lgg_npz
    from medanomaly.data.presets import get_preset

    folder.mkdir(parents=True, exist_ok=True)
    cases: list[BadCase] = []

    def add(name: str, path: Path, call: Callable[[], Any], error: type[BaseException] | None, *frag: str,
            shape: tuple[int, ...] | None = None, needs_non_root: bool = False, kind: str = "format") -> None:
        cases.append(BadCase(name, path, call, error, frag, kind, shape, needs_non_root))

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
    add("4D where 3D expected", p, lambda p=p: read_image(p, expect_dims=3), DataError, "4D", "3 volumes")

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
    add("npz without mask", p, lambda p=p: read_lgg_npz(p), DataError, "lacks the keys")

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
    _extra_cases(folder, add, good, vol)
    return cases


def _with_env(name: str, value: str, call: Callable[[], Any]) -> Any:
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return call()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _extra_cases(folder: Path, add: Callable[..., None], good: Path, vol: np.ndarray) -> None:
    """Hostile inputs of the independent corpus: silent successes, size bombs, bad geometry, manifests, YAML."""
    import nibabel as nib
    from PIL import Image

    from medanomaly.data import load_dataset, read_image, read_mask, write_png_map
    from medanomaly.data.io import DataError
    from medanomaly.data.presets import get_preset
    from medanomaly.yamlsafe import load_yaml

    rng = np.random.default_rng(1)
    good_nii = folder / "good.nii"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(good_nii))

    # --- silent successes before
    k = "silent success"
    p = folder / "lgg_patient.npz"
    np.savez(p, flair=rng.integers(0, 255, (3, 8, 8)).astype(np.uint8), mask=np.zeros((3, 8, 8), bool),
             slice_number=np.arange(3))
    add("LGG .npz through read_image", p, lambda p=p: read_image(p), DataError, "lgg-flair-2d", "manifest", kind=k)
    p = folder / "complex.nii.gz"
    nib.save(nib.Nifti1Image((vol + 1j * vol).astype(np.complex64), np.eye(4)), str(p))
    add("complex NIfTI", p, lambda p=p: read_image(p), DataError, "complex", kind=k)
    for tag, pd in (("zero", [1.0, 0.0, 2.0]), ("negative", [1.0, -1.0, 2.0]), ("NaN", [1.0, float("nan"), 2.0])):
        p = patch_nifti(good_nii, folder / f"pixdim_{tag.lower()}.nii", pixdim=[1.0, *pd, 1, 1, 1, 1])
        add(f"{tag} pixdim", p, lambda p=p: read_image(p), DataError, "spacing", "positive", kind=k)
    irregular = make_series(folder / "series_irregular", [0.0, 1.0, 2.0, 4.0, 5.0])
    add("series with irregular spacing", irregular, lambda p=irregular: read_image(p), DataError, "varies from 1.000 to 2.000",
        "allow_irregular_spacing", kind=k)
    add("irregular series, resampling allowed", irregular, lambda p=irregular: read_image(p, allow_irregular_spacing=True),
        None, shape=(5, 6, 6), kind=k)
    dup = make_series(folder / "series_duplicate", [0.0, 1.0, 1.0, 2.0])
    add("series with a duplicate position", dup, lambda p=dup: read_image(p), DataError, "duplicate slice position",
        "s001.dcm", "s002.dcm", kind=k)
    imgs = []
    for j in range(4):
        q = folder / f"m2d_{j}.png"
        Image.fromarray(rng.integers(1, 255, (16, 16), dtype=np.uint8)).save(q)
        imgs.append(q.name)
    man = folder / "manifest_dup_ids.csv"
    man.write_text("case_id,image,label,split\n" + "".join(f"c1,{q},0,test\n" for q in imgs))
    add("manifest with duplicate case ids", man, lambda m=man: load_dataset(m, "test"), DataError, "case_id 'c1'",
        "rows [1, 2, 3, 4]", kind=k)
    man = folder / "manifest_slices.csv"
    man.write_text("case_id,image,label,split,slice\n" + "".join(f"c1,{q},0,test,{j}\n" for j, q in enumerate(imgs)))
    add("manifest, one case as 2D slices", man, lambda m=man: load_dataset(m, "test"), None, shape=(4,), kind=k)
    man = folder / "manifest_same_image.csv"
    man.write_text(f"case_id,image,split\na,{imgs[0]},test\nb,{imgs[0]},test\n")
    add("manifest listing one image twice", man, lambda m=man: load_dataset(m, "test"), DataError, "listed in rows [1, 2]",
        kind=k)

    # --- memory and time bombs: refused from the header, before decoding
    k = "size bomb"
    p = patch_nifti(good, folder / "claims_8GB.nii.gz", data=b"\0" * 100_000, dim=[3, 2000, 2000, 400, 1, 1, 1, 1])
    add("nii.gz claiming 2000x2000x400", p, lambda p=p: read_image(p), DataError, "1,600,000,000 voxels", "MEDANOMALY_MAX_VOXELS",
        kind=k)
    for suf in ("nii", "nii.gz"):
        p = patch_nifti(good_nii, folder / f"huge_dim.{suf}", dim=[3, 32767, 32767, 32767, 1, 1, 1, 1])
        add(f"huge header dims (.{suf})", p, lambda p=p: read_image(p), DataError, "32767", "over the limit", kind=k)
    p = png_header_only(folder / "png_9000.png", 9000, 9000)
    add("PNG claiming 9000x9000", p, lambda p=p: read_image(p), DataError, "81,000,000 pixels", "MEDANOMALY_MAX_PIXELS", kind=k)
    p = png_header_only(folder / "png_bomb.png", 20000, 20000)
    add("PNG over Pillow's bomb limit", p, lambda p=p: read_image(p), DataError, "400,000,000 pixels", kind=k)
    p = folder / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(1, 2, (64, 64, 64)).astype(np.float32), np.diag([100.0, 100.0, 100.0, 1.0])), str(p))
    add("spacing that resamples to 3200^3", p, lambda p=p: get_preset("brain-mri-3d")(read_image(p)), DataError,
        "resampling to [2.0, 2.0, 2.0] mm", "(3200, 3200, 3200)", kind=k)
    p = folder / "big_rows.dcm"
    make_dicom(p, np.ones((4, 4)))
    import pydicom

    ds = pydicom.dcmread(str(p))
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(str(p))
    add("DICOM header claiming 60000x60000", p, lambda p=p: read_image(p), DataError, "3,600,000,000 pixels", kind=k)
    series = make_series(folder / "series_small", [0.0, 1.0, 2.0])
    add("series over a lowered budget", series, lambda p=series: _with_env("MEDANOMALY_MAX_VOXELS", "50", lambda: read_image(p)),
        DataError, "90 voxels", "limit of 50", kind=k)
    p = npz_header_only(folder / "lgg_bomb.npz", {"flair": (5000, 4096, 4096), "mask": (1, 1, 1), "slice_number": (1,)})
    add("LGG .npz claiming 84 G voxels", p, lambda p=p: read_lgg_npz_(p), DataError, "'flair'", "over the limit", kind=k)

    # --- geometry and messages
    k = "geometry/message"
    p = patch_nifti(good_nii, folder / "zero_affine.nii", sform_code=1, qform_code=0, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0],
                    srow_z=[0, 0, 0, 0])
    add("zero affine", p, lambda p=p: read_image(p), DataError, "singular", kind=k)
    p = patch_nifti(good_nii, folder / "singular_affine.nii", sform_code=1, qform_code=0, srow_x=[1, 0, 0, 0],
                    srow_y=[1, 0, 0, 0], srow_z=[0, 0, 2, 0])
    add("singular affine", p, lambda p=p: read_image(p), DataError, "singular", kind=k)
    p = patch_nifti(good_nii, folder / "nan_affine.nii", sform_code=1, qform_code=0, srow_x=[float("nan"), 0, 0, 0])
    add("NaN affine", p, lambda p=p: read_image(p), DataError, "not a finite", kind=k)
    d = folder / "folder.nii"
    d.mkdir(exist_ok=True)
    add("directory named x.nii", d, lambda p=d: read_image(p), DataError, "is a directory", kind=k)
    p = folder / "single_voxel.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), str(p))
    add("1-voxel image", p, lambda p=p: read_image(p), DataError, "single voxel", kind=k)
    p = folder / "singleton_4d.nii.gz"
    nib.save(nib.Nifti1Image(vol[..., None], np.eye(4)), str(p))
    add("4D with one volume (squeezed)", p, lambda p=p: read_image(p), None, shape=vol.shape, kind=k)
    p = folder / "bool_mask.nii.gz"
    nib.save(nib.Nifti1Image((vol > 50).astype(np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), str(p))
    add("binary uint8 mask", p, lambda p=p: read_mask(p), None, shape=vol.shape, kind=k)
    p = folder / "locked.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p))
    p.chmod(0)
    add("unreadable file (permissions)", p, lambda p=p: read_image(p), DataError, "permission denied", needs_non_root=True,
        kind=k)
    blocker = folder / "a_file"
    blocker.write_text("x")
    p = blocker / "map.png"
    add("output folder is a file", blocker, lambda p=p: write_png_map(np.ones((4, 4)), p), DataError, "cannot create the output",
        kind=k)

    # --- manifests
    k = "manifest"
    man = folder / "manifest_many_missing.csv"
    man.write_text("case_id,image,split\na,gone_a.nii.gz,train\nb,gone_b.nii.gz,train\nc,gone_c.nii.gz,train\n")
    add("manifest with three missing files", man, lambda m=man: load_dataset(m), DataError, "3 problems", "gone_a.nii.gz",
        "gone_b.nii.gz", "gone_c.nii.gz", kind=k)
    man = folder / "manifest_two_images.json"
    man.write_text(json.dumps({"cases": [{"case_id": "x", "image": imgs[0]}, {"case_id": "x", "image": imgs[1]}]}))
    add("manifest: one case id, two images", man, lambda m=man: load_dataset(m), DataError, "case_id 'x'", kind=k)
    sub = folder / "sub"
    sub.mkdir(exist_ok=True)
    man = sub / "manifest_outside.csv"
    man.write_text(f"case_id,image,split\na,../{imgs[0]},test\nb,../{imgs[1]},test\n")
    add("manifest with paths outside its folder", man, lambda m=man: load_dataset(m, "test"), None, shape=(2,), kind=k)
    man = folder / "manifest_slice_3d.csv"
    man.write_text(f"case_id,image,split,slice\nv,{good.name},test,0\n")
    add("slice column on a 3D volume", man, lambda m=man: load_dataset(m, "test"), DataError, "'slice' column", kind=k)

    # --- YAML
    k = "yaml"
    p = folder / "aliases.yaml"
    p.write_text("a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n")
    add("YAML with aliases", p, lambda p=p: load_yaml(p), ValueError, "line 2", "aliases are not allowed", kind=k)
    p = folder / "big.yaml"
    p.write_text("x: " + "1" * 2_000_000 + "\n")
    add("YAML over the size limit", p, lambda p=p: load_yaml(p), ValueError, "over the limit of 1000000 bytes", kind=k)
    p = folder / "broken.yaml"
    p.write_text("a: 1\nb: [1, 2\nc: 3\n")
    add("YAML syntax error", p, lambda p=p: load_yaml(p), ValueError, "line 3", kind=k)
    p = folder / "object.yaml"
    p.write_text("a: !!python/object/apply:os.system ['true']\n")
    add("YAML python tag", p, lambda p=p: load_yaml(p), ValueError, "line 1", "constructor", kind=k)


def read_lgg_npz_(path: Path) -> Any:
    from medanomaly.data.io import read_lgg_npz

    return read_lgg_npz(path)
