"""Shipped models (catalogue, cards, hash check, inputs that do not fit), NIfTI outputs that keep the input's
qform/sform, DICOM in -> DICOM out (Parametric Map + Segmentation read back with pydicom/highdicom), and BIDS
derivatives. A tiny ``zscore`` model trained here on toy data is packed as a model in a temporary models folder."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medanomaly.app.errors import PipelineError
from medanomaly.app.models import get_model, list_models, models_root, pack_model
from medanomaly.app.outputs import predict_command
from medanomaly.app.train import train_run
from medanomaly.cli import app
from medanomaly.data import make_toy_dataset

torch.set_num_threads(1)
SIZE = 32
NAME = "toy-flair-2d"
INFO = {"summary": "toy FLAIR model for tests", "modality": ["MR"], "input_dims": [2, 3], "bids_suffix": "FLAIR",
        "needs": "a brain MRI FLAIR scan (3D volume or 2D axial slice)"}


def _png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding one packed toy model; MEDANOMALY_MODELS_DIR points at it for the module."""
    data = tmp_path_factory.mktemp("shipdata")
    rows = ["case_id,image,mask,label,split"]
    for split, ds in (("train", make_toy_dataset(8, SIZE, seed=1)), ("val", make_toy_dataset(6, SIZE, seed=2))):
        for i in range(len(ds)):
            _png(data / f"{split}_{i}.png", np.round(ds[i]["image"][0].numpy() * 255))
            rows.append(f"{split}_{i},{split}_{i}.png,,0,{split}")
    test = make_toy_dataset(4, SIZE, abnormal_fraction=0.5, seed=3, lesion_intensity=0.5)
    for i in range(len(test)):
        s = test[i]
        _png(data / f"test_{i}.png", np.round(s["image"][0].numpy() * 255))
        _png(data / f"test_{i}_mask.png", s["mask"][0].numpy() * 255)
        rows.append(f"test_{i},test_{i}.png,test_{i}_mask.png,{int(s['label'])},test")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path_factory.mktemp("shipruns") / "zscore"
    train_run("zscore", data / "manifest.csv", run, size=SIZE, quiet=True)
    models = tmp_path_factory.mktemp("models")
    pack_model(run, NAME, INFO, "# toy-flair-2d\n\nweights sha256: {weights_sha256}\n", models)
    old = os.environ.get("MEDANOMALY_MODELS_DIR")
    os.environ["MEDANOMALY_MODELS_DIR"] = str(models)
    yield models
    if old is None:
        os.environ.pop("MEDANOMALY_MODELS_DIR", None)
    else:
        os.environ["MEDANOMALY_MODELS_DIR"] = old


def _invoke(*args: object, ok: bool = True):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return res


def _volume(seed: int = 5) -> np.ndarray:
    ds = make_toy_dataset(1, SIZE, spatial_dims=3, abnormal_fraction=1.0, seed=seed, lesion_intensity=0.5)
    return (ds[0]["image"][0].numpy() * 1000).astype(np.float32)


def _nifti(path: Path, vol: np.ndarray, aff: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    img = nib.Nifti1Image(vol, aff)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


AFF = np.array([[-1.0, 0, 0, 10], [0, 1.1, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])


# -- the catalogue -------------------------------------------------------------------------------------------------
def test_models_list_card_and_unknown_name(root: Path) -> None:
    assert models_root() == root and list(list_models()) == [NAME]
    out = _invoke("models").output
    assert NAME in out and "toy FLAIR model for tests" in out
    card = _invoke("models", NAME).output
    assert json.loads((root / NAME / "model.json").read_text())["weights_sha256"] in card
    msg = _invoke("models", "nope", ok=False).output
    assert "unknown model 'nope'" in msg and NAME in msg
    msg = _invoke("predict", "--model", "nope", "x.nii.gz", "--out", root.parent / "o", ok=False).output
    assert NAME in msg and not (root.parent / "o").exists()


def test_predict_model_nifti_keeps_affine_and_codes(root: Path, tmp_path: Path) -> None:
    src = _nifti(tmp_path / "scan.nii.gz", _volume(), AFF, qcode=1, scode=2)
    _invoke("predict", "--model", NAME, src, "--out", tmp_path / "maps", "--threshold", "fpr=0.01", "--quiet")
    for name in ("scan_anomaly.nii.gz", "scan_mask.nii.gz"):
        img = nib.load(str(tmp_path / "maps" / name))
        assert img.shape == (SIZE,) * 3 and np.allclose(img.affine, AFF)
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
        assert np.allclose(img.get_qform(), AFF) and np.allclose(img.get_sform(), AFF)
    rows = list(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert len(rows) == 1 and rows[0]["threshold_rule"]


def test_weights_hash_mismatch_is_one_error(root: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "models"
    shutil.copytree(root / NAME, other / NAME)
    w = other / NAME / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="does not match its SHA-256"):
        get_model(NAME, other)
    os.environ["MEDANOMALY_MODELS_DIR"] = str(other)
    try:
        src = _nifti(tmp_path / "scan.nii.gz", _volume(), AFF)
        msg = _invoke("predict", "--model", NAME, src, "--out", tmp_path / "o", ok=False).output
        assert "SHA-256" in msg and "reinstall" in msg and not (tmp_path / "o").exists()
    finally:
        os.environ["MEDANOMALY_MODELS_DIR"] = str(root)


def test_inputs_that_do_not_fit_the_model(root: Path, tmp_path: Path) -> None:
    t1 = _nifti(tmp_path / "sub-01_T1w.nii.gz", _volume(), AFF)
    msg = _invoke("predict", "--model", NAME, t1, "--out", tmp_path / "o", ok=False).output
    assert "T1w scan does not fit model toy-flair-2d" in msg and "FLAIR" in msg
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32), AFF), str(four))
    msg = _invoke("predict", "--model", NAME, four, "--out", tmp_path / "o", ok=False).output
    assert "a 4D image does not fit model" in msg
    cr = _series(tmp_path / "cr", modality="CR")
    msg = _invoke("predict", "--model", NAME, cr, "--out", tmp_path / "o", ok=False).output
    assert "DICOM Modality CR does not fit model" in msg and "needs a brain MRI FLAIR" in msg
    assert not (tmp_path / "o").exists()


def test_evaluate_with_model(root: Path, tmp_path: Path) -> None:
    manifest = next(root.parent.glob("shipdata*/manifest.csv"))
    res = _invoke("evaluate", "--model", NAME, "--data", manifest, "--split", "test", "--out", tmp_path / "e", "--quiet")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "calibrated_dice" in m and "best_dice" in m and "pixel_ap=" in res.output
    msg = _invoke("evaluate", "--model", NAME, tmp_path / "run", "--out", tmp_path / "e2", ok=False).output
    assert "not both" in msg


# -- DICOM in -> DICOM out -----------------------------------------------------------------------------------------
def _series(folder: Path, vol: np.ndarray | None = None, *, modality: str = "MR", drop: tuple[str, ...] = (),
            origin: tuple[float, float, float] = (-30.0, -40.0, 10.0), spacing: tuple[float, float] = (0.9, 0.8),
            step: float = 2.0, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> Path:
    """A single-frame MR series (one file per slice, files in reverse position order); ``vol`` is (slice, row, col)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    vol = np.transpose(_volume(), (2, 1, 0)) if vol is None else vol
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    r, c = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(r, c)
    for k in range(vol.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{vol.shape[0] - k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "SYN001", "Synthetic^Patient", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 3, k + 1
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + k * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), step
        px = np.asarray(np.clip(vol[k], 0, 65535), np.uint16)
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = px.tobytes()
        for tag in drop:
            delattr(ds, tag)
        ds.save_as(str(ds.filename), enforce_file_format=True)
    return folder


def test_dicom_series_gives_parametric_map_and_segmentation(root: Path, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    series = _series(tmp_path / "ser")
    out = tmp_path / "maps"
    written = predict_command(None, [series], out, model=NAME, threshold="fpr=0.05", quiet=True)
    assert out / "ser_anomaly_pmap.dcm" in written and out / "ser_mask_seg.dcm" in written
    amap = np.asarray(nib.load(str(out / "ser_anomaly.nii.gz")).dataobj)  # (col, row, slice) on the series grid
    mask = np.asarray(nib.load(str(out / "ser_mask.nii.gz")).dataobj) > 0
    assert mask.any() and not mask.all()
    src = {}
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        src[ds.SOPInstanceUID] = ds
    order = sorted(src.values(), key=lambda d: float(d.ImagePositionPatient[2]))  # the NIfTI slice order
    slice_of = {d.SOPInstanceUID: k for k, d in enumerate(order)}
    first = order[0]

    pm = pydicom.dcmread(str(out / "ser_anomaly_pmap.dcm"))
    seg = hd.seg.segread(str(out / "ser_mask_seg.dcm"))
    for obj in (pm, seg):
        assert obj.StudyInstanceUID == first.StudyInstanceUID and obj.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert obj.PatientID == "SYN001" and obj.SeriesInstanceUID != first.SeriesInstanceUID
        assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert int(obj.NumberOfFrames) == len(order)
        shared = obj.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.9, 0.8]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.pixel_array.dtype == np.float32
    seg_px = seg.pixel_array
    for obj, frames, want in ((pm, pm.pixel_array, amap), (seg, seg_px, mask)):
        for i, fg in enumerate(obj.PerFrameFunctionalGroupsSequence):
            ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            k = slice_of[ref]
            assert [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient] == \
                [float(v) for v in src[ref].ImagePositionPatient]
            np.testing.assert_array_equal(np.asarray(frames[i]).astype(want.dtype), want[:, :, k].T)
    assert seg.SegmentSequence[0].SegmentLabel == "anomaly" and seg.SegmentationType == "BINARY"
    # an existing output is refused before any work; --force overwrites
    with pytest.raises(PipelineError, match="already exists"):
        predict_command(None, [series], out, model=NAME, threshold="fpr=0.05", quiet=True)
    # no voxel threshold: the Parametric Map only
    w2 = predict_command(None, [series], tmp_path / "m2", model=NAME, quiet=True)
    assert tmp_path / "m2" / "ser_anomaly_pmap.dcm" in w2 and not (tmp_path / "m2" / "ser_mask_seg.dcm").exists()


def test_dicom_series_without_reference_tags_is_one_error(root: Path, tmp_path: Path) -> None:
    series = _series(tmp_path / "bare", drop=("FrameOfReferenceUID",))
    msg = _invoke("predict", "--model", NAME, series, "--out", tmp_path / "o", ok=False).output
    assert "lacks FrameOfReferenceUID" in msg and "Parametric Map" in msg
    assert not (tmp_path / "o").exists()


def test_dicom_outputs_when_optional_source_attributes_are_absent(root: Path, tmp_path: Path) -> None:
    """Type-2 patient/study attributes and SliceThickness may be absent from a source series: the outputs are still
    written (empty values, thickness = the slice step), never an AttributeError after the NIfTI files."""
    import pydicom

    absent = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
              "AccessionNumber", "ReferringPhysicianName", "SliceThickness")
    series = _series(tmp_path / "sparse", drop=absent)
    assert all(t not in pydicom.dcmread(str(f)) for f in series.iterdir() for t in absent)
    out = tmp_path / "maps"
    written = predict_command(None, [series], out, model=NAME, threshold="fpr=0.05", quiet=True)
    for name in ("sparse_anomaly_pmap.dcm", "sparse_mask_seg.dcm"):
        assert out / name in written
        obj = pydicom.dcmread(str(out / name))
        assert obj.PatientID == "" and str(obj.PatientName) == ""
        measures = obj.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert float(measures.SliceThickness) == pytest.approx(2.0)  # _series' slice step


def test_series_geometry_error_comes_before_the_output_tag_check(root: Path, tmp_path: Path) -> None:
    """A series with uneven slice steps *and* no Frame of Reference: the input's own problem is the one reported."""
    import pydicom

    series = _series(tmp_path / "uneven", drop=("FrameOfReferenceUID",))
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        if int(ds.InstanceNumber) > 3:  # a gap after the third slice
            pos = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 3.0]
            ds.save_as(str(f))
    msg = _invoke("predict", "--model", NAME, series, "--out", tmp_path / "o", ok=False).output
    assert "varies" in msg and "--allow-irregular-spacing" in msg and "FrameOfReferenceUID" not in msg
    assert not (tmp_path / "o").exists()


# -- BIDS derivatives ----------------------------------------------------------------------------------------------
def test_bids_derivatives(root: Path, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    (bids / "dataset_description.json").parent.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "toy", "BIDSVersion": "1.9.0"}')
    a = _nifti(bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz", _volume(5), AFF)
    _nifti(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz", _volume(6), AFF)
    b = _nifti(bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-1_FLAIR.nii.gz", _volume(7), AFF, scode=4)
    res = _invoke("predict", "--model", NAME, "--bids", bids, "--threshold", "fpr=0.05", "--quiet")
    d = bids / "derivatives" / "medanomaly"
    assert str(d) in res.output
    for src, rel in ((a, "sub-01/anat/sub-01"), (b, "sub-02/ses-1/anat/sub-02_ses-1_run-1")):
        src_img = nib.load(str(src))
        for kind in ("map", "mask"):
            img = nib.load(str(d / f"{rel}_desc-anomaly_{kind}.nii.gz"))
            assert img.shape == src_img.shape and np.allclose(img.affine, src_img.affine)
            assert int(img.header["sform_code"]) == int(src_img.header["sform_code"])
        assert (d / f"{rel}_desc-anomaly_components.tsv").read_text().startswith("component\tvoxels")
    assert (d / "sub-01" / "figures" / "sub-01_desc-anomaly_overlay.png").is_file()
    assert not list(d.glob("**/*T1w*")) and not list(d.glob(".staging-*"))
    desc = json.loads((d / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "medanomaly" and desc["GeneratedBy"][0]["Version"]
    rows = list(csv.DictReader(open(d / "scores.tsv"), delimiter="\t"))
    assert [r["input"] for r in rows] == ["sub-01/anat/sub-01_FLAIR.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_run-1_FLAIR.nii.gz"]
    # again: refused without --force
    msg = _invoke("predict", "--model", NAME, "--bids", bids, ok=False).output
    assert "already exists" in msg


def test_bids_without_matching_files_is_one_error(root: Path, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    _nifti(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz", _volume(6), AFF)
    msg = _invoke("predict", "--model", NAME, "--bids", bids, ok=False).output
    assert "no sub-*/[ses-*/]anat/*_FLAIR.nii.gz" in msg and "it has T1w scans" in msg
    assert not (bids / "derivatives").exists()
    msg = _invoke("predict", "--model", NAME, "--bids", tmp_path / "empty", ok=False).output
    assert "not a folder" in msg
    msg = _invoke("predict", "--model", NAME, "--bids", bids, "x.nii.gz", ok=False).output
    assert "give no input files" in msg


# -- the models the package ships ----------------------------------------------------------------------------------
def test_package_models_are_complete_and_load() -> None:
    """Every model in the package's own models folder: hash matches, card names the hash, run folder loads."""
    from medanomaly.app.models import CARD_FILE, INFO_FILE
    from medanomaly.app.predict import load_run

    pkg = Path(__file__).resolve().parents[1] / "src" / "medanomaly" / "models"
    found = list_models(pkg)
    if not found:
        pytest.skip("no shipped models in this checkout")
    for name, m in found.items():
        m.verify()
        info = json.loads((m.path / INFO_FILE).read_text())
        assert {"summary", "modality", "input_dims", "needs", "weights_sha256"} <= set(info), name
        assert info["weights_sha256"] in (m.path / CARD_FILE).read_text(), name
        det, cfg = load_run(m.path)  # checks finished.json's hashes of every file
        assert cfg["data"]["preset_config"], name
    total = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    assert total < 50 * 2**20, f"shipped models take {total / 2**20:.1f} MB"


def test_dicom_series_resampled_onto_a_regular_grid(root: Path, tmp_path: Path) -> None:
    """A series with a missing slice, resampled (--allow-irregular-spacing): explicit plane positions on the
    resampled grid, still in the source's Frame of Reference."""
    import pydicom

    series = _series(tmp_path / "gap")
    files = sorted(series.iterdir())
    files[len(files) // 2].unlink()
    out = tmp_path / "maps"
    predict_command(None, [series], out, model=NAME, quiet=True, allow_irregular_spacing=True)
    img = nib.load(str(out / "gap_anomaly.nii.gz"))
    pm = pydicom.dcmread(str(out / "gap_anomaly_pmap.dcm"))
    assert int(pm.NumberOfFrames) == img.shape[2] == len(files)  # the gap is filled back on the regular grid
    assert pm.FrameOfReferenceUID == pydicom.dcmread(str(files[0])).FrameOfReferenceUID
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    want = sorted(float((lps[:3, 3] + k * lps[:3, 2])[2]) for k in range(img.shape[2]))
    got = sorted(float(fg.PlanePositionSequence[0].ImagePositionPatient[2]) for fg in pm.PerFrameFunctionalGroupsSequence)
    np.testing.assert_allclose(got, want, atol=1e-4)
