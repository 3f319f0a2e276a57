"""What the viewer shows: ``view.json`` records written beside maps (by ``predict``, :func:`add_predict_case`) and
report cases (by ``evaluate``, :func:`medanomaly.evaluation.overlays.write_report_cases`), read back as cases.

A folder the viewer opens holds ``view.json`` (``predict --out`` folders) or ``cases/view.json`` (``evaluate``
report folders): ``{"version": 1, "cases": [...]}``, one entry per case with its id, the files of its image, map,
foreground (the voxels the model evaluated) and lesion (when known), or one ``npz`` holding them; the colour
scale (:meth:`medanomaly.evaluation.overlays.MapScale.to_json`), the calibrated voxel/image thresholds and the
image score. A ``predict`` folder written before ``view.json`` existed is read from its ``scores.csv``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VIEW_FILE", "CaseData", "ViewerError", "add_predict_case", "find_view", "load_case"]

VIEW_FILE = "view.json"
VIEW_VERSION = 1


class ViewerError(ValueError):
    """A folder the viewer cannot show (one line, for the command line)."""


@dataclass
class CaseData:
    """One case's arrays on one grid: image, map, and optional foreground/lesion masks; ``affine`` when the image
    has a real patient geometry."""

    image: np.ndarray
    amap: np.ndarray
    foreground: np.ndarray | None
    lesion: np.ndarray | None
    affine: np.ndarray | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ViewerError(f"{path}: not a readable viewer record ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("cases"), list):
        raise ViewerError(f"{path}: not a viewer record (no list of cases)")
    return rec


def _write_json(path: Path, rec: dict[str, Any]) -> None:
    from medanomaly.evaluation import json_safe
    from medanomaly.training.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(json_safe(rec), indent=1) + "\n")


# --------------------------------------------------------------------------------------------------- writing
def add_predict_case(out: Path, stem: str, loaded: Any, input_path: Path, amap: np.ndarray, foreground: Any,
                     scale: Any, thresholds: dict[str, Any] | None, image_score: float, run: str | Path,
                     method: str | None) -> None:
    """``predict``'s record of one input: writes ``<stem>_foreground`` (NIfTI for volumes/NIfTI input, else PNG)
    and adds/replaces the case in ``out/view.json``."""
    from medanomaly.data.io import write_nifti_mask
    from medanomaly.evaluation.overlays import AFFINE_FORMATS, image_scale

    out = Path(out)
    fg = np.asarray(foreground) > 0.5 if foreground is not None else np.ones(np.shape(amap), bool)
    if np.ndim(amap) == 3 or loaded.meta.get("format") == "nifti":
        fg_file = f"{stem}_foreground.nii.gz"
        write_nifti_mask(fg.reshape(loaded.shape), loaded, out / fg_file)
    else:
        from PIL import Image

        from medanomaly.training.atomic import atomic_write_bytes

        fg_file = f"{stem}_foreground.png"
        import io

        buf = io.BytesIO()
        Image.fromarray(fg.astype(np.uint8) * 255).save(buf, format="PNG")
        atomic_write_bytes(out / fg_file, buf.getvalue())
    sc = scale if scale is not None else image_scale(amap, fg, method)
    thr = thresholds or {}
    volume_like = np.ndim(amap) == 3 or loaded.meta.get("format") == "nifti"  # predict wrote a NIfTI map (exact values)
    map_file = f"{stem}_anomaly.nii.gz" if volume_like else f"{stem}_anomaly.png"
    case = {
        "id": stem, "title": stem, "input": str(input_path), "input_abs": str(Path(input_path).resolve()),
        "map": map_file, "map_range": [float(np.min(amap)), float(np.max(amap))], "foreground": fg_file,
        "mask": (f"{stem}_mask.nii.gz" if np.ndim(amap) == 3 or loaded.meta.get("format") == "nifti" else f"{stem}_mask.png")
        if thr.get("voxel_threshold") is not None else None,
        "components": f"{stem}_components.csv" if thr.get("voxel_threshold") is not None else None,
        "image_score": float(image_score), "threshold": thr.get("voxel_threshold"), "threshold_rule": thr.get("voxel_rule"),
        "image_threshold": thr.get("image_threshold"), "image_rule": thr.get("image_rule"),
        "scale": sc.to_json(), "run": str(Path(run).resolve()), "method": method,
        "has_affine": loaded.meta.get("format") in AFFINE_FORMATS,
    }
    path = out / VIEW_FILE
    rec = _read_json(path) if path.is_file() else {"version": VIEW_VERSION, "cases": []}
    rec["cases"] = [c for c in rec["cases"] if c.get("id") != stem] + [case]
    _write_json(path, rec)


# --------------------------------------------------------------------------------------------------- reading
def find_view(folder: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """(the folder the case files are relative to, the case entries) of a predict or evaluate folder; a
    :class:`ViewerError` saying what to do for anything else."""
    folder = Path(folder)
    if not folder.exists():
        raise ViewerError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ViewerError(f"{folder}: not a folder (give a `medanomaly predict --out` or `evaluate --out` folder)")
    for base in (folder, folder / "cases"):
        if (base / VIEW_FILE).is_file():
            cases = _read_json(base / VIEW_FILE)["cases"]
            if cases:
                return base, cases
    if (folder / "scores.csv").is_file():
        cases = _cases_from_scores(folder)
        if cases:
            return folder, cases
    if (folder / "config.yaml").is_file() and (folder / "weights.safetensors").exists():
        raise ViewerError(f"{folder} is a run folder and holds no maps: run `medanomaly predict {folder} SCANS --out maps/ "
                          "--threshold fpr=0.01`, then `medanomaly view maps/`")
    if (folder / "metrics.json").is_file():
        raise ViewerError(f"{folder}: this evaluation folder has no viewer cases (written by an older version); "
                          "re-run `medanomaly evaluate ... --force`")
    raise ViewerError(f"{folder}: nothing to show (no view.json, cases/view.json or scores.csv; give a "
                      "`medanomaly predict --out` or `evaluate --out` folder)")


def _cases_from_scores(folder: Path) -> list[dict[str, Any]]:
    """Cases of a predict folder written before ``view.json``: per-image colour scale, no foreground."""
    try:
        rows = list(csv.DictReader(open(folder / "scores.csv", newline="")))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    cases = []
    for r in rows:
        m = r.get("map") or ""
        if not m or not (folder / m).is_file():
            continue
        stem = re.sub(r"_anomaly\.(nii\.gz|png)$", "", m)
        thr = r.get("threshold")
        cases.append({"id": stem, "title": stem, "input": r.get("input"), "map": m,
                      "map_range": [float(r.get("map_min") or 0), float(r.get("map_max") or 1)],
                      "image_score": float(r["image_score"]) if r.get("image_score") else None,
                      "threshold": float(thr) if thr else None, "threshold_rule": r.get("threshold_rule") or None,
                      "image_threshold": float(r["image_threshold"]) if r.get("image_threshold") else None,
                      "image_rule": r.get("image_rule") or None, "scale": None, "has_affine": m.endswith(".nii.gz")})
    return cases


def _read_array(path: Path, map_range: list[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        a = np.asarray(img.dataobj, dtype=np.float32)
        while a.ndim > 2 and a.shape[-1] == 1:
            a = a[..., 0]
        return a, np.asarray(img.affine, float)
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"), np.float32)
    if map_range is not None:  # an 8-bit map scaled from its min..max (recorded in scores.csv / view.json)
        lo, hi = map_range
        a = lo + a / 255.0 * (hi - lo)
    return a, None


def _input_path(base: Path, case: dict[str, Any]) -> Path:
    for p in (case.get("input_abs"), case.get("input")):
        if p and Path(p).exists():
            return Path(p)
        if p and (base / p).exists():
            return base / p
    raise ViewerError(f"case {case.get('id')}: its input image {case.get('input')} is not found (moved?)")


def load_case(base: Path, case: dict[str, Any]) -> CaseData:
    """The arrays of one case entry (files relative to ``base``)."""
    if case.get("npz"):
        with np.load(base / case["npz"]) as z:
            return CaseData(z["image"], z["map"], z["foreground"] if "foreground" in z else None,
                            z["lesion"] if "lesion" in z else None, None)
    from medanomaly.data.io import read_image

    ld = read_image(_input_path(base, case), allow_constant=True)
    img = ld.array
    while img.ndim > 2 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and ld.meta.get("format") == "pil" and img.shape[-1] in (3, 4):
        img = img[..., :3].mean(-1)
    amap, _ = _read_array(base / case["map"], case.get("map_range"))
    if amap.shape != img.shape:
        raise ViewerError(f"case {case.get('id')}: the map {amap.shape} and the image {img.shape} are not on one grid")
    fg = None
    if case.get("foreground") and (base / case["foreground"]).is_file():
        fg = _read_array(base / case["foreground"])[0].reshape(img.shape) > 0.5
    affine = ld.affine if case.get("has_affine") else None
    return CaseData(np.asarray(img, np.float32), amap, fg, None, affine)
