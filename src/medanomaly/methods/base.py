"""The one contract every anomaly detector follows, and the registry of methods.

A detector is built from keyword parameters (all in the constructor, scikit-learn style), trained with
``fit`` on healthy data only, and applied with ``predict``. ``save`` writes a *run folder*:

config, weights (safetensors), fitted state, versions, training log and, last, a finished marker (see
:mod:`medanomaly.run_folder`, the one owner of that folder). ``load(run_dir)`` rebuilds the detector from it and
reproduces its predictions bit for bit.

The scikit-learn rules hold for every method, enforced here rather than remembered by each: ``fit`` (not
overridden) wraps the data in a healthy-only view, seeds from ``params["seed"]``, calls the method's ``_fit``,
checks that the parameters did not change, sets ``is_fitted`` and returns ``self``; ``predict`` checks the input
and calls ``_predict``. Runtime choices (checkpoint folder, resume, quiet) come in a :class:`RunContext`.

A method lives in one folder ``methods/<package>/`` and registers itself with ``@register``. Its
``configs/`` folder ships parameter sets as YAML: ``cpu-small.yaml`` (minutes on 2 CPU cores),
``paper.yaml`` (the paper's settings) and ``test.yaml`` (tiny: seconds on the toy data). ``test.yaml`` is
required: ``tests/test_methods_integration.py`` runs fit / predict / save / load / predict (bit-identical)
for every registered method with it, in 2D and, when supported, 3D. A folder holding several methods
writes one section per method name in each file (see :meth:`Detector.config_set`).
"""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from medanomaly.run_folder import RunFolderError

__all__ = [
    "AnomalyResult",
    "Detector",
    "RunContext",
    "RunFolderError",
    "register",
    "get_method",
    "get_method_class",
    "list_methods",
    "load_detector",
    "library_versions",
    "merge_params",
    "read_run_config",
]



@dataclass(frozen=True)
class RunContext:
    """How a ``fit`` runs, apart from what it learns: passed to :meth:`Detector.fit`, never stored in params.

    work_dir: where training keeps checkpoints (None: no checkpoints). resume: continue from checkpoints found in
    ``work_dir`` (never a silent default: False unless asked). quiet: no progress bars.
    """

    work_dir: Path | None = None
    resume: bool = False
    quiet: bool = False
    #: content fingerprint of the training data when the caller has it already (else ``fit`` computes it)
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.work_dir is not None and not isinstance(self.work_dir, Path):
            object.__setattr__(self, "work_dir", Path(self.work_dir))
        if self.resume and self.work_dir is None:
            raise ValueError("RunContext: resume=True needs a work_dir")


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
        where = self.name or type(self).__name__
        self.params: dict[str, Any] = merge_params(self.defaults, params, where=where)
        schema = getattr(type(self), "parameter_schema", None)  # every registered method declares one (tests check)
        if schema is not None:
            from medanomaly.methods.params import validate_params

            self.params = validate_params(self.params, schema, where)  # types and ranges, before any data is read
        self.is_fitted: bool = False
        self.train_log: list[dict[str, Any]] = []
        #: runtime context of the last ``fit`` (work dir, resume, quiet); never part of the parameters
        self.context_: RunContext = RunContext()

    @classmethod
    def _configs_folder(cls) -> Path:
        return Path(__import__(cls.__module__, fromlist=["_"]).__file__).parent / "configs"

    @classmethod
    def _read_config_file(cls, path: Path) -> dict[str, Any] | None:
        """This method's parameters in ``path``; None when it is a per-method file without a section for it."""
        from medanomaly.param_files import read_param_file

        res = read_param_file(path, cls.name, where=f"{cls.name} config {path.name}")
        return None if res is None else res[0]

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
        one section per method under ``methods:`` (see :mod:`medanomaly.param_files`, the one reader).
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
    def _fit(self, train: Any, val: Any | None = None, **sources: Any) -> None:
        """Train on ``train`` (a :class:`~medanomaly.data.healthy.HealthyView`); store fitted state, return nothing.

        Must not change ``self.params``; must build every fitted attribute afresh (a second ``fit`` with the same
        seed gives the same model). ``sources`` holds the extra data the method declared in :meth:`data_sources`.
        """

    @abstractmethod
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None, **kw: Any) -> AnomalyResult:
        """Maps and scores for checked input (the base class validated shapes, values and ``is_fitted``)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    @classmethod
    def data_sources(cls, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Extra training data these parameters ask for, by keyword of ``_fit``: ``{kw: {"data", "split", **opts}}``.

        The pipeline loads each one (healthy-only view, never the evaluation split), passes it to ``fit`` and
        records it in the run's config. Default: none.
        """
        return {}

    #: rank of this method as a provider of shared parts (lower first); ties go by the order a benchmark lists
    share_priority: ClassVar[int] = 0

    @classmethod
    def shared_parts(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Parts of a trained run that another run may reuse: ``{part name: what determines it}`` (JSON-able).

        Two runs whose part names and settings are equal could share that part (e.g. a VQ-VAE tokenizer, a
        pre-trained MAE). A benchmark uses this with :meth:`reuse_parts`; the default shares nothing.
        """
        return {}

    @classmethod
    def reuse_parts(cls, parts: list[str], run_dir: str) -> dict[str, Any]:
        """Parameter overrides that make a run load ``parts`` (names from :meth:`shared_parts`) from ``run_dir``."""
        raise NotImplementedError(f"{cls.name} declares no shared parts")

    # -- the contract (not overridden) ----------------------------------------------------------
    def fit(self, train: Any, val: Any | None = None, *, context: RunContext | None = None, **sources: Any) -> Detector:
        """Train on healthy data only; returns ``self``.

        ``train``/``val`` are :class:`~medanomaly.data.dataset.ImageDataset` objects; the method sees them through a
        :class:`~medanomaly.data.healthy.HealthyView` (reading a mask or label raises). The global RNGs are seeded
        from ``params["seed"]`` first, so a fit is reproducible whatever ran before it. ``context`` carries where
        checkpoints go and whether to resume (default: none, no resume).
        """
        import copy

        from medanomaly.data.healthy import HealthyView
        from medanomaly.training.loop import seed_everything

        if context is not None and not isinstance(context, RunContext):
            raise TypeError(f"{self.name}: context must be a RunContext, got {type(context).__name__}")
        train_v = HealthyView(train, where="training data")
        if len(train_v) == 0:
            raise ValueError(f"{self.name}: the training data is empty")
        val_v = HealthyView(val, where="validation data") if val is not None else None
        views = {k: (HealthyView(v, where=f"'{k}' data") if v is not None else None) for k, v in sources.items()}
        dims = int(train_v.spatial_dims)
        if dims not in self.spatial_dims_supported:
            raise ValueError(f"{self.name}: supports {self.spatial_dims_supported}-D images, the training data are {dims}-D")
        self.context_ = context or RunContext()
        self.is_fitted = False
        self.train_log = []
        before = copy.deepcopy(self.params)
        if self.context_.work_dir is not None:
            self._check_work_dir(train_v)
        seed_everything(int(self.params["seed"]))
        self._fit(train_v, val_v, **views)
        if self.params != before:
            changed = _changed_keys(before, self.params)
            raise RuntimeError(f"{self.name}: fit changed its parameters ({', '.join(changed)}); fitted state belongs in "
                               "attributes, not in params")
        self.is_fitted = True
        return self

    def _check_work_dir(self, train: Any) -> None:
        """Key the work dir's checkpoints on (method, parameters, training data). Resuming them is for the same fit
        only: checkpoints of another fit (or of unknown origin) are not resumed, with a warning saying why, and this
        fit starts afresh (its checkpoints replace them)."""
        import dataclasses
        import json
        import warnings

        from medanomaly.data.fingerprint import dataset_fingerprint
        from medanomaly.run_folder import FIT_KEY_FILE, plain
        from medanomaly.training.atomic import atomic_write_text

        ctx = self.context_
        assert ctx.work_dir is not None
        key = {"method": self.name, "params": json.loads(json.dumps(plain(self.params), default=str)),
               "data": ctx.data_fingerprint or dataset_fingerprint(train)}
        path = ctx.work_dir / FIT_KEY_FILE
        if ctx.resume and path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                old = "unreadable"
            if isinstance(old, dict) and isinstance(old.get("params"), dict):
                from medanomaly.methods.params import with_new_defaults

                old["params"] = with_new_defaults(old["params"], key["params"], plain(self.defaults))
            if old != key:
                if not isinstance(old, dict):
                    why = f"its {FIT_KEY_FILE} is unreadable"
                elif old.get("method") != key["method"] or old.get("params") != key["params"]:
                    why = "the settings differ"
                else:
                    why = "the training data differ"
                warnings.warn(f"{self.name}: not resuming: {ctx.work_dir} holds checkpoints of another fit ({why}); "
                              "training afresh", stacklevel=3)
                self.context_ = dataclasses.replace(ctx, resume=False)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(key, sort_keys=True))

    def predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None, **kw: Any) -> AnomalyResult:
        """Anomaly maps and image scores: ``images`` (B, C, *spatial) preprocessed, ``foreground`` (B, 1, *spatial)."""
        self.check_input(images, foreground)
        res = self._predict(images, foreground, **kw)
        if tuple(res.pixel_scores.shape) != (images.shape[0], *images.shape[2:]):
            raise RuntimeError(f"{self.name}: pixel scores {tuple(res.pixel_scores.shape)} do not match images "
                               f"{tuple(images.shape)}")
        return res

    def set_context(self, context: RunContext) -> Detector:
        """Set the runtime context outside ``fit`` (e.g. ``quiet`` for a loaded detector's ``predict``); returns self."""
        if not isinstance(context, RunContext):
            raise TypeError(f"{self.name}: context must be a RunContext, got {type(context).__name__}")
        self.context_ = context
        return self

    @property
    def work_dir(self) -> Path | None:
        """Where training keeps checkpoints (from the :class:`RunContext` of the last ``fit``)."""
        return self.context_.work_dir

    @property
    def resume(self) -> bool:
        return self.context_.resume

    @property
    def quiet(self) -> bool:
        return self.context_.quiet

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

    def save(self, run_dir: str | Path, *, sections: dict[str, Any] | None = None,
             calibration: dict[str, Any] | None = None) -> Path:
        """Write the run folder (config, weights, state, versions, training log, then the finished marker).

        ``sections``: more top-level sections of ``config.yaml`` (the pipeline's ``data``, ``train``, ``sources``);
        ``calibration``: the healthy score record (``calibration.json``, :mod:`medanomaly.app.calibrate`).
        Every file is written once, atomically; see :mod:`medanomaly.run_folder`.
        """
        from medanomaly.run_folder import RunFolder

        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: nothing to save, the detector is not fitted")
        extra = dict(sections or {})
        clash = sorted(set(extra) & {"method", "params"})
        if clash:
            raise ValueError(f"{self.name}: sections may not replace {clash}")
        versions = library_versions()
        versions["seed"] = self.params.get("seed")
        folder = RunFolder(run_dir)
        folder.write(config={"method": self.name, "params": self.params, **extra}, tensors=self.state_tensors(),
                     state=self.extra_state(), versions=versions, train_log=self.train_log, calibration=calibration)
        return folder.path

    @classmethod
    def load(cls, run_dir: str | Path) -> Detector:
        """Rebuild a fitted detector from a finished run folder written by :meth:`save`."""
        from medanomaly.run_folder import RunFolder

        folder = RunFolder(run_dir)
        cfg = folder.read_config()
        if cls.name and cfg["method"] != cls.name:
            raise RunFolderError(f"{run_dir} holds a '{cfg['method']}' run, not '{cls.name}'")
        folder.require_finished()
        try:
            klass = cls if cls.name else get_method_class(cfg["method"])
        except KeyError as e:
            raise RunFolderError(f"{run_dir}: {e.args[0]}") from e
        try:
            det = klass(**(cfg.get("params") or {}))
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise RunFolderError(f"{run_dir}: its config.yaml does not fit method '{klass.name}' ({msg})") from e
        folder.check_versions(library_versions())
        tensors = folder.read_tensors()
        state = folder.read_state()
        try:
            det.load_state_tensors(tensors)
            if state is not None:
                det.load_extra_state(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunFolderError(f"{run_dir}: the saved weights/state do not fit method '{klass.name}' ({e})") from e
        det.train_log = folder.read_train_log()
        det.is_fitted = True
        return det


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


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


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``config.yaml`` of a run folder (see :class:`medanomaly.run_folder.RunFolder`)."""
    from medanomaly.run_folder import RunFolder

    return RunFolder(run_dir).read_config()


# -- registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    if not isinstance(cls.defaults.get("seed"), int):
        raise ValueError(f"method '{cls.name}': its defaults need an int 'seed' (the base fit seeds from it)")
    from medanomaly.param_files import RESERVED

    taken = sorted(set(cls.defaults) & set(RESERVED))
    if taken:
        raise ValueError(f"method '{cls.name}': parameter name(s) {taken} are reserved by the parameter-file format")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of every discoverable method (and of any registered at run time), without importing them."""
    from medanomaly.methods.discovery import method_index

    return sorted(set(method_index()) | set(_REGISTRY))


def get_method_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``; imports only that method's module."""
    import importlib

    from medanomaly.methods.discovery import MethodDiscoveryError, method_index

    if name in _REGISTRY:
        return _REGISTRY[name]
    index = method_index()
    if name not in index:
        raise KeyError(f"unknown method '{name}'; available: {', '.join(sorted(set(index) | set(_REGISTRY))) or '(none)'}")
    try:
        importlib.import_module(index[name])
    except Exception as e:  # noqa: BLE001 - a broken method module is named, never silently absent
        raise MethodDiscoveryError(f"method '{name}': its module {index[name]} failed to import: {type(e).__name__}: {e}") from e
    if name not in _REGISTRY:
        raise MethodDiscoveryError(f"method '{name}': importing {index[name]} did not register it (missing @register?)")
    return _REGISTRY[name]


def get_method(name: str, **params: Any) -> Detector:
    """Build a detector by registry name; unknown parameters raise a clear error."""
    cls = get_method_class(name)
    return cls(**params)


def load_detector(run_dir: str | Path) -> Detector:
    """Load any run folder, whatever its method."""
    return Detector.load(run_dir)

