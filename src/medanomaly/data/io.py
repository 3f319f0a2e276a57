"""Reading and writing images with their geometry.

Every reader returns a :class:`Loaded`: the voxel array, a 4x4 voxel-to-world affine in RAS+ millimetres (the NIfTI
convention; DICOM's LPS is converted), the voxel spacing and a metadata dict (``format``, ``path``, and what the
format carries, e.g. the DICOM window). 2D images are ``(rows, cols)``; volumes are indexed in the order their affine
describes (NIfTI order; DICOM series as ``(col, row, slice)`` like dcm2niix).

Bad files raise :class:`DataError` (a ``ValueError``) whose message names the file and the problem. Sizes are checked
from the header before anything is decoded (:mod:`medanomaly.data.limits`, ``MEDANOMALY_MAX_VOXELS``); geometry that
cannot be used is refused with its reason: zero/negative/NaN spacing, a singular or non-finite affine, complex voxels,
4D files with several volumes, single-voxel images, DICOM series with duplicate or irregularly spaced slices (unless
``allow_irregular_spacing=True``, which resamples them onto a regular grid).
"""

from __future__ import annotations

import logging
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.limits import DataError, VoxelBudgetError, check_voxel_budget

__all__ = [
    "DataError",
    "VoxelBudgetError",
    "Loaded",
    "read_image",
    "read_mask",
    "read_nifti",
    "read_dicom",
    "read_dicom_series",
    "read_pil",
    "read_lgg_npz",
    "detect_format",
    "check_array",
    "apply_window",
    "write_nifti_map",
    "write_nifti_mask",
    "write_png_map",
    "save_overlay_png",
    "resample_to_reference",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FILE_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom", ".npz") + PIL_SUFFIXES
# DICOM series: slices closer than DUP_FRACTION x the median step are duplicates; steps may vary by
# SPACING_RTOL x median + SPACING_ATOL mm (position rounding) before the series counts as irregular.
DUP_FRACTION, SPACING_RTOL, SPACING_ATOL = 0.05, 0.02, 0.01

log = logging.getLogger("medanomaly.data")


@dataclass
class Loaded:
    """An image array with its geometry and metadata."""

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if not self.spacing:
            self.spacing = spacing_from_affine(self.affine, self.array.ndim)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        """Axis codes of the affine (e.g. ``"RAS"``), for volumes."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine)) if self.array.ndim == 3 else ""


def spacing_from_affine(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    norms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(v) for v in norms[: min(ndim, 3)])


def _name(path: Path | str | None) -> str:
    return f"{path}: " if path is not None else ""


def check_array(a: np.ndarray, path: Path | str | None = None, *, what: str = "image", allow_constant: bool = True) -> np.ndarray:
    """Raise :class:`DataError` for empty arrays and NaN/Inf; return ``a`` as a numeric array."""
    a = np.asarray(a)
    if a.size == 0 or 0 in a.shape:
        raise DataError(f"{_name(path)}{what} is empty (shape {a.shape})")
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{_name(path)}{what} has a non-numeric dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise DataError(f"{_name(path)}{what} is complex-valued (dtype {a.dtype}); take the magnitude or real part first")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            raise DataError(f"{_name(path)}{what} contains {int(bad.sum())} NaN/Inf values")
    if not allow_constant and a.min() == a.max():
        raise DataError(f"{_name(path)}{what} is empty: every value equals {a.flat[0]}")
    return a


def detect_format(path: Path) -> str:
    """``nifti``, ``dicom``, ``dicom-series`` (a folder), ``pil`` or ``npz``; unknown formats raise."""
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(FILE_SUFFIXES):
            raise DataError(f"{path}: is a directory, not a file (a name ending in {''.join(path.suffixes)} means a file; "
                            "a DICOM series folder should not carry a file suffix)")
        return "dicom-series"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".dcm") or name.endswith(".dicom"):
        return "dicom"
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(".npz"):
        return "npz"
    head = _probe(path, 132)  # DICOM files often have no suffix: look for the "DICM" preamble marker
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    raise DataError(
        f"{path}: unknown image format (suffix {''.join(path.suffixes) or 'none'}); "
        "expected .nii/.nii.gz, .dcm (or a DICOM folder) or .png/.jpg/.tif"
    )


def _probe(path: Path, n: int = 1) -> bytes:
    """The first ``n`` bytes of a file; unreadable files (permissions, I/O errors) raise a DataError naming them."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError:
        raise DataError(f"{path}: permission denied: the file cannot be read by this user") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or type(e).__name__})") from None


def read_image(path: str | Path, *, expect_dims: int | None = None, allow_constant: bool = False,
               allow_irregular_spacing: bool = False, **kw: Any) -> Loaded:
    """Read any supported image, dispatching on the format.

    ``expect_dims`` (2 or 3) checks the number of spatial dimensions; trailing singleton axes are squeezed (a 4D
    NIfTI with one time point is fine, a real 4D series is an error). ``allow_irregular_spacing`` (DICOM series
    only) resamples a series with uneven slice steps onto a regular grid instead of refusing it. ``kw`` goes to
    the format's reader. The shared LGG ``.npz`` is a dataset file, not a scan, and is refused here.
    """
    return _read_any(path, expect_dims, allow_constant, allow_irregular_spacing, allow_bool=False, **kw)


def _read_any(path: str | Path, expect_dims: int | None, allow_constant: bool, allow_irregular_spacing: bool, *,
              allow_bool: bool, **kw: Any) -> Loaded:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = detect_format(path)
    if fmt == "npz":
        raise DataError(f"{path}: an .npz is a file of the shared LGG data set, not a scan; use the built-in dataset "
                        "(--data lgg-flair-2d) or a manifest of NIfTI/DICOM/PNG images")
    if fmt != "dicom-series":
        _probe(path)
    if allow_irregular_spacing and fmt == "dicom-series":
        kw["allow_irregular_spacing"] = True
    reader = {"nifti": read_nifti, "dicom": read_dicom, "dicom-series": read_dicom_series, "pil": read_pil}[fmt]
    loaded = reader(path, **kw)
    if loaded.array.dtype == bool and not allow_bool:
        raise DataError(f"{path}: holds boolean data (a mask?) where an image is expected; read masks with read_mask")
    if loaded.array.size == 1:
        raise DataError(f"{path}: image has a single voxel (shape {tuple(loaded.array.shape)}); nothing to analyse")
    if loaded.array.ndim == 2 and min(loaded.array.shape) == 1:
        raise DataError(f"{path}: image is a single row or column of pixels (shape {tuple(loaded.array.shape)})")
    if expect_dims is not None:
        arr = loaded.array
        while arr.ndim > expect_dims and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != expect_dims:
            raise DataError(f"{path}: expected a {expect_dims}D image, got {arr.ndim}D with shape {tuple(loaded.array.shape)}")
        loaded.array = arr
    check_array(loaded.array, path, allow_constant=allow_constant)
    return loaded


def read_mask(path: str | Path, *, expect_dims: int | None = None) -> Loaded:
    """Read a lesion mask and check it is binary ({0, 1}, or {0, 255} for 8-bit images); returns a bool array."""
    loaded = _read_any(path, expect_dims, True, False, allow_bool=True)
    a = loaded.array
    vals = np.unique(a)
    if vals.size > 2 or not set(vals.tolist()) <= {0, 1, 255}:
        shown = ", ".join(f"{v:g}" for v in vals[:6]) + (", ..." if vals.size > 6 else "")
        raise DataError(f"{path}: mask is not binary (values {shown}); expected 0/1")
    loaded.array = a > 0
    return loaded


# ----------------------------------------------------------------------------------------------------------- NIfTI
def check_geometry(affine: np.ndarray, spacing: tuple[float, ...], ndim: int, path: Path | str | None) -> None:
    """Raise :class:`DataError` for zero/negative/NaN spacing or an affine that is non-finite or not invertible
    (over the first ``min(ndim, 3)`` axes: a 2D image may leave the third column zero)."""
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.size and (not np.all(np.isfinite(sp)) or np.any(sp <= 0)):
        raise DataError(f"{_name(path)}voxel spacing {tuple(round(float(v), 6) for v in sp)} must be positive and finite "
                        "(check pixdim / PixelSpacing)")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise DataError(f"{_name(path)}affine is not a finite 4x4 matrix: {np.round(aff, 4).tolist()}")
    k = max(1, min(ndim, 3))
    sv = np.linalg.svd(aff[:3, :k], compute_uv=False)
    if sv.min() <= 1e-6 * max(sv.max(), 1e-300):
        raise DataError(f"{_name(path)}affine is singular (not invertible: voxel axes are zero or parallel): "
                        f"{np.round(aff[:3, :4], 4).tolist()}")


def read_nifti(path: str | Path) -> Loaded:
    """NIfTI via nibabel (scaling applied, float32 unless the file stores integers without scaling).

    The header is checked before any voxel is decoded: the size against the voxel budget, the dtype (complex and
    RGB refused), the number of volumes (a trailing singleton axis is squeezed, several volumes are refused), the
    spacing and the affine."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        dtype = np.dtype(img.get_data_dtype())
        with nib.openers.ImageOpener(str(path)) as f:  # nibabel silently "fixes" zero/negative pixdim: read it raw
            raw_pixdim = type(img.header).from_fileobj(f, check=False)["pixdim"]
        zooms_all = tuple(float(z) for z in raw_pixdim[1 : len(shape) + 1])
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel/gzip/zlib raise many types for broken files
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({type(e).__name__}: {e})") from None
    if not shape or 0 in shape:
        raise DataError(f"{path}: image is empty (header shape {shape})")
    check_voxel_budget(shape, str(path), what="NIfTI image (header size)")
    if dtype.fields is not None:
        raise DataError(f"{path}: NIfTI stores structured/RGB voxels (dtype {dtype}); convert it to one grey channel")
    if np.issubdtype(dtype, np.complexfloating):
        raise DataError(f"{path}: NIfTI stores complex voxels (dtype {dtype}); take the magnitude first")
    if not np.issubdtype(dtype, np.number) and dtype.kind != "b":
        raise DataError(f"{path}: NIfTI has a non-numeric dtype {dtype}")
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 3:
        raise DataError(f"{path}: {len(shape)}D NIfTI with {int(np.prod(squeezed[3:]))} volumes (shape {shape}); "
                        "extract the one volume to analyse first (e.g. fslroi in.nii.gz out.nii.gz 0 1)")
    if squeezed != shape:
        log.info("%s: squeezed the singleton axes of shape %s to %s", path, shape, squeezed)
    zooms = zooms_all[: min(len(squeezed), 3)]
    check_geometry(affine, zooms, len(squeezed), path)
    try:
        if img.dataobj.slope in (None, 1.0) and img.dataobj.inter in (None, 0.0) and np.issubdtype(dtype, np.integer):
            arr = np.asarray(img.dataobj)
        else:
            with np.errstate(over="raise"):
                arr = np.asarray(img.dataobj, dtype=np.float32)
    except FloatingPointError:
        raise DataError(f"{path}: voxel values (after scaling) overflow float32 (beyond +-3.4e38)") from None
    except Exception as e:
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({type(e).__name__}: {e})") from None
    arr = arr.reshape(squeezed)
    meta = {"format": "nifti", "path": str(path), "orientation": "".join(nib.aff2axcodes(affine)), "dtype": str(dtype)}
    meta.update(_xforms(img.header))
    return Loaded(arr, affine, zooms, meta)


def _xforms(header: Any) -> dict[str, Any]:
    """The qform/sform matrices and codes of a NIfTI header, so that maps and masks written for it keep them."""
    out: dict[str, Any] = {}
    for kind in ("qform", "sform"):
        try:
            mat, code = getattr(header, f"get_{kind}")(coded=True)
        except Exception:  # a header nibabel cannot decode this part of: leave it to the affine
            continue
        out[f"{kind}_code"] = int(code)
        out[kind] = None if mat is None else np.asarray(mat, float).tolist()
    return out


def _keep_xforms(img: Any, reference: Any) -> None:
    """Give a written NIfTI the input's qform/sform and codes (when ``reference`` is a NIfTI :class:`Loaded`)."""
    meta = getattr(reference, "meta", None) or {}
    if "sform_code" not in meta or "qform_code" not in meta:
        return
    coded = meta["sform"] if meta["sform_code"] > 0 else meta["qform"] if meta["qform_code"] > 0 else None
    if coded is None or not np.allclose(np.asarray(coded, float), reference.affine, atol=1e-5):
        return  # the reference's affine is no longer the header's (a changed copy): nibabel's defaults
    for kind in ("qform", "sform"):
        mat, code = meta.get(kind), int(meta[f"{kind}_code"])
        getattr(img, f"set_{kind}")(np.asarray(mat, float) if code > 0 and mat is not None else None, code=code)


# ----------------------------------------------------------------------------------------------------------- DICOM
def _dcm_read(path: Path, stop_before_pixels: bool = False) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None


def _int_tag(ds: Any, tag: str, default: int, path: Path) -> int:
    try:
        v = ds.get(tag, default)
        return default if v in (None, "") else int(v)
    except (TypeError, ValueError):
        raise DataError(f"{path}: DICOM tag {tag} is not a whole number ({ds.get(tag)!r})") from None


def _dcm_budget(ds: Any, path: Path, n_files: int = 1) -> None:
    """Rows x Columns x NumberOfFrames (x files of a series) from the header, checked before decoding."""
    rows, cols = _int_tag(ds, "Rows", 0, path), _int_tag(ds, "Columns", 0, path)
    frames = _int_tag(ds, "NumberOfFrames", 1, path)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DataError(f"{path}: DICOM image is empty (Rows {rows}, Columns {cols}, NumberOfFrames {frames})")
    shape = (frames * n_files, rows, cols) if frames * n_files > 1 else (rows, cols)
    check_voxel_budget(shape, str(path), what="DICOM image (header size)" if n_files == 1 else
                       f"DICOM series of {n_files} files (header size)")


def _pixel_spacing(ds: Any, path: Path, *tags: str) -> tuple[float, float] | None:
    for tag in tags:
        ps = ds.get(tag)
        if ps is not None:
            try:
                sp = (float(ps[0]), float(ps[1]))
            except (TypeError, ValueError, IndexError):
                raise DataError(f"{path}: DICOM {tag} {ps!r} is not two numbers") from None
            if not all(np.isfinite(sp)) or min(sp) <= 0:
                raise DataError(f"{path}: DICOM {tag} {sp} must be positive and finite")
            return sp
    return None


def _first(v: Any) -> float:
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def _dcm_pixels(ds: Any, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixel values after the modality LUT (slope/intercept), MONOCHROME1 inverted; window stored in meta."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (missing tag PixelData)")
    for tag in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if tag not in ds:
            raise DataError(f"{path}: DICOM file is missing the required tag {tag}")
    _dcm_budget(ds, path)
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise DataError(f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and ds.get("SamplesPerPixel", 1) > 1:
        raw = raw[..., :3].mean(axis=-1)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    inter = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    arr = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    meta: dict[str, Any] = {"format": "dicom", "rescale_slope": slope, "rescale_intercept": inter,
                            "photometric": str(ds.PhotometricInterpretation), "modality": str(ds.get("Modality", ""))}
    centre = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if centre is not None and width is not None:
        meta["window_center"], meta["window_width"] = _first(centre), _first(width)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        # Invert so that high = bright, and move the window with the values: v -> lo + hi - v.
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        raw_lo, raw_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = sorted((raw_lo * slope + inter, raw_hi * slope + inter))
        arr = np.float32(lo + hi) - arr
        if "window_center" in meta:
            meta["window_center"] = lo + hi - meta["window_center"]
        meta["inverted"] = True
    return arr, meta


def apply_window(arr: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Clip to the DICOM window ``[centre - width/2, centre + width/2]`` (linear, as in the standard's default)."""
    if width <= 0:
        raise DataError(f"DICOM window width must be positive, got {width}")
    return np.clip(arr, centre - width / 2.0, centre + width / 2.0)


def read_dicom(path: str | Path, *, window: bool = False) -> Loaded:
    """One DICOM file as a 2D ``(rows, cols)`` image (multi-frame files give ``(frames, rows, cols)``).

    Values are after RescaleSlope/Intercept; MONOCHROME1 is inverted; ``window=True`` also clips to the file's
    window (otherwise ``meta['window_center'/'window_width']`` keep it for the ``cxr`` preset)."""
    path = Path(path)
    ds = _dcm_read(path)
    arr, meta = _dcm_pixels(ds, path)
    meta["path"] = str(path)
    ps = _pixel_spacing(ds, path, "PixelSpacing", "ImagerPixelSpacing")
    row_sp, col_sp = ps if ps is not None else (1.0, 1.0)
    meta["spacing_known"] = ps is not None
    if window and "window_center" in meta:
        arr = apply_window(arr, meta["window_center"], meta["window_width"])
    affine = np.diag([row_sp, col_sp, 1.0, 1.0]) if arr.ndim == 2 else np.diag([1.0, row_sp, col_sp, 1.0])
    return Loaded(arr, affine, (row_sp, col_sp) if arr.ndim == 2 else (1.0, row_sp, col_sp), meta)


def read_dicom_series(path: str | Path, *, allow_irregular_spacing: bool = False) -> Loaded:
    """A folder of single-slice DICOM files as a volume ``(col, row, slice)`` with a RAS affine.

    Slices are sorted along the slice normal by ImagePositionPatient, or by InstanceNumber when positions are missing
    (then the spacing comes from SliceThickness). Mixed series (several SeriesInstanceUIDs), two slices at the same
    position and uneven slice steps raise; ``allow_irregular_spacing=True`` instead resamples uneven slices linearly
    onto a regular grid at the median step (logged; ``meta['resampled_slices']`` says so).
    """
    path = Path(path)
    try:
        entries = list(path.iterdir())
        files = sorted(p for p in entries if p.is_file() and not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"{path}: permission denied: the folder cannot be listed by this user") from None
    except OSError as e:
        raise DataError(f"{path}: cannot list the DICOM folder ({e.strerror or type(e).__name__})") from None
    if not files:
        subs = [p.name for p in entries if p.is_dir()]
        raise DataError(f"{path}: DICOM folder is empty" + (f" (only subfolders {subs[:3]}: point at one series folder)"
                                                             if subs else ""))
    heads = [(_dcm_read(f, stop_before_pixels=True), f) for f in files]
    uids = {str(h.get("SeriesInstanceUID", "")) for h, _ in heads}
    if len(uids) > 1:
        raise DataError(f"{path}: folder mixes {len(uids)} DICOM series; put one series per folder")
    h0 = heads[0][0]
    if "Rows" in h0 and "Columns" in h0:
        _dcm_budget(h0, path, n_files=len(heads))
    iop = h0.get("ImageOrientationPatient")
    have_pos = iop is not None and all(h.get("ImagePositionPatient") is not None for h, _ in heads)
    if have_pos:
        try:
            r = np.array([float(v) for v in iop[:3]])  # direction of increasing column index
            c = np.array([float(v) for v in iop[3:6]])  # direction of increasing row index
            pos = [np.array([float(v) for v in h.ImagePositionPatient][:3]) for h, _ in heads]
        except (TypeError, ValueError):
            raise DataError(f"{path}: ImageOrientationPatient/ImagePositionPatient are not numbers") from None
        normal = np.cross(r, c)
        if r.shape != (3,) or not np.all(np.isfinite(np.concatenate([r, c, *pos]))) or np.linalg.norm(normal) < 1e-3:
            raise DataError(f"{path}: ImageOrientationPatient {[float(v) for v in iop]} does not give two independent "
                            "directions (or positions are not finite)")
        normal = normal / np.linalg.norm(normal)
        order = np.argsort([float(p @ normal) for p in pos], kind="stable")
    elif all(h.get("InstanceNumber") is not None for h, _ in heads):
        r, c, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        pos = None
        order = np.argsort([int(h.InstanceNumber) for h, _ in heads], kind="stable")
    else:
        raise DataError(f"{path}: cannot order the DICOM series: ImagePositionPatient/ImageOrientationPatient and "
                        "InstanceNumber are missing")
    names = [heads[i][1].name for i in order]
    depth = np.array([float(pos[i] @ normal) for i in order]) if pos is not None else None
    if depth is not None and len(depth) > 1:
        steps = np.diff(depth)
        med = float(np.median(steps))
        dup = np.flatnonzero(steps <= max(DUP_FRACTION * med, 1e-6))
        if dup.size:
            k = int(dup[0])
            more = f" ({dup.size} such pairs)" if dup.size > 1 else ""
            raise DataError(f"{path}: duplicate slice position: {names[k]} and {names[k + 1]} are both at {depth[k]:.3f} "
                            f"mm along the slice normal{more} (repeated or mixed acquisitions; keep one series per folder)")
        lo, hi = float(steps.min()), float(steps.max())
        irregular = hi - lo > SPACING_RTOL * med + SPACING_ATOL
        if irregular and not allow_irregular_spacing:
            raise DataError(f"{path}: slice spacing varies from {lo:.3f} to {hi:.3f} mm (median {med:.3f}; missing "
                            "slices?); pass allow_irregular_spacing=True (`medanomaly predict --allow-irregular-spacing`) to "
                            "resample onto a regular grid")
    else:
        irregular = False
    slices, metas = [], []
    for i in order:
        arr, meta = _dcm_pixels(_dcm_read(heads[i][1]), heads[i][1])
        if arr.ndim != 2:
            raise DataError(f"{heads[i][1]}: expected a single-frame slice in a series, got shape {arr.shape}")
        slices.append(arr)
        metas.append(meta)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DataError(f"{path}: slices of the series have different sizes {sorted(shapes)}")
    vol = np.stack([s.T for s in slices], axis=-1)  # (col, row, slice)
    ps = _pixel_spacing(h0, path, "PixelSpacing")
    row_sp, col_sp = ps if ps is not None else (1.0, 1.0)
    extra: dict[str, Any] = {}
    if irregular:
        vol, step_mm = _regular_slices(vol, depth, path)
        step = normal * step_mm
        origin = pos[order[0]]
        log.warning("%s: slice spacing varies from %.3f to %.3f mm; resampled %d slices onto %d at %.3f mm",
                    path, float(np.diff(depth).min()), float(np.diff(depth).max()), len(depth), vol.shape[-1], step_mm)
        extra = {"resampled_slices": True, "slice_positions": depth.tolist()}
    elif pos is not None and len(order) > 1:
        p_sorted = [pos[i] for i in order]
        step = (p_sorted[-1] - p_sorted[0]) / (len(order) - 1)
        origin = p_sorted[0]
    else:
        try:
            thick = float(h0.get("SpacingBetweenSlices", h0.get("SliceThickness", 1.0)) or 1.0)
        except (TypeError, ValueError):
            thick = 1.0
        if not np.isfinite(thick) or thick <= 0:
            raise DataError(f"{path}: slice thickness {thick} must be positive and finite")
        step = normal * thick
        origin = pos[order[0]] if pos is not None else np.zeros(3)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = r * col_sp, c * row_sp, step, origin
    check_geometry(aff, (), 3, path)
    meta = dict(metas[0])
    meta.update({"format": "dicom-series", "path": str(path), "n_slices": vol.shape[-1], "sorted_by":
                 "ImagePositionPatient" if pos is not None else "InstanceNumber", "files": names, **extra})
    return Loaded(vol.astype(np.float32), LPS_TO_RAS @ aff, (), meta)


def _regular_slices(vol: np.ndarray, depth: np.ndarray, path: Path) -> tuple[np.ndarray, float]:
    """Linear interpolation of the slices at ``depth`` (sorted, mm) onto a regular grid at the median step."""
    step = float(np.median(np.diff(depth)))
    n = int(np.floor((depth[-1] - depth[0]) / step + 1e-6)) + 1
    check_voxel_budget((*vol.shape[:2], n), f"{path}: resampling the slices onto a regular grid")
    t = depth[0] + step * np.arange(n)
    hi = np.clip(np.searchsorted(depth, t, side="right"), 1, len(depth) - 1)
    w = ((t - depth[hi - 1]) / (depth[hi] - depth[hi - 1])).astype(np.float32)
    out = vol[..., hi - 1] * (1 - w) + vol[..., hi] * w
    return out.astype(np.float32), step


# -------------------------------------------------------------------------------------------------- PNG/JPEG/TIFF
def read_pil(path: str | Path, *, grey: bool = True) -> Loaded:
    """PNG/JPEG/TIFF/BMP via Pillow: ``(rows, cols)`` (``grey=True``: colour converted to luminance).

    The size in the header is checked against the voxel budget before decoding; Pillow's own decompression-bomb
    limit is set aside so that the budget (``MEDANOMALY_MAX_VOXELS``), not Pillow, decides."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(path)
            except Image.DecompressionBombError:
                im = _open_unlimited(path)
        with im:
            w, h = im.size
            check_voxel_budget((h, w), str(path), what=f"{im.format or 'image'} image (header size)")
            if w <= 0 or h <= 0:
                raise DataError(f"{path}: image is empty (size {w}x{h})")
            im.load()
            if grey and im.mode not in ("L", "I", "I;16", "F", "1"):
                im = im.convert("L")
            arr = np.array(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated image file ({type(e).__name__}: {e})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return Loaded(arr, np.eye(4), (1.0, 1.0), {"format": "pil", "path": str(path)})


def _open_unlimited(path: Path) -> Any:
    """``Image.open`` with Pillow's pixel limit off (for images Pillow calls bombs; the caller checks the budget)."""
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return im


_PIL_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------------ LGG .npz
def read_lgg_npz(path: str | Path) -> Loaded:
    """The shared LGG per-patient ``.npz``: ``array`` = FLAIR slices (S, 256, 256), ``meta['mask']`` the tumour mask
    (S, 256, 256) bool and ``meta['slice_number']`` (S,). No spacing is stored (identity affine)."""
    path = Path(path)
    try:
        with np.load(path) as z:
            missing = [k for k in ("flair", "mask", "slice_number") if k not in z.files]
            if missing:
                raise DataError(f"{path}: LGG .npz lacks the keys {missing} (has {z.files})")
            for key in ("flair", "mask"):  # sizes from the .npy headers, before decompressing
                with z.zip.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    fmt = np.lib.format
                    shape = (fmt.read_array_header_1_0(f) if version == (1, 0) else fmt.read_array_header_2_0(f))[0]
                check_voxel_budget(shape, str(path), what=f"LGG array {key!r}")
            flair, mask, num = z["flair"], z["mask"], z["slice_number"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable or truncated .npz file ({type(e).__name__}: {e})") from None
    if flair.ndim != 3 or mask.shape != flair.shape or num.shape != (flair.shape[0],):
        raise DataError(f"{path}: inconsistent LGG arrays: flair {flair.shape}, mask {mask.shape}, slice_number {num.shape}")
    check_array(flair, path, what="flair")
    return Loaded(flair, np.eye(4), (1.0, 1.0, 1.0),
                  {"format": "npz", "path": str(path), "mask": mask > 0, "slice_number": num.astype(int)})


# -------------------------------------------------------------------------------------------------------- writers
def resample_to_reference(
    arr: np.ndarray, arr_affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Resample a 3D array given in ``arr_affine`` onto the grid ``(ref_shape, ref_affine)`` (world coordinates)."""
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(np.asarray(arr_affine, float)) @ np.asarray(ref_affine, float)  # ref voxel -> arr voxel
    return affine_transform(np.asarray(arr, np.float32), m[:3, :3], offset=m[:3, 3], output_shape=tuple(ref_shape),
                            order=order, mode="constant", cval=cval)


def write_nifti_map(
    amap: np.ndarray | Any, reference: Loaded | np.ndarray, path: str | Path, *, map_affine: np.ndarray | None = None
) -> Path:
    """Save a 3D (or 2D) anomaly map as NIfTI in the geometry of ``reference`` (a :class:`Loaded` or a 4x4 affine).

    If ``map_affine`` is given (e.g. the affine of a preprocessed volume) and ``reference`` is a :class:`Loaded`, the
    map is resampled into the reference's own grid, so it overlays the input image voxel for voxel.
    """
    import nibabel as nib

    from medanomaly.data.arrays import to_numpy

    a = np.asarray(to_numpy(amap), dtype=np.float32)
    a = np.squeeze(a) if a.ndim > 3 else a
    check_array(a, path, what="anomaly map")
    if isinstance(reference, Loaded):
        ref_aff, ref_shape = reference.affine, reference.shape
        if map_affine is not None and (a.shape != ref_shape or not np.allclose(map_affine, ref_aff)):
            a = resample_to_reference(a, map_affine, ref_shape, ref_aff)
        elif a.shape != ref_shape:
            raise DataError(f"{path}: map shape {a.shape} differs from the reference image shape {ref_shape}; "
                            "pass map_affine to resample it")
    else:
        ref_aff = np.asarray(reference, float)
        if ref_aff.shape != (4, 4):
            raise DataError(f"{path}: reference must be a Loaded image or a 4x4 affine, got shape {ref_aff.shape}")
    path = Path(path)
    img = nib.Nifti1Image(a, ref_aff)
    if isinstance(reference, Loaded):  # (a resampled map is on the reference's grid too)
        _keep_xforms(img, reference)
    img.header.set_xyzt_units("mm")
    with _writing(path):
        nib.save(img, str(path))
    return path


def write_nifti_mask(mask: np.ndarray | Any, reference: Loaded, path: str | Path) -> Path:
    """Save a binary mask (uint8 0/1) as NIfTI with the shape and affine of ``reference`` (no resampling)."""
    import nibabel as nib

    from medanomaly.data.arrays import to_numpy

    m = np.asarray(to_numpy(mask)).astype(bool)
    if m.shape != reference.shape:
        raise DataError(f"{path}: mask shape {m.shape} differs from the reference image shape {reference.shape}")
    path = Path(path)
    img = nib.Nifti1Image(m.astype(np.uint8), reference.affine)
    _keep_xforms(img, reference)
    img.header.set_xyzt_units("mm")
    with _writing(path):
        nib.save(img, str(path))
    return path


class _writing:
    """Create the parent folder, and turn OSErrors of writing ``path`` into a DataError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self.path}: cannot create the output folder {self.path.parent} "
                            f"({e.strerror or type(e).__name__}; is a file in the way?)") from None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if isinstance(err, OSError):
            raise DataError(f"{self.path}: cannot write the file ({err.strerror or type(err).__name__}: {err})") from None
        return False


def write_png_map(amap: np.ndarray | Any, path: str | Path, *, vmin: float | None = None, vmax: float | None = None) -> Path:
    """Save a 2D map as an 8-bit grey PNG scaled from [vmin, vmax] (default: the map's range)."""
    from PIL import Image

    from medanomaly.data.arrays import to_numpy

    a = np.squeeze(np.asarray(to_numpy(amap), dtype=np.float64))
    if a.ndim != 2:
        raise DataError(f"{path}: write_png_map needs a 2D map, got shape {a.shape}")
    check_array(a, path, what="map")
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    u8 = np.clip(np.round((a - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
    path = Path(path)
    with _writing(path):
        Image.fromarray(u8).save(path)
    return path


def save_overlay_png(
    image: np.ndarray | Any,
    heatmap: np.ndarray | Any,
    mask: np.ndarray | Any | None = None,
    path: str | Path = "overlay.png",
    *,
    slice_index: int | None = None,
    alpha: float = 0.45,
    cmap: str = "inferno",
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Image in grey, the heat-map semi-transparent on top, the lesion mask as a contour; saves a PNG.

    3D inputs: the axial slice ``slice_index`` of the last axis (default: the slice with the highest heat).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medanomaly.data.arrays import to_numpy

    img = np.squeeze(np.asarray(to_numpy(image), dtype=np.float32))
    heat = np.squeeze(np.asarray(to_numpy(heatmap), dtype=np.float32))
    msk = None if mask is None else np.squeeze(np.asarray(to_numpy(mask))).astype(bool)
    if img.shape != heat.shape or (msk is not None and msk.shape != img.shape):
        raise DataError(f"{path}: overlay shapes differ: image {img.shape}, heatmap {heat.shape}"
                        + (f", mask {msk.shape}" if msk is not None else ""))
    if img.ndim == 3:
        k = int(np.argmax(heat.reshape(-1, heat.shape[-1]).max(axis=0))) if slice_index is None else slice_index
        img, heat = img[..., k], heat[..., k]
        msk = None if msk is None else msk[..., k]
    elif img.ndim != 2:
        raise DataError(f"{path}: overlay needs a 2D or 3D image, got shape {img.shape}")
    check_array(img, path)
    check_array(heat, path, what="heatmap")
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(img, cmap="gray", interpolation="nearest")
    h = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    if msk is not None and msk.any():
        ax.contour(msk.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
    fig.colorbar(h, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    try:
        with _writing(path):
            fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
