"""Manifests: users' own data as a CSV or JSON table.

Columns: ``case_id``, ``image`` (required), ``mask``, ``label`` (1 abnormal / 0 normal), ``split`` (default
``train``), ``patient_id``, ``brain_mask`` (all optional). ``brain_mask``: a binary brain mask on the image's grid;
presets with ``foreground="brain"`` use it instead of computing one, ``foreground="mask"`` requires it.
Multi-class lesion masks (e.g. BraTS labels 0-4) need ``lesion_labels`` (``"1,2,4"``, a list, or ``">0"``); without
it a mask must be binary. JSON: a list of such records, or ``{"cases": [...]}``. Relative paths are
resolved against the manifest's folder. Images may be 2D (PNG/JPEG/TIFF/DICOM file) or 3D (NIfTI, DICOM folder).

Views: 2D images are one sample each. 3D volumes are one sample each with ``view="volumes"`` (preset
``brain-mri-3d``; pass ``size`` to get one shape for all cases, otherwise each is padded to a multiple of 16), or
axial slices with ``view="slices"`` (preset ``brain-mri-2d``, per-volume intensity clip, slice filter).
A missing label is taken from the mask (any lesion voxel) when there is one, else unknown (-1). Image and mask must
have the same shape and affine; otherwise a :class:`DataError` names both files.

Checks (one :class:`DataError` lists every problem row, not only the first): missing or unreadable files, bad
labels, rows without ``image``; ``case_id`` must be unique, since per-case metrics group samples by it, and an image
file may appear in one row only. The one exception is 2D slices of one case: rows that share a ``case_id`` are
allowed when each has a distinct integer in the optional ``slice`` column (they are then one case with several
slices, as in the LGG set; ``slice`` is refused for 3D images). Paths that lead outside the manifest's folder (``..``
or absolute) are allowed and logged once per manifest.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.dataset import ImageDataset, ItemDataset, SliceDataset
from medanomaly.data.geometry import volume_to_slices
from medanomaly.data.io import DataError, Loaded, read_image, read_mask
from medanomaly.data.masks import lesion_labels as parse_lesion_labels
from medanomaly.data.masks import select_lesion
from medanomaly.data.presets import Preset, get_preset
from medanomaly.data.volumes import check_geometry as _check_geometry

__all__ = ["read_manifest", "load_manifest_dataset", "write_manifest", "read_lesion_mask"]

COLUMNS = ("case_id", "image", "mask", "label", "split", "patient_id")
OPTIONAL_COLUMNS = ("slice", "brain_mask")
MAX_LISTED = 10  # problems named in the one error; the rest are counted

log = logging.getLogger("medanomaly.data")


def _readable(p: Path) -> str | None:
    """None if ``p`` can be opened (a file) or listed (a folder), else the reason."""
    try:
        if p.is_dir():
            next(iter(os.scandir(p)), None)
        else:
            with open(p, "rb") as f:
                f.read(1)
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a manifest; returns records with absolute ``image``/``mask`` paths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            rows = data.get("cases") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise DataError(f"{path}: JSON manifest must be a list of records or {{'cases': [...]}}")
        elif path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            raise DataError(f"{path}: manifest must be .csv or .json")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse manifest ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    folder = path.parent.resolve()
    out, problems, outside = [], [], []
    for n, r in enumerate(rows, start=1):
        if not isinstance(r, dict):
            problems.append(f"row {n} is not a record")
            continue
        r = {str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k is not None}
        if not r.get("image"):
            problems.append(f"row {n} has no 'image' (required columns: case_id, image)")
            continue
        rec: dict[str, Any] = {"case_id": str(r.get("case_id") or Path(str(r["image"])).name.split(".")[0]),
                               "split": str(r.get("split") or "train"), "patient_id": str(r.get("patient_id") or "")}
        where = f"row {n} ({rec['case_id']})"
        for key in ("image", "mask", "brain_mask"):
            v = r.get(key)
            rec[key] = None
            if not v:
                continue
            p = Path(str(v)).expanduser()
            p = p if p.is_absolute() else (path.parent / p)
            rec[key] = p
            if not p.exists():
                problems.append(f"{where}: {key} file {p} not found")
                continue
            why = _readable(p)
            if why:
                problems.append(f"{where}: {key} file {p} cannot be read ({why})")
            if not p.resolve().is_relative_to(folder):
                outside.append(p)
        lab = r.get("label")
        rec["label"] = None
        if lab not in (None, ""):
            try:
                rec["label"] = int(float(lab))
            except (TypeError, ValueError):
                problems.append(f"{where}: label {lab!r} is not 0/1")
            else:
                if rec["label"] not in (0, 1, -1):
                    problems.append(f"{where}: label {rec['label']} is not 0/1")
        sl = r.get("slice")
        rec["slice"] = None
        if sl not in (None, ""):
            try:
                rec["slice"] = int(sl)
            except (TypeError, ValueError):
                problems.append(f"{where}: slice {sl!r} is not a whole number")
        rec["row"] = n
        out.append(rec)
    problems += _duplicates(out)
    if problems:
        more = len(problems) - MAX_LISTED
        shown = "; ".join(problems[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise DataError(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: {shown}")
    if outside:
        log.info("%s: %d path(s) lead outside the manifest's folder, e.g. %s", path, len(outside), outside[0])
    return out


def _duplicates(recs: list[dict[str, Any]]) -> list[str]:
    """Repeated case ids (unless all their rows carry distinct ``slice`` numbers) and images listed twice."""
    problems = []
    by_id: dict[str, list[dict[str, Any]]] = {}
    by_image: dict[Path, list[int]] = {}
    for r in recs:
        by_id.setdefault(r["case_id"], []).append(r)
        by_image.setdefault(Path(os.path.abspath(r["image"])), []).append(r["row"])
    for cid, rs in by_id.items():
        if len(rs) < 2:
            continue
        slices = [r["slice"] for r in rs]
        rows = [r["row"] for r in rs]
        if None in slices:
            problems.append(f"case_id {cid!r} is used by rows {rows} (case ids must be unique; rows that are slices of "
                            "one case need distinct numbers in a 'slice' column)")
        elif len(set(slices)) < len(slices):
            problems.append(f"case_id {cid!r}: rows {rows} repeat a slice number ({slices})")
    for img, rows in by_image.items():
        if len(rows) > 1:
            problems.append(f"image {img} is listed in rows {rows}")
    return problems


def write_manifest(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records (keys from ``case_id, image, mask, label, split, patient_id`` [, ``slice``, ``brain_mask``]) as
    CSV or JSON."""
    path = Path(path)
    cols = COLUMNS + tuple(k for k in OPTIONAL_COLUMNS if any(r.get(k) is not None for r in records))
    rows = [{k: ("" if r.get(k) is None else str(r.get(k))) for k in cols} for r in records]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"cases": rows}, indent=1))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return path


def read_lesion_mask(path: str | Path, labels: tuple[int, ...] | str | None = None, *,
                     expect_dims: int | None = None) -> Loaded:
    """A lesion mask as bool: binary files as they are; a multi-class label map through ``labels``
    (:func:`~medanomaly.data.masks.lesion_labels`); a multi-class map without ``labels`` is refused, naming the
    option."""
    if labels is None:
        try:
            return read_mask(path, expect_dims=expect_dims)
        except DataError as e:
            if "not binary" in str(e):
                raise DataError(f"{e}; for a multi-class label map choose the lesion labels (--lesion-labels 1,2,4 or "
                                "'>0', or lesion_labels=... in the data spec)") from None
            raise
    ld = read_image(path, expect_dims=expect_dims)
    ld.array = select_lesion(ld.array, labels, where=f"{path}: ")
    return ld


def _extras(rec: dict[str, Any], img: Loaded, labels: Any, dims: int) -> tuple[Loaded | None, Loaded | None]:
    """The row's lesion mask and brain mask, each checked against the image's geometry."""
    out: list[Loaded | None] = []
    for key in ("mask", "brain_mask"):
        if rec.get(key) is None:
            out.append(None)
            continue
        mk = read_lesion_mask(rec[key], labels, expect_dims=dims) if key == "mask" else read_mask(rec[key], expect_dims=dims)
        _check_geometry(img, mk, rec["image"], rec[key])
        out.append(mk)
    return out[0], out[1]


def _item_2d(rec: dict[str, Any], pre: Preset, labels: Any = None) -> Any:
    img = read_image(rec["image"], expect_dims=2)
    mk, br = _extras(rec, img, labels, 2)
    kw = {} if br is None else {"brain": br.array}
    return pre(img, None if mk is None else mk.array, **kw)


def _item_3d(rec: dict[str, Any], pre: Preset, labels: Any = None) -> Any:
    img = read_image(rec["image"], expect_dims=3)
    mk, br = _extras(rec, img, labels, 3)
    return pre(img, mk, **({} if br is None else {"brain": br}))


def _volume_slices(rec: dict[str, Any], labels: Any) -> tuple[Any, ...]:
    """A ``SliceDataset`` case loader: (slices, lesion slices, numbers, label, brain slices) of a volume row."""
    img = read_image(rec["image"], expect_dims=3)
    mk, br = _extras(rec, img, labels, 3)
    sl = volume_to_slices(img.array, img.affine)
    m = None if mk is None else volume_to_slices(mk.array, mk.affine)
    b = None if br is None else volume_to_slices(br.array, br.affine)
    return sl, m, np.arange(sl.shape[0]), -1 if rec["label"] is None else rec["label"], b


def _label(rec: dict[str, Any], labels: Any = None) -> int:
    if rec["label"] is not None:
        return int(rec["label"])
    if rec["mask"] is not None:
        return int(read_lesion_mask(rec["mask"], labels).array.any())
    return -1


def load_manifest_dataset(
    path: str | Path,
    split: str = "train",
    *,
    normal_only: bool = False,
    preset: str | Preset | None = None,
    size: Any = None,
    max_cases: int | None = None,
    view: str = "auto",
    cache_size: int = 8,
    quiet: bool = True,
    lesion_labels: Any = None,
    **preset_params: Any,
) -> ImageDataset:
    """A dataset from a manifest's ``split`` rows (``split="all"``: every row). See the module docstring."""
    try:
        labels = parse_lesion_labels(lesion_labels)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    recs = read_manifest(path)
    splits = sorted({r["split"] for r in recs})
    if split != "all":
        recs = [r for r in recs if r["split"] == split]
        if not recs:
            raise ValueError(f"{path}: no rows with split {split!r}; splits present: {splits}")
    recs = recs[:max_cases] if max_cases else recs
    first: Loaded = read_image(recs[0]["image"])
    ndim = 2 if first.array.ndim == 2 or (first.array.ndim == 3 and first.array.shape[-1] in (3, 4)
                                          and first.meta.get("format") == "pil") else 3
    if ndim == 3 and any(r["slice"] is not None for r in recs):
        raise DataError(f"{path}: the 'slice' column is for 2D image rows that are slices of one case; "
                        f"{recs[0]['image']} is a 3D volume (use view='slices' to slice volumes)")
    if view == "auto":
        view = "images" if ndim == 2 else "volumes"
    name = Path(path).stem
    params = {k: v for k, v in preset_params.items() if v is not None}
    if ndim == 2:
        if view not in ("images", "auto"):
            raise ValueError(f"{path}: images are 2D; view {view!r} applies to 3D volumes only")
        pre = get_preset(preset or "brain-mri-2d", **({"size": size} if size is not None else {}), **params)
        items = [(r["case_id"], partial(_item_2d, r, pre, labels), _label(r, labels)) for r in recs]
    elif view == "slices":
        pre = get_preset(preset or "brain-mri-2d", **({"size": size} if size is not None else {}), **params)
        if pre.spatial_dims != 2 or not hasattr(pre, "apply_slices"):
            raise ValueError(f"{path}: view='slices' needs a 2D slice preset (brain-mri-2d), got {pre.name}")
        cases = [(r["case_id"], partial(_volume_slices, r, labels)) for r in recs]
        return SliceDataset(cases, pre, normal_only=normal_only, name=name, cache_size=cache_size, quiet=quiet)
    elif view == "volumes":
        if size is not None:
            params["size"] = tuple(int(s) for s in np.broadcast_to(np.asarray(size, int), (3,)))
        pre = get_preset(preset or "brain-mri-3d", **params)
        items = [(r["case_id"], partial(_item_3d, r, pre, labels), _label(r, labels)) for r in recs]
    else:
        raise ValueError(f"view must be 'volumes' or 'slices' for 3D data, got {view!r}")
    if normal_only:
        items = [it for it in items if it[2] == 0]
        if not items:
            raise ValueError(f"{path}: normal_only=True leaves no rows (no label 0 in split {split!r})")
    return ItemDataset(items, spatial_dims=ndim, name=name, preset=pre.name, cache_size=cache_size)
