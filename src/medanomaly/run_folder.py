"""The run folder: the one owner of what a trained detector leaves on disk.

A run folder holds

- ``config.yaml``        ``method``, ``params`` (the resolved constructor parameters) and, when the pipeline trained
  it, ``data`` (where the training data came from and how it was preprocessed), ``train`` (seed, config set,
  overrides, time) and ``sources`` (extra training data a method asked for, e.g. amae's unlabeled pool)
- ``weights.safetensors`` every tensor the method needs (never a pickle)
- ``state.json``          small non-tensor fitted state
- ``versions.json``       package and library versions, the seed
- ``train_log.jsonl``     the training log, when the method trains
- ``calibration.json``    when the pipeline trained it: the healthy validation map/image score quantiles that
  ``predict --threshold`` and ``evaluate`` turn into thresholds (:mod:`medanomaly.app.calibrate`)
- ``checkpoints/``        resumable training state while (and after) training runs
- ``request.yaml``        while training runs: what was asked for (``--resume`` checks it is asked the same)
- ``fit_key.json``        what the checkpoints belong to (method, parameters, training-data fingerprint)
- ``finished.json``       written last, after everything else: the sha256 of every file above. A folder without it
  is an unfinished run, whatever else it holds.

Every file is written once, atomically (temporary file + rename); leftovers of a killed writer are removed when a
run starts. Everything read back is checked: YAML without aliases and with a size limit, typed sections, hashes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from medanomaly.training.atomic import atomic_write_bytes, atomic_write_text, clean_stale_tmp

__all__ = [
    "CALIBRATION_FILE",
    "CONFIG_FILE",
    "FINISHED_FILE",
    "FIT_KEY_FILE",
    "REQUEST_FILE",
    "STATE_FILE",
    "TRAIN_LOG_FILE",
    "VERSIONS_FILE",
    "WEIGHTS_FILE",
    "RunFolder",
    "RunFolderError",
    "RunVersionWarning",
    "loop_seconds",
    "plain",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
VERSIONS_FILE = "versions.json"
TRAIN_LOG_FILE = "train_log.jsonl"
CALIBRATION_FILE = "calibration.json"
REQUEST_FILE = "request.yaml"
FINISHED_FILE = "finished.json"
#: what the checkpoints in a work dir belong to (method, parameters, training-data fingerprint); see Detector.fit
FIT_KEY_FILE = "fit_key.json"
CHECKPOINTS = "checkpoints"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, VERSIONS_FILE, TRAIN_LOG_FILE, CALIBRATION_FILE, REQUEST_FILE, FINISHED_FILE,
             FIT_KEY_FILE)
#: the files a finished run's marker hashes (the training log and the calibration are optional)
_HASHED = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, VERSIONS_FILE, TRAIN_LOG_FILE, CALIBRATION_FILE)
_MAX_CONFIG_BYTES = 1_000_000


class RunFolderError(ValueError):
    """A run folder is missing, incomplete, corrupt, or belongs to another method."""


class RunVersionWarning(UserWarning):
    """A run was written by other versions of medanomaly or its main libraries."""


# typed checks of the sections the pipeline writes: key -> (types, description)
_DATA_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "split": ((str,), "a string"),
    "val_split": ((str, type(None)), "a string or null"),
    "preset": ((str, type(None)), "a string or null"),
    "preset_config": ((dict, type(None)), "a mapping or null"),
    "size": ((int, list, type(None)), "an int, a list or null"),
    "max_cases": ((int, type(None)), "an int or null"),
    "spatial_dims": ((int,), "an int"),
    "channels": ((int,), "an int"),
    "image_shape": ((list,), "a list of ints"),
    "n_train": ((int,), "an int"),
    "n_val": ((int,), "an int"),
    "fingerprint": ((str, type(None)), "a string or null"),
}
_TRAIN_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "seed": ((int,), "an int"),
    "config_set": ((str, type(None)), "a string or null"),
    "config_file": ((str, type(None)), "a string or null"),
    "overrides": ((dict,), "a mapping"),
    "seconds": ((int, float), "a number"),
    "resumed": ((bool,), "true or false"),
    "finished_at": ((str,), "a string"),
}


def plain(obj: Any) -> Any:
    """numpy/torch/path values -> YAML/JSON-friendly Python values."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_section(section: Any, types: dict[str, tuple[tuple[type, ...], str]], where: str) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise RunFolderError(f"{where} must be a mapping, got {type(section).__name__}")
    for key, (allowed, desc) in types.items():
        if key not in section:
            continue
        v = section[key]
        ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
        if ok and key == "image_shape":
            ok = all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)
        if not ok:
            raise RunFolderError(f"{where}.{key} = {v!r} is not {desc}")


class RunFolder:
    """Reads and writes one run folder (see the module docstring for its files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    # -- state ---------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        """True when the finished marker is there: everything else was written before it."""
        return (self.path / FINISHED_FILE).is_file()

    @property
    def is_started(self) -> bool:
        """True when training began here and did not finish (a request, checkpoints or partial files)."""
        if self.is_finished or not self.path.is_dir():
            return False
        return (self.path / REQUEST_FILE).exists() or self.checkpoints.is_dir() or (self.path / WEIGHTS_FILE).exists()

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def clear(self) -> None:
        """Remove what a run wrote (the known files, checkpoints and leftover temporaries), nothing else."""
        self.path.joinpath(FINISHED_FILE).unlink(missing_ok=True)  # first: the folder stops being finished
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.checkpoints.is_dir():
            shutil.rmtree(self.checkpoints)
        clean_stale_tmp(self.path)

    def prepare(self) -> None:
        """Create the folder and remove temporaries a killed writer left behind."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(self.path)

    # -- request (while training) ----------------------------------------------------------------
    def write_request(self, request: dict[str, Any]) -> None:
        import yaml

        atomic_write_text(self.path / REQUEST_FILE, yaml.safe_dump(plain(request), sort_keys=True))

    def read_request(self) -> dict[str, Any] | None:
        p = self.path / REQUEST_FILE
        if not p.exists():
            return None
        return self._yaml(p, "request")

    # -- writing a finished run ----------------------------------------------------------------
    def write(
        self,
        *,
        config: dict[str, Any],
        tensors: dict[str, Any],
        state: dict[str, Any],
        versions: dict[str, Any],
        train_log: list[dict[str, Any]] | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        """Write every file of a finished run, then the finished marker last (a kill before it leaves an unfinished
        run, never a half-finished one that looks done). ``calibration``: the healthy score record, when given."""
        import yaml
        from safetensors.torch import save as st_save

        if "method" not in config or "params" not in config:
            raise ValueError("RunFolder.write: config needs 'method' and 'params'")
        self.prepare()
        (self.path / FINISHED_FILE).unlink(missing_ok=True)
        cfg = json.loads(json.dumps(plain(config), default=str))
        atomic_write_text(self.path / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
        atomic_write_bytes(self.path / WEIGHTS_FILE, st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))
        atomic_write_text(self.path / STATE_FILE, json.dumps(plain(state), indent=1))
        atomic_write_text(self.path / VERSIONS_FILE, json.dumps(plain(versions), indent=1))
        if train_log:
            atomic_write_text(self.path / TRAIN_LOG_FILE, "".join(json.dumps(plain(r)) + "\n" for r in train_log))
        else:
            (self.path / TRAIN_LOG_FILE).unlink(missing_ok=True)
        if calibration is not None:
            atomic_write_text(self.path / CALIBRATION_FILE, json.dumps(plain(calibration), indent=1))
        else:
            (self.path / CALIBRATION_FILE).unlink(missing_ok=True)
        hashes = {n: _sha256(self.path / n) for n in _HASHED if (self.path / n).is_file()}
        atomic_write_text(self.path / FINISHED_FILE, json.dumps({"files": hashes}, indent=1))
        (self.path / REQUEST_FILE).unlink(missing_ok=True)  # after the marker: a kill before it stays resumable

    # -- reading -------------------------------------------------------------------------------
    def _yaml(self, path: Path, what: str) -> Any:
        from medanomaly.yamlsafe import load_yaml

        try:
            return load_yaml(path, where=f"{what} of run {self.path}", max_bytes=_MAX_CONFIG_BYTES)
        except ValueError as e:
            raise RunFolderError(str(e)) from None

    def read_config(self) -> dict[str, Any]:
        """``config.yaml``, checked: a mapping with a string ``method``, a mapping ``params``, typed sections."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} does not exist")
        cpath = self.path / CONFIG_FILE
        if not cpath.exists():
            raise RunFolderError(f"{self.path} is not a medanomaly run folder: {CONFIG_FILE} is missing")
        cfg = self._yaml(cpath, "config")
        if not isinstance(cfg, dict) or "method" not in cfg:
            raise RunFolderError(f"{cpath}: no 'method' key")
        if not isinstance(cfg["method"], str):
            raise RunFolderError(f"{cpath}: method = {cfg['method']!r} is not a string")
        if not isinstance(cfg.get("params", {}) or {}, dict):
            raise RunFolderError(f"{cpath}: params must be a mapping")
        _check_section(cfg.get("data"), _DATA_TYPES, f"{cpath}: data")
        _check_section(cfg.get("train"), _TRAIN_TYPES, f"{cpath}: train")
        if cfg.get("sources") is not None and not isinstance(cfg["sources"], dict):
            raise RunFolderError(f"{cpath}: sources must be a mapping")
        return cfg

    def require_finished(self) -> None:
        """Raise a :class:`RunFolderError` saying what to do when the run did not finish; check the file hashes."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} does not exist")
        if not self.is_finished:
            if not (self.path / CONFIG_FILE).exists() and not self.is_started:
                raise RunFolderError(f"{self.path} is not a medanomaly run folder: {CONFIG_FILE} is missing")
            raise RunFolderError(f"{self.path}: the run did not finish ({FINISHED_FILE} is missing); continue it with "
                                 "`medanomaly train ... --resume` or start over with --force")
        try:
            marker = json.loads((self.path / FINISHED_FILE).read_text())
            files = marker["files"]
            if not isinstance(files, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunFolderError(f"{self.path / FINISHED_FILE}: unreadable finished marker ({type(e).__name__})") from None
        for name, digest in files.items():
            if name not in _HASHED:
                raise RunFolderError(f"{self.path / FINISHED_FILE}: names an unknown file {name!r}")
            p = self.path / name
            if not p.is_file():
                raise RunFolderError(f"{self.path}: {name} is missing (the folder was copied partly?)")
            if _sha256(p) != digest:
                if name == TRAIN_LOG_FILE:  # only reports read the log: say so, do not refuse the run
                    warnings.warn(f"{p}: changed since the run finished; the training curves may not be this run's",
                                  stacklevel=3)
                    continue
                raise RunFolderError(f"{p}: changed since the run finished (sha256 differs from {FINISHED_FILE})")

    def read_tensors(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        wpath = self.path / WEIGHTS_FILE
        if not wpath.exists():
            raise RunFolderError(f"{self.path}: missing {WEIGHTS_FILE}; the run did not finish or the folder was copied partly")
        try:
            return load_file(str(wpath))
        except Exception as e:  # safetensors raises several types
            raise RunFolderError(f"{wpath}: unreadable weights file ({e})") from e

    def read_state(self) -> dict[str, Any] | None:
        spath = self.path / STATE_FILE
        if not spath.exists():
            return None
        try:
            state = json.loads(spath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{spath}: not valid JSON ({e})") from e
        if not isinstance(state, dict):
            raise RunFolderError(f"{spath}: expected a JSON object, got {type(state).__name__}")
        return state

    def train_seconds(self) -> tuple[float | None, str]:
        """(seconds, what they are): the wall seconds of ``train`` for a run trained in one go; for a resumed run,
        the training-loop seconds summed over every session in its log (``train.seconds`` only holds the last
        session's); ``None`` when not recorded."""
        train = self.read_config().get("train") or {}
        if train.get("resumed"):
            total = loop_seconds(self.read_train_log())
            if total is not None:
                return total, "training-loop seconds summed over the sessions of a resumed run (train_log.jsonl)"
        s = train.get("seconds")
        return (float(s) if s is not None else None), "wall seconds of training in one session"

    def read_train_log(self) -> list[dict[str, Any]]:
        """The training log; unreadable lines are skipped with one warning (nothing downstream needs the log)."""
        log = self.path / TRAIN_LOG_FILE
        if not log.is_file():
            return []
        out, bad = [], 0
        for line in log.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
        if bad:
            warnings.warn(f"{log}: {bad} unreadable line(s) skipped", stacklevel=2)
        return out

    def read_calibration(self) -> dict[str, Any] | None:
        """``calibration.json`` (None for a run written without one), checked: voxel and image records with
        quantiles. Its hash is checked by :meth:`require_finished`."""
        cpath = self.path / CALIBRATION_FILE
        if not cpath.is_file():
            return None
        try:
            rec = json.loads(cpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{cpath}: not valid JSON ({e})") from e
        ok = isinstance(rec, dict) and isinstance(rec.get("source"), str) and all(
            isinstance(rec.get(k), dict) and isinstance(rec[k].get("n"), int) and isinstance(rec[k].get("quantiles"), list)
            and rec[k]["quantiles"] and all(isinstance(q, dict) and isinstance(q.get("fpr"), float)
                                            and isinstance(q.get("value"), int | float) for q in rec[k]["quantiles"])
            for k in ("voxel", "image"))
        if not ok:
            raise RunFolderError(f"{cpath}: not a calibration record (needs source and voxel/image quantiles)")
        return rec

    def read_versions(self) -> dict[str, Any]:
        vpath = self.path / VERSIONS_FILE
        if not vpath.is_file():
            return {}
        try:
            v = json.loads(vpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{vpath}: not valid JSON ({e})") from e
        return v if isinstance(v, dict) else {}

    def check_versions(self, current: dict[str, str]) -> list[str]:
        """Warn (once, listing them) when the run was written with other versions of medanomaly/torch/monai."""
        rec = self.read_versions()
        diffs = [f"{k} {rec[k]} (now {current.get(k)})" for k in ("medanomaly", "torch", "monai")
                 if k in rec and rec[k] != current.get(k)]
        if diffs:
            warnings.warn(f"{self.path} was written with {', '.join(diffs)}; its predictions may differ slightly",
                          RunVersionWarning, stacklevel=3)
        return diffs


def loop_seconds(train_log: list[dict[str, Any]]) -> float | None:
    """Training-loop seconds over all sessions of a log: each record's ``seconds`` counts from the start of its
    session's loop for one stage/member, so a session ends where that count falls; the sum of each session's last
    count per stage/member. ``None`` when no record has ``seconds``."""
    last: dict[tuple[Any, Any], float] = {}
    total, seen = 0.0, False
    for rec in train_log:
        s = rec.get("seconds")
        if not isinstance(s, int | float) or isinstance(s, bool):
            continue
        seen = True
        key = (rec.get("stage"), rec.get("member"))
        if key in last and s < last[key]:
            total += last[key]
        last[key] = float(s)
    return total + sum(last.values()) if seen else None
