"""BIDS derivatives: ``predict --bids ROOT`` scores every ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` of a BIDS
dataset (the suffix the model reads: ``FLAIR``, ``T1w``) and writes

- ``ROOT/derivatives/medanomaly/sub-*/[ses-*/]anat/<entities>_desc-anomaly_map.nii.gz`` (the input's grid and affine),
- ``..._desc-anomaly_mask.nii.gz`` and ``..._desc-anomaly_components.tsv`` with a voxel ``--threshold``,
- ``ROOT/derivatives/medanomaly/sub-*/figures/<entities>_desc-anomaly_overlay.png``,
- ``ROOT/derivatives/medanomaly/scores.tsv`` (image score per input) and ``dataset_description.json``
  (``DatasetType: derivative``, ``GeneratedBy``).

``<entities>`` are the source file's entities (``sub-01_ses-1_run-1``) without its suffix. Prediction goes to a
staging folder first; outputs are moved into place only when every input succeeded (nothing half-written).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medanomaly.app.errors import Echo, PipelineError, make_echo

__all__ = ["BIDS_VERSION", "PIPELINE", "bids_targets", "find_bids_inputs", "predict_bids"]

BIDS_VERSION = "1.9.0"
PIPELINE = "medanomaly"


def _split(path: Path) -> tuple[str, str] | None:
    """(entities, suffix) of a BIDS NIfTI file name, None when it is not one."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            if "_" in stem and stem.startswith("sub-"):
                ent, suf = stem.rsplit("_", 1)
                return ent, suf
    return None


def find_bids_inputs(root: str | Path, suffix: str, model: str = "the model") -> list[Path]:
    """The ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` files of a BIDS dataset (derivatives excluded), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"--bids {root}: not a folder")
    found: list[Path] = []
    others: set[str] = set()
    for anat in sorted([*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]):
        if not anat.is_dir():
            continue
        for f in sorted(anat.iterdir()):
            parts = _split(f) if f.is_file() else None
            if parts is None:
                continue
            (found.append(f) if parts[1] == suffix else others.add(parts[1]))
    if not found:
        subs = sum(1 for p in root.glob("sub-*") if p.is_dir())
        hint = f"; it has {', '.join(sorted(others))} scans" if others else (
            "" if subs else " (no sub-* folders: is this the dataset's root?)")
        raise PipelineError(f"--bids {root}: no sub-*/[ses-*/]anat/*_{suffix}.nii.gz file; {model} reads {suffix} scans{hint}")
    return found


def bids_targets(root: Path, src: Path) -> dict[str, Path]:
    """Where the derivatives of one source file go."""
    ent, _ = _split(src) or (src.name, "")
    deriv = root / "derivatives" / PIPELINE
    rel = src.parent.relative_to(root)  # sub-01/[ses-1/]anat
    anat = deriv / rel
    return {
        "map": anat / f"{ent}_desc-anomaly_map.nii.gz",
        "mask": anat / f"{ent}_desc-anomaly_mask.nii.gz",
        "components": anat / f"{ent}_desc-anomaly_components.tsv",
        "overlay": deriv / rel.parts[0] / "figures" / f"{ent}_desc-anomaly_overlay.png",
    }


def _csv_to_tsv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def predict_bids(
    run: str | Path,
    root: str | Path,
    suffix: str,
    *,
    model_name: str,
    threshold: str | None = None,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
    batch_size: int = 16,
) -> list[Path]:
    """Predict every ``suffix`` scan of the BIDS dataset ``root`` with the run folder ``run``; returns the map paths."""
    import medanomaly
    from medanomaly.app.predict import predict_files
    from medanomaly.training.atomic import atomic_write_text

    say = make_echo(quiet, echo)
    root = Path(root)
    inputs = find_bids_inputs(root, suffix, f"model {model_name}")
    deriv = root / "derivatives" / PIPELINE
    targets = [bids_targets(root, p) for p in inputs]
    planned = [deriv / "scores.tsv"] + [t[k] for t in targets for k in ("map", "mask", "components", "overlay")]
    existing = [q for q in planned if q.exists()]
    if existing and not force:
        raise PipelineError(f"{existing[0]} already exists; use --force to overwrite")
    created = [d for d in (root / "derivatives", deriv) if not d.exists()]
    deriv.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=deriv))
    ok = False
    try:
        predict_files(run, inputs, stage, batch_size=batch_size, quiet=quiet, echo=echo, threshold=threshold)
        moves: list[tuple[Path, Path]] = []
        for src, t in zip(inputs, targets, strict=True):
            s = _stem(src)
            moves += [(stage / f"{s}_anomaly.nii.gz", t["map"]), (stage / f"{s}_mask.nii.gz", t["mask"]),
                      (stage / f"{s}_overlay.png", t["overlay"])]
            comp = stage / f"{s}_components.csv"
            if comp.exists():
                comp.with_suffix(".tsv").write_text(_csv_to_tsv(comp.read_text()))
                moves.append((comp.with_suffix(".tsv"), t["components"]))
        rows = list(csv.reader(io.StringIO((stage / "scores.csv").read_text())))
        by_input = {str(p): (p, t) for p, t in zip(inputs, targets, strict=True)}
        for r in rows[1:]:
            p, t = by_input[r[0]]
            r[0], r[2] = str(p.relative_to(root)), str(t["map"].relative_to(deriv))
        for q in planned[1:]:  # --force: no stale output of an earlier call (e.g. a mask) stays beside the new ones
            q.unlink(missing_ok=True)
        for a, b in moves:
            if a.exists():
                b.parent.mkdir(parents=True, exist_ok=True)
                a.replace(b)
        atomic_write_text(deriv / "scores.tsv", "".join("\t".join(r) + "\n" for r in rows))
        desc: dict[str, Any] = {
            "Name": "medanomaly anomaly maps",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "medanomaly", "Version": str(medanomaly.__version__),
                             "Description": f"unsupervised anomaly maps from the model {model_name}"
                                            + (f", mask at threshold {threshold}" if threshold else "")}],
        }
        atomic_write_text(deriv / "dataset_description.json", json.dumps(desc, indent=1) + "\n")
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:  # a failed call leaves no empty derivatives folder it made
            for d in reversed(created):
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
    say(f"wrote {len(inputs)} map(s) to {deriv}")
    return [t["map"] for t in targets]
