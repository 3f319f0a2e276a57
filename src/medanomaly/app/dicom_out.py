"""DICOM in -> DICOM out: for a DICOM series input, ``predict`` also writes the anomaly map as a DICOM **Parametric
Map** and the calibrated mask as a binary DICOM **Segmentation** (both with :mod:`highdicom`), in the source
series' Study and Frame of Reference and referencing its images, so that a PACS or a DICOM viewer shows them over
the scan.

:func:`check_series` runs before any prediction (a series without the tags these objects need is refused in one
line, before anything is written); :func:`write_dicom_outputs` runs after ``predict`` wrote the NIfTI map (and
mask) of the series on the series' own voxel grid, and converts them frame by frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.app.errors import PipelineError

__all__ = ["PM_SUFFIX", "REQUIRED_TAGS", "SEG_SUFFIX", "check_series", "dicom_output_paths", "write_dicom_outputs"]

#: file name endings of the two objects written beside ``<name>_anomaly.nii.gz``
PM_SUFFIX = "_anomaly_pmap.dcm"
SEG_SUFFIX = "_mask_seg.dcm"
#: what every source image needs for a Parametric Map / Segmentation that references it
REQUIRED_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
                 "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def dicom_output_paths(out: Path, stem: str, with_mask: bool) -> list[Path]:
    """The DICOM files written for one series input."""
    return [out / f"{stem}{PM_SUFFIX}"] + ([out / f"{stem}{SEG_SUFFIX}"] if with_mask else [])


def _series_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def check_series(path: str | Path) -> None:
    """Refuse (one :class:`PipelineError` line) a DICOM series whose images lack a tag the outputs need."""
    import pydicom

    path = Path(path)
    for f in _series_files(path):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for broken files
            raise PipelineError(f"{f}: unreadable DICOM file ({type(e).__name__}: {e})") from None
        missing = [t for t in REQUIRED_TAGS if t not in ds or ds.get(t) in (None, "")]
        if missing:
            raise PipelineError(f"{path}: cannot write a DICOM Parametric Map/Segmentation for this series: {f.name} lacks "
                                f"{', '.join(missing)} (needed to reference the source series); the NIfTI outputs need none "
                                "of them: convert the series to NIfTI (e.g. dcm2niix) and predict that")


def _sorted_sources(path: Path, files: list[str]) -> list[Any]:
    """The source datasets in the order of the volume's slice axis (``meta["files"]`` of the reader)."""
    import pydicom

    sources = [pydicom.dcmread(str(path / name)) for name in files]
    for ds in sources:  # type-2 patient/study attributes may be absent from a source; DICOM allows them empty
        for tag in _TYPE2_EMPTY:
            if tag not in ds:
                setattr(ds, tag, "")
    return sources


#: patient and study attributes the derived objects copy (DICOM type 2: present, possibly empty)
_TYPE2_EMPTY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _frames(vol: np.ndarray) -> np.ndarray:
    """(col, row, slice) volume on the series grid -> (slice, row, col) frames."""
    return np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))


def _geometry(affine_ras: np.ndarray, n: int) -> dict[str, Any]:
    """Explicit plane geometry (LPS) of a volume whose slices do not coincide with the source images'."""
    import highdicom as hd

    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float)  # RAS -> LPS
    col_dir, row_dir, step = aff[:3, 0], aff[:3, 1], aff[:3, 2]
    col_sp, row_sp = float(np.linalg.norm(col_dir)), float(np.linalg.norm(row_dir))
    orient = [*(col_dir / col_sp), *(row_dir / row_sp)]
    thick = float(np.linalg.norm(step))
    return {
        "pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=[row_sp, col_sp], slice_thickness=thick,
                                                   spacing_between_slices=thick),
        "plane_orientation": hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=orient),
        "plane_positions": [hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                     image_position=[float(v) for v in aff[:3, 3] + k * step])
                            for k in range(n)],
    }


def write_dicom_outputs(
    series: str | Path,
    map_nifti: str | Path,
    mask_nifti: str | Path | None,
    out: str | Path,
    stem: str,
    *,
    model_name: str = "medanomaly",
    allow_irregular_spacing: bool = False,
) -> list[Path]:
    """Write ``<stem>_anomaly_pmap.dcm`` (float32 Parametric Map of the scores) and, when ``mask_nifti`` is given,
    ``<stem>_mask_seg.dcm`` (binary Segmentation, one segment) for the DICOM series folder ``series``.

    The NIfTI files are the ones ``predict`` wrote on the series' own grid; frame ``k`` of the outputs is source
    slice ``k`` in position order, so each frame references its source image. A series resampled onto a regular grid
    (``allow_irregular_spacing``) gets explicit plane positions instead, still in the source's Frame of Reference.
    """
    import highdicom as hd
    import nibabel as nib
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import medanomaly
    from medanomaly.data.io import read_dicom_series
    from medanomaly.training.atomic import atomic_write_bytes

    series, out = Path(series), Path(out)
    ld = read_dicom_series(series, allow_irregular_spacing=allow_irregular_spacing)
    img = nib.load(str(map_nifti))
    amap = np.asarray(img.dataobj, dtype=np.float32)
    if amap.shape != ld.shape or not np.allclose(img.affine, ld.affine, atol=1e-4):
        raise PipelineError(f"{map_nifti}: the map is not on the grid of the series {series} (shape {amap.shape} vs "
                            f"{ld.shape}); cannot convert it to DICOM")
    sources = _sorted_sources(series, ld.meta["files"])
    step = float(np.linalg.norm(np.asarray(ld.affine, float)[:3, 2]))
    for ds in sources:  # SliceThickness is type 2 (may be absent); the derived objects need a value: the slice step
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = round(step, 6)
    resampled = bool(ld.meta.get("resampled_slices"))
    geometry = _geometry(ld.affine, amap.shape[-1]) if resampled else {}
    version = getattr(medanomaly, "__version__", "unknown")
    common = {"manufacturer": "medanomaly", "manufacturer_model_name": model_name, "software_versions": str(version),
              "device_serial_number": "none"}
    series_number = int(sources[0].get("SeriesNumber", 0) or 0) + 1000
    frames = _frames(amap)
    lo, hi = float(frames.min()), float(frames.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY", lut_explanation=f"anomaly score ({model_name})",
        unit=hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
        value_range=(lo, hi), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=frames, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo)],
        content_description="anomaly map", content_label="ANOMALY", **common, **geometry)
    written = []
    path = out / f"{stem}{PM_SUFFIX}"
    atomic_write_bytes(path, _encode(pm))
    written.append(path)
    if mask_nifti is not None:
        mimg = nib.load(str(mask_nifti))
        mask = np.asarray(mimg.dataobj) > 0
        if mask.shape != ld.shape:
            raise PipelineError(f"{mask_nifti}: the mask is not on the grid of the series {series}")
        algo = hd.AlgorithmIdentificationSequence(name=f"medanomaly {model_name}", version=str(version),
                                                  family=codes.cid7162.ArtificialIntelligence)
        seg_desc = hd.seg.SegmentDescription(
            segment_number=1, segment_label="anomaly", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo)
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=_frames(mask.astype(np.uint8)), segmentation_type="BINARY",
            segment_descriptions=[seg_desc], series_instance_uid=generate_uid(), series_number=series_number + 1,
            sop_instance_uid=generate_uid(), instance_number=1, omit_empty_frames=False,
            content_description="calibrated anomaly mask", content_label="ANOMALY", **common, **geometry)
        path = out / f"{stem}{SEG_SUFFIX}"
        atomic_write_bytes(path, _encode(seg))
        written.append(path)
    return written


def _encode(ds: Any) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
