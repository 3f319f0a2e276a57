"""The one contract every anomaly detector follows, and the registry of methods.

A detector is built from keyword parameters (all in the constructor, scikit-learn style), trained with
``fit`` on healthy data only, and applied with ``predict``. ``save`` writes a *run folder*:

- ``config.yaml``   the method name and its resolved constructor parameters
- ``weights.safetensors`` every tensor the method needs (never a pickle)
- ``state.json``    small non-tensor fitted state (e.g. normalisation constants)
- ``versions.json`` package and library versions, the seed
- ``train_log.jsonl`` the training log, when the method trains

``load(run_dir)`` rebuilds the detector from those files and reproduces its predictions bit for bit.

A method lives in one folder ``methods/<package>/`` and registers itself with ``@register``. Its
``configs/`` folder ships parameter sets as YAML: ``cpu-small.yaml`` (minutes on 2 CPU cores),
``paper.yaml`` (the paper's settings) and ``test.yaml`` (tiny: seconds on the toy data). ``test.yaml`` is
required: ``tests/test_methods_integration.py`` runs fit / predict / save / load / predict (bit-identical)
for every registered method with it, in 2D and, when supported, 3D. A folder holding several methods
writes one section per method name in each file (see :meth:`Detector.config_set`).
"""

from __future__ import annotations

import json
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from medanomaly.training.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "AnomalyResult",
    "Detector",
    "RunFolderError",
    "register",
    "get_method",
    "get_method_class",
    "list_methods",
    "load_detector",
    "library_versions",
    "atomic_write_bytes",
    "atomic_write_text",
    "merge_params",
    "read_run_config",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
VERSIONS_FILE = "versions.json"
TRAIN_LOG_FILE = "train_log.jsonl"


class RunFolderError(ValueError):
    """A run folder is missing, incomplete, or belongs to another method."""


@dataclass
class AnomalyResult:
    """What ``Detector.predict`` returns.

    pixel_scores: (B, *spatial) float tensor, the input's spatial shape, higher = more anomalous.
    image_scores: (B,) float tensor, one score per image/volume.
    extras: anything else a method wants to expose (restorations, token scores, reconstructions ...).

    Convention: ``extras["restoration"]`` is the healthy-looking image the method compares the input against (a
    restoration or mean reconstruction), a float tensor (B, C, *spatial) or (B, *spatial) at the input's spatial
    size and intensity scale; every method that has one returns it (autoencoder, mae, mae-pseudo, amae, mim-ood,
    ar-restoration, token-critic). Evaluation reports show it beside the input and the map.
    """

    pixel_scores: torch.Tensor
    image_scores: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pixel_scores.ndim < 3:
            raise ValueError(f"pixel_scores must be (B, *spatial) with 2 or 3 spatial dims, got {tuple(self.pixel_scores.shape)}")
        if self.image_scores.shape != (self.pixel_scores.shape[0],):
            raise ValueError(
                f"image_scores must have shape (B,) = ({self.pixel_scores.shape[0]},), got {tuple(self.image_scores.shape)}"
            )


def library_versions() -> dict[str, str]:
    """Versions of python, this package and the main libraries, recorded beside every run."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("medanomaly", "torch", "monai", "numpy", "scipy", "scikit-learn", "nibabel", "pydicom"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Detector(ABC):
    """Base class of every method. Subclasses set ``name`` and implement the four hooks below.

    Subclass hooks:
    - ``fit(train, val=None)``: train on healthy data only. ``train``/``val`` are
      :class:`medanomaly.data.dataset.ImageDataset` objects; their masks and labels must not be read.
    - ``predict(images, foreground=None)``: ``images`` (B, C, *spatial) float tensor already preprocessed,
      ``foreground`` (B, 1, *spatial) bool tensor or None. Returns :class:`AnomalyResult`.
    - ``state_tensors()`` / ``load_state_tensors(tensors)``: the tensors to save / restore.
    - optional ``extra_state()`` / ``load_extra_state(d)``: JSON-able fitted state.
    """

    name: ClassVar[str] = ""
    #: spatial dimensionalities the method supports
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2,)
    #: every parameter with its default (nested dicts allowed); unknown keys are an error
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = merge_params(self.defaults, params, where=self.name or type(self).__name__)
        self.is_fitted: bool = False
        self.train_log: list[dict[str, Any]] = []
        #: where training keeps checkpoints (set by the CLI / caller before ``fit``); None: no checkpoints
        self.work_dir: Path | None = None
        #: continue from checkpoints in ``work_dir`` when they exist
        self.resume: bool = True
        #: no progress bars
        self.quiet: bool = False

    @classmethod
    def _configs_folder(cls) -> Path:
        return Path(__import__(cls.__module__, fromlist=["_"]).__file__).parent / "configs"

    @classmethod
    def _read_config_file(cls, path: Path) -> dict[str, Any] | None:
        """This method's parameters in ``path``; None when the file is a multi-method file without a section for it."""
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of parameters, got {type(data).__name__}")
        if _is_multi_method(data):
            section = data.get(cls.name)
            return dict(section or {}) if cls.name in data else None
        return data

    @classmethod
    def config_sets(cls) -> list[str]:
        """Names of the shipped configurations (YAML files in the method's ``configs/`` folder)."""
        folder = cls._configs_folder()
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.yaml") if cls._read_config_file(p) is not None)

    @classmethod
    def config_set(cls, name: str) -> dict[str, Any]:
        """Parameters of a shipped configuration, e.g. ``"cpu-small"``, ``"paper"`` or ``"test"``.

        ``configs/<name>.yaml`` holds the parameters of the method, or, when one folder holds several methods,
        one section per method name (``{intensity: {...}, autoencoder: {...}}``; every top-level value is then a
        mapping keyed by a registered method name).
        """
        path = cls._configs_folder() / f"{name}.yaml"
        params = cls._read_config_file(path) if path.exists() else None
        if params is None:
            raise KeyError(f"{cls.name}: no config set '{name}'; available: {', '.join(cls.config_sets()) or '(none)'}")
        return params

    @classmethod
    def test_params(cls) -> dict[str, Any]:
        """Tiny parameters for the registry-wide integration test: the ``test`` config set (``configs/test.yaml``).

        Convention: every method ships ``configs/test.yaml`` with parameters under which ``fit`` + ``predict``
        on the toy data (12 images of 32x32 in 2D; 6 volumes of 16^3 when 3D is supported) take a few seconds on
        one CPU core; ``tests/test_methods_integration.py`` picks every registered method up automatically.
        """
        if "test" not in cls.config_sets():
            raise KeyError(f"{cls.name}: ships no configs/test.yaml (tiny parameters for the integration test); "
                           f"see Detector.test_params")
        return cls.config_set("test")

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def fit(self, train: Any, val: Any | None = None) -> Detector: ...

    @abstractmethod
    def predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult: ...

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    # -- shared -------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def check_input(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> None:
        """Validate ``predict``'s input at the boundary, with messages a user understands."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{self.name}: images must be a torch.Tensor (B, C, *spatial), got {type(images).__name__}")
        if images.ndim - 2 not in self.spatial_dims_supported:
            raise ValueError(
                f"{self.name}: images must be (B, C, *spatial) with {self.spatial_dims_supported} spatial dims, "
                f"got shape {tuple(images.shape)}"
            )
        if not torch.isfinite(images).all():
            raise ValueError(f"{self.name}: images contain NaN or Inf values")
        if foreground is not None and (foreground.shape[0] != images.shape[0] or foreground.shape[2:] != images.shape[2:]):
            raise ValueError(
                f"{self.name}: foreground shape {tuple(foreground.shape)} does not match images {tuple(images.shape)}"
            )
        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: call fit() (or load a run folder) before predict()")

    def save(self, run_dir: str | Path, *, seed: int | None = None) -> Path:
        """Write the run folder (config, weights, state, versions, training log). Files are written atomically."""
        from safetensors.torch import save as st_save

        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: nothing to save, the detector is not fitted")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = {"method": self.name, "params": _plain(self.params)}
        atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=True))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_tensors().items()}
        atomic_write_bytes(run_dir / WEIGHTS_FILE, st_save(tensors))
        atomic_write_text(run_dir / STATE_FILE, json.dumps(_plain(self.extra_state()), indent=1))
        versions = library_versions()
        versions["seed"] = seed if seed is not None else self.params.get("seed")
        atomic_write_text(run_dir / VERSIONS_FILE, json.dumps(versions, indent=1))
        if self.train_log:
            atomic_write_text(run_dir / TRAIN_LOG_FILE, "".join(json.dumps(_plain(r)) + "\n" for r in self.train_log))
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path) -> Detector:
        """Rebuild a fitted detector from a run folder written by :meth:`save`."""
        from safetensors.torch import load_file

        run_dir = Path(run_dir)
        cfg = read_run_config(run_dir)
        if cls.name and cfg["method"] != cls.name:
            raise RunFolderError(f"{run_dir} holds a '{cfg['method']}' run, not '{cls.name}'")
        try:
            klass = cls if cls.name else get_method_class(cfg["method"])
        except KeyError as e:
            raise RunFolderError(f"{run_dir}: {e.args[0]}") from e
        try:
            det = klass(**(cfg.get("params") or {}))
        except (KeyError, ValueError, TypeError) as e:
            raise RunFolderError(f"{run_dir}: its config.yaml does not fit method '{klass.name}' ({e})") from e
        wpath = run_dir / WEIGHTS_FILE
        if not wpath.exists():
            raise RunFolderError(f"{run_dir}: missing {WEIGHTS_FILE}; the run did not finish or the folder was copied partly")
        try:
            tensors = load_file(str(wpath))
        except Exception as e:  # safetensors raises several types
            raise RunFolderError(f"{wpath}: unreadable weights file ({e})") from e
        spath = run_dir / STATE_FILE
        try:
            state = json.loads(spath.read_text()) if spath.exists() else None
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{spath}: not valid JSON ({e})") from e
        try:
            det.load_state_tensors(tensors)
            if state is not None:
                det.load_extra_state(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise RunFolderError(f"{run_dir}: the saved weights/state do not fit method '{klass.name}' ({e})") from e
        log = run_dir / TRAIN_LOG_FILE
        if log.exists():
            det.train_log = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        det.is_fitted = True
        return det


def merge_params(defaults: dict[str, Any], overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``defaults``.

    Keys may be dotted (``{"tasks.train_count": 2}``). A key that is not in ``defaults`` raises a
    ``KeyError`` naming the valid keys, so a typo never silently does nothing.
    """
    import copy

    out = copy.deepcopy(defaults)
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(none)"
                raise KeyError(f"{where}: unknown parameter '{'.'.join(parts[: i + 1])}'; valid keys here: {valid}")
            if i == len(parts) - 1:
                if isinstance(node[part], dict) and isinstance(value, dict):
                    node[part] = merge_params(node[part], value, where=f"{where}.{part}" if where else part)
                else:
                    node[part] = value
            else:
                node = node[part]
    return out


def _is_multi_method(data: dict[str, Any]) -> bool:
    """True when a config file is keyed by method names (a folder holding several methods)."""
    if not data or not all(isinstance(v, dict) or v is None for v in data.values()):
        return False
    return set(data) <= set(_REGISTRY)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``config.yaml`` of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    cpath = run_dir / CONFIG_FILE
    if not cpath.exists():
        raise RunFolderError(f"{run_dir} is not a medanomaly run folder: {CONFIG_FILE} is missing")
    try:
        cfg = yaml.safe_load(cpath.read_text())
    except yaml.YAMLError as e:
        raise RunFolderError(f"{cpath}: not valid YAML ({e})") from e
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise RunFolderError(f"{cpath}: no 'method' key")
    return cfg


def _plain(obj: Any) -> Any:
    """Make numpy/torch/path values YAML/JSON friendly."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    return obj


# -- registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import medanomaly.methods  # noqa: F401  (importing the package registers every method)


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Detector]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name]


def get_method(name: str, **params: Any) -> Detector:
    """Build a detector by registry name; unknown parameters raise a clear error."""
    cls = get_method_class(name)
    return cls(**params)


def load_detector(run_dir: str | Path) -> Detector:
    """Load any run folder, whatever its method."""
    return Detector.load(run_dir)

