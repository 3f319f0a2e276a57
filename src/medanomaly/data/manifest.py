"""Manifests: users' own data as a CSV or JSON table.

Columns: ``case_id``, ``image`` (required), ``mask``, ``label`` (1 abnormal / 0 normal), ``split`` (default
``train``), ``patient_id`` (all optional). JSON: a list of such records, or ``{"cases": [...]}``. Relative paths are
resolved against the manifest's folder. Images may be 2D (PNG/JPEG/TIFF/DICOM file) or 3D (NIfTI, DICOM folder).

Views: 2D images are one sample each. 3D volumes are one sample each with ``view="volumes"`` (preset
``brain-mri-3d``; pass ``size`` to get one shape for all cases, otherwise each is padded to a multiple of 16), or
axial slices with ``view="slices"`` (preset ``brain-mri-2d``, per-volume intensity clip, slice filter).
A missing label is taken from the mask (any lesion voxel) when there is one, else unknown (-1). Image and mask must
have the same shape and affine; otherwise a :class:`DataError` names both files.
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.dataset import ImageDataset, ItemDataset, SliceDataset
from medanomaly.data.io import DataError, Loaded, read_image, read_mask
from medanomaly.data.preprocess import Preset, get_preset
from medanomaly.data.samples import _check_geometry, _vol_slices

__all__ = ["read_manifest", "load_manifest_dataset", "write_manifest"]

COLUMNS = ("case_id", "image", "mask", "label", "split", "patient_id")


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
    out = []
    for n, r in enumerate(rows, start=1):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {n} is not a record")
        r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k is not None}
        if not r.get("image"):
            raise DataError(f"{path}: row {n} has no 'image' (required columns: case_id, image)")
        rec: dict[str, Any] = {"case_id": str(r.get("case_id") or Path(str(r["image"])).name.split(".")[0]),
                               "split": str(r.get("split") or "train"), "patient_id": str(r.get("patient_id") or "")}
        for key in ("image", "mask"):
            v = r.get(key)
            if v:
                p = Path(str(v)).expanduser()
                p = p if p.is_absolute() else (path.parent / p)
                if not p.exists():
                    raise DataError(f"{path}: row {n} ({rec['case_id']}): {key} file {p} not found")
                rec[key] = p
            else:
                rec[key] = None
        lab = r.get("label")
        if lab in (None, ""):
            rec["label"] = None
        else:
            try:
                rec["label"] = int(float(lab))
            except (TypeError, ValueError):
                raise DataError(f"{path}: row {n} ({rec['case_id']}): label {lab!r} is not 0/1") from None
            if rec["label"] not in (0, 1, -1):
                raise DataError(f"{path}: row {n} ({rec['case_id']}): label {rec['label']} is not 0/1")
        out.append(rec)
    return out


def write_manifest(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records (keys from ``case_id, image, mask, label, split, patient_id``) as CSV or JSON."""
    path = Path(path)
    rows = [{k: ("" if r.get(k) is None else str(r.get(k))) for k in COLUMNS} for r in records]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"cases": rows}, indent=1))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return path


def _item_2d(rec: dict[str, Any], pre: Preset) -> Any:
    img = read_image(rec["image"], expect_dims=2)
    mk = None
    if rec["mask"] is not None:
        mk = read_mask(rec["mask"], expect_dims=2)
        _check_geometry(img, mk, rec["image"], rec["mask"])
    return pre(img, None if mk is None else mk.array)


def _item_3d(rec: dict[str, Any], pre: Preset) -> Any:
    img = read_image(rec["image"], expect_dims=3)
    mk = None
    if rec["mask"] is not None:
        mk = read_mask(rec["mask"], expect_dims=3)
        _check_geometry(img, mk, rec["image"], rec["mask"])
    return pre(img, mk)


def _label(rec: dict[str, Any]) -> int:
    if rec["label"] is not None:
        return int(rec["label"])
    if rec["mask"] is not None:
        return int(read_mask(rec["mask"]).array.any())
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
    **preset_params: Any,
) -> ImageDataset:
    """A dataset from a manifest's ``split`` rows (``split="all"``: every row). See the module docstring."""
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
    if view == "auto":
        view = "images" if ndim == 2 else "volumes"
    name = Path(path).stem
    params = {k: v for k, v in preset_params.items() if v is not None}
    if ndim == 2:
        if view not in ("images", "auto"):
            raise ValueError(f"{path}: images are 2D; view {view!r} applies to 3D volumes only")
        pre = get_preset(preset or "brain-mri-2d", **({"size": size} if size is not None else {}), **params)
        items = [(r["case_id"], partial(_item_2d, r, pre), _label(r)) for r in recs]
    elif view == "slices":
        pre = get_preset(preset or "brain-mri-2d", **({"size": size} if size is not None else {}), **params)
        cases = [(r["case_id"], partial(_vol_slices, r["image"], r["mask"], -1 if r["label"] is None else r["label"]))
                 for r in recs]
        return SliceDataset(cases, pre, normal_only=normal_only, name=name, cache_size=cache_size, quiet=quiet)
    elif view == "volumes":
        if size is not None:
            params["size"] = tuple(int(s) for s in np.broadcast_to(np.asarray(size, int), (3,)))
        pre = get_preset(preset or "brain-mri-3d", **params)
        items = [(r["case_id"], partial(_item_3d, r, pre), _label(r)) for r in recs]
    else:
        raise ValueError(f"view must be 'volumes' or 'slices' for 3D data, got {view!r}")
    if normal_only:
        items = [it for it in items if it[2] == 0]
        if not items:
            raise ValueError(f"{path}: normal_only=True leaves no rows (no label 0 in split {split!r})")
    return ItemDataset(items, spatial_dims=ndim, name=name, preset=pre.name, cache_size=cache_size)
