"""Shipped models: trained run folders inside the package, usable with no training and no network.

Each model is a folder ``medanomaly/models/<name>/`` holding a finished run folder (``config.yaml``,
``weights.safetensors``, ``state.json``, ``versions.json``, ``calibration.json``, ``train_log.jsonl``,
``finished.json``) plus

- ``model.json``: the catalogue entry: ``name``, a one-line ``summary``, what inputs fit it (``modality`` DICOM
  codes, ``input_dims``, ``bids_suffix``, ``needs`` in words) and ``weights_sha256``;
- ``MODEL.md``: the model card (training data, preset, config, training time, metrics, intended use and limits).

:func:`get_model` checks the weights' SHA-256 against ``model.json`` before anything uses them (a mismatch is one
error); the run folder's own ``finished.json`` hashes are checked again when the detector loads. The folder of
models is the package's, or ``MEDANOMALY_MODELS_DIR`` when set (e.g. a folder of your own packed models).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medanomaly.app.errors import PipelineError

__all__ = ["CARD_FILE", "INFO_FILE", "ShippedModel", "check_inputs_fit", "get_model", "list_models", "models_root",
           "pack_model"]

INFO_FILE = "model.json"
CARD_FILE = "MODEL.md"
#: BIDS anatomical suffixes a file name may carry (a file with another suffix than the model's is refused)
BIDS_ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "inplaneT1", "inplaneT2", "angio", "defacemask")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def models_root() -> Path:
    """The folder of shipped models: ``$MEDANOMALY_MODELS_DIR``, else the package's ``models/``."""
    env = os.environ.get("MEDANOMALY_MODELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShippedModel:
    """One catalogue entry and where its run folder lies."""

    name: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return str(self.info.get("summary", ""))

    @property
    def needs(self) -> str:
        return str(self.info.get("needs", "inputs like its training data"))

    @property
    def bids_suffix(self) -> str | None:
        s = self.info.get("bids_suffix")
        return str(s) if s else None

    def card(self) -> str:
        """The model card (``MODEL.md``)."""
        p = self.path / CARD_FILE
        if not p.is_file():
            raise PipelineError(f"shipped model {self.name}: {CARD_FILE} is missing ({p})")
        return p.read_text(encoding="utf-8")

    def verify(self) -> None:
        """Check the weights against the SHA-256 in ``model.json`` (one :class:`PipelineError` on a mismatch)."""
        w = self.path / "weights.safetensors"
        want = str(self.info.get("weights_sha256", ""))
        if not w.is_file():
            raise PipelineError(f"shipped model {self.name}: weights.safetensors is missing ({w}); reinstall medanomaly")
        got = _sha256(w)
        if got != want:
            raise PipelineError(f"shipped model {self.name}: weights.safetensors does not match its SHA-256 in {INFO_FILE} "
                                f"(expected {want[:16]}..., got {got[:16]}...): the file is corrupt or was changed; "
                                "reinstall medanomaly")


def _read_info(folder: Path) -> dict[str, Any] | None:
    p = folder / INFO_FILE
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and info.get("name") == folder.name else None


def list_models(root: str | Path | None = None) -> dict[str, ShippedModel]:
    """Every model folder under ``root`` (default :func:`models_root`) with a readable ``model.json``, by name."""
    root = Path(root) if root is not None else models_root()
    if not root.is_dir():
        return {}
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        info = _read_info(d)
        if info is not None:
            out[d.name] = ShippedModel(d.name, d, info)
    return out


def get_model(name: str, root: str | Path | None = None) -> ShippedModel:
    """The shipped model ``name``, its weights checked; an unknown name lists the available ones."""
    models = list_models(root)
    if name not in models:
        avail = ", ".join(models) or "none (the package's models folder is empty)"
        raise PipelineError(f"unknown model {name!r}; available: {avail} (see `medanomaly models`)")
    m = models[name]
    m.verify()
    return m


def _input_facts(path: Path) -> tuple[int | None, str | None]:
    """(spatial dimensionality, DICOM Modality) of an input from its header only (None when unknown)."""
    from medanomaly.data.io import detect_format

    try:
        fmt = detect_format(path)
    except (ValueError, OSError):
        return None, None  # predict names the problem itself
    try:
        if fmt == "nifti":
            import nibabel as nib

            shape = [s for s in nib.load(str(path)).header.get_data_shape() if s > 1]
            return len(shape), None
        if fmt in ("dicom", "dicom-series"):
            import pydicom

            f = path if fmt == "dicom" else next((p for p in sorted(path.iterdir()) if p.is_file()
                                                  and not p.name.startswith(".")), None)
            if f is None:
                return None, None
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            return (3 if fmt == "dicom-series" or frames > 1 else 2), (str(ds.get("Modality", "")) or None)
        if fmt == "pil":
            return 2, None
    except Exception:  # unreadable headers are predict's to report, with its own message
        return None, None
    return None, None


def check_inputs_fit(model: ShippedModel, inputs: list[Path]) -> None:
    """Refuse, before any work, an input that does not fit the model: wrong dimensionality, a DICOM Modality or a
    BIDS suffix (``sub-01_T1w.nii.gz``) other than the model's. Says what the model needs."""
    dims_ok = [int(d) for d in model.info.get("input_dims") or []]
    modalities = [str(m) for m in model.info.get("modality") or []]
    for p in inputs:
        p = Path(p)
        if not p.exists():
            continue  # predict reports missing inputs
        dims, modality = _input_facts(p)
        if dims is not None and dims_ok and dims not in dims_ok:
            raise PipelineError(f"{p}: a {dims}D image does not fit model {model.name}: it needs {model.needs}")
        if modality and modalities and modality not in modalities:
            raise PipelineError(f"{p}: DICOM Modality {modality} does not fit model {model.name}: it needs {model.needs}")
        name = p.name
        for suf in (".nii.gz", ".nii"):
            if name.endswith(suf):
                bids = name[: -len(suf)].rsplit("_", 1)
                if len(bids) == 2 and bids[1] in BIDS_ANAT_SUFFIXES and model.bids_suffix and bids[1] != model.bids_suffix:
                    raise PipelineError(f"{p}: a {bids[1]} scan does not fit model {model.name}: it needs {model.needs}")


def pack_model(run: str | Path, name: str, info: dict[str, Any], card: str, root: str | Path | None = None, *,
               force: bool = False) -> ShippedModel:
    """Copy the finished run folder ``run`` into ``root/name`` as a shipped model, with ``model.json`` (``info``
    plus ``name`` and ``weights_sha256``) and ``MODEL.md`` (``card``; ``{weights_sha256}`` is filled in)."""
    from medanomaly.run_folder import FINISHED_FILE, RunFolder

    if not _NAME.match(name):
        raise PipelineError(f"model name {name!r}: use lower-case letters, digits, '.', '_' or '-'")
    folder = RunFolder(run)
    folder.require_finished()
    dest = Path(root if root is not None else models_root()) / name
    if dest.exists():
        if not force:
            raise PipelineError(f"{dest} already exists; use force=True to replace it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    marker = json.loads((folder.path / FINISHED_FILE).read_text())
    for fname in [*marker["files"], FINISHED_FILE]:
        shutil.copy2(folder.path / fname, dest / fname)
    sha = _sha256(dest / "weights.safetensors")
    full = {**info, "name": name, "weights_sha256": sha}
    (dest / INFO_FILE).write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
    (dest / CARD_FILE).write_text(card.replace("{weights_sha256}", sha), encoding="utf-8")
    return ShippedModel(name, dest, full)
