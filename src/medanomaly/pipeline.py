"""The glue behind the command line: train, evaluate, predict, benchmark and the demo as Python functions.

Every function here is what one ``medanomaly`` command does; the CLI only parses options and prints.

A *run folder* written by :func:`train_run` is the detector's own run folder (see
:mod:`medanomaly.methods.base`) whose ``config.yaml`` carries two more sections beside ``method``/``params``:

- ``data``: where the training data came from and how it was preprocessed (``name``, ``split``, ``preset``,
  ``size``, ``spatial_dims``, ``channels``, ``image_shape``, counts). ``evaluate`` and ``predict`` read the preset
  and the size from here, so a run is applied to new data exactly the way it was trained.
- ``train``: the seed, the config set / file and ``--set`` overrides that produced ``params``, the training time.

While training runs, ``request.yaml`` holds what was asked for; ``--resume`` checks that it is asked the same.
A run is *finished* when ``config.yaml`` and ``weights.safetensors`` exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medanomaly.methods.base import (
    CONFIG_FILE,
    STATE_FILE,
    TRAIN_LOG_FILE,
    VERSIONS_FILE,
    WEIGHTS_FILE,
    RunFolderError,
    atomic_write_text,
    merge_params,
    read_run_config,
)

__all__ = [
    "DEMO_CONFIG_SET",
    "DEMO_DATA",
    "DEMO_DATA_OPTIONS",
    "DEMO_METHOD",
    "DEMO_OVERRIDES",
    "DataNotFoundError",
    "PipelineError",
    "TrainSummary",
    "evaluate_run",
    "find_data_root",
    "is_finished_run",
    "load_run",
    "parse_overrides",
    "predict_files",
    "resolve_config",
    "resolve_params",
    "run_benchmark",
    "run_demo",
    "train_run",
]

#: the method, data and configuration ``medanomaly demo`` trains; change these to switch the demo
DEMO_METHOD = "multitask"
DEMO_DATA = "lgg-flair-2d"
DEMO_CONFIG_SET = "cpu-small"
#: parameter overrides on top of the demo's config set (dotted keys allowed)
DEMO_OVERRIDES: dict[str, Any] = {}
#: how the demo loads its data (``size``: image side for the preset; the cpu-small configs are sized for 64 px)
DEMO_DATA_OPTIONS: dict[str, Any] = {"size": 64}

REQUEST_FILE = "request.yaml"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, VERSIONS_FILE, TRAIN_LOG_FILE, REQUEST_FILE)

Echo = Callable[[str], None]


class PipelineError(ValueError):
    """A user-facing problem with the request (existing output, mismatching run, bad option)."""


class DataNotFoundError(PipelineError):
    """The shared real data could not be found."""


def _stderr_echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _echo(quiet: bool, echo: Echo | None) -> Echo:
    if quiet:
        return lambda _msg: None
    return echo or _stderr_echo


# -- parameters -------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["a.b=3", "name=foo"]`` -> ``{"a.b": 3, "name": "foo"}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PipelineError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise PipelineError(f"--set expects key=value, got '{item}' (empty key)")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise PipelineError(f"--set {key}: value '{raw}' is not a valid YAML scalar ({e})") from e
    return out


DATA_KEYS = ("size", "preset", "max_cases")


def _split_config(
    cfg: dict[str, Any], method: str, defaults: dict[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config mapping -> (method parameters, data options).

    Accepts the plain parameter dict, a run's ``{method, params, ...}`` config, or a file keyed by method name
    (``{intensity: {...}, autoencoder: {...}}``, as when several methods share a folder). A top-level ``data``
    section (``size``, ``preset``, ``max_cases``) says how to load the data for these parameters.
    """
    if not isinstance(cfg, dict):
        raise PipelineError(f"{where} must hold a mapping of parameters, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "params" in cfg and isinstance(cfg["params"], dict) and "params" not in defaults:
        if cfg.get("method", method) != method:
            raise PipelineError(f"{where} is for method '{cfg['method']}', not '{method}'")
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        return dict(cfg["params"]), _data_opts(data, where)
    if method in cfg and method not in defaults and isinstance(cfg[method], dict):
        cfg = dict(cfg[method])
    data = cfg.pop("data") if "data" in cfg and "data" not in defaults else {}
    return cfg, _data_opts(data, where)


def _data_opts(data: Any, where: str) -> dict[str, Any]:
    if not data:
        return {}
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: 'data' must be a mapping ({', '.join(DATA_KEYS)})")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise PipelineError(f"{where}: unknown data option(s) {unknown}; valid: {', '.join(DATA_KEYS)}")
    return {k: v for k, v in data.items() if v is not None}


def _read_config_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"config file {path} is not valid YAML ({e})") from e


def resolve_config(
    method: str,
    *,
    config_set: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters, data options): method defaults < config set < config file < overrides.

    Unknown parameter keys raise a ``KeyError`` naming them. Overrides ``data.size=64`` etc. set data options.
    """
    from medanomaly.methods import get_method_class

    cls = get_method_class(method)
    params, data = dict(cls.defaults), {}
    sources: list[tuple[dict[str, Any], str]] = []
    if config_set:
        sources.append((cls.config_set(config_set), f"{method} config set '{config_set}'"))
    if config_file:
        sources.append((_read_config_file(config_file), f"config file {config_file}"))
    for cfg, where in sources:
        p, d = _split_config(cfg, method, cls.defaults, where)
        params = merge_params(params, p, where=where)
        data.update(d)
    if overrides:
        ov = dict(overrides)
        if "data" not in cls.defaults:
            dkeys = [k for k in ov if k.startswith("data.")]
            data.update(_data_opts({k[5:]: ov.pop(k) for k in dkeys}, "--set"))
        params = merge_params(params, ov, where=f"{method} --set")
    return params, data


def resolve_params(method: str, **kw: Any) -> dict[str, Any]:
    """The method parameters of :func:`resolve_config`."""
    return resolve_config(method, **kw)[0]


def _apply_seed(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Put ``seed`` into the method's own seed parameter(s) (``seed`` at the top or one level down)."""
    out = dict(params)
    if "seed" in out:
        out["seed"] = seed
    for k, v in out.items():
        if isinstance(v, dict) and "seed" in v:
            out[k] = {**v, "seed": seed}
    return out


def _find_seed(params: dict[str, Any]) -> int | None:
    if isinstance(params.get("seed"), int):
        return int(params["seed"])
    for v in params.values():
        if isinstance(v, dict) and isinstance(v.get("seed"), int):
            return int(v["seed"])
    return None


# -- data -------------------------------------------------------------------------------------------
def _open_dataset(
    data: Any,
    split: str,
    *,
    normal_only: bool = False,
    preset: str | None = None,
    size: Any = None,
    preset_config: dict[str, Any] | None = None,
    max_cases: int | None = None,
) -> Any:
    """``data`` is a built-in name, a manifest path or an :class:`ImageDataset` (used as given).

    ``preset_config`` (a preset's full ``{"name", **params}`` record, as a run stores it) wins over
    ``preset``/``size``: data are then preprocessed exactly as the run's training data were.
    """
    from medanomaly.data.dataset import ImageDataset

    if isinstance(data, ImageDataset):
        return data
    from medanomaly.data import load_dataset

    kw: dict[str, Any] = {}
    if preset_config:
        from medanomaly.data.preprocess import get_preset

        pc = dict(preset_config)
        kw["preset"] = get_preset(pc.pop("name"), **pc)
    else:
        if preset:
            kw["preset"] = preset
        if size is not None:
            kw["size"] = size
    if max_cases:
        kw["max_cases"] = int(max_cases)
    return load_dataset(str(data), split=split, normal_only=normal_only, **kw)


def _preset_config(ds: Any) -> dict[str, Any] | None:
    """The full preset record of a dataset built by the data layer (None for in-memory datasets)."""
    obj = getattr(ds, "preset_obj", None)
    if obj is not None and hasattr(obj, "config"):
        return dict(obj.config)
    if hasattr(ds, "geometry"):
        try:
            rec = ds.geometry(0).get("preset")
        except Exception:  # noqa: BLE001 - optional information
            rec = None
        if isinstance(rec, dict) and "name" in rec:
            return dict(rec)
    return None


def _data_name(data: Any) -> str:
    from medanomaly.data.dataset import ImageDataset

    if isinstance(data, ImageDataset):
        return data.name or "in-memory"
    p = Path(str(data))
    return str(p.resolve()) if p.suffix or p.exists() else str(data)


def _describe_dataset(ds: Any) -> dict[str, Any]:
    if len(ds) == 0:
        raise PipelineError(f"dataset '{getattr(ds, 'name', '?')}' is empty")
    img = ds[0]["image"]
    return {
        "spatial_dims": int(img.ndim - 1),
        "channels": int(img.shape[0]),
        "image_shape": [int(s) for s in img.shape[1:]],
        "preset": getattr(ds, "preset", "") or None,
        "preset_config": _preset_config(ds),
    }


def find_data_root() -> tuple[Path | None, list[str]]:
    """Where the shared real data is: ``MEDANOMALY_DATA``, then the data layer's locator, then ``../shared/data``.

    Returns (root or None, the places looked at).
    """
    looked: list[str] = []
    env = os.environ.get("MEDANOMALY_DATA")
    if env:
        looked.append(f"{env} (MEDANOMALY_DATA)")
        p = Path(env).expanduser()
        return (p if (p / "brain_lgg_flair_2d").is_dir() else None), looked
    try:  # the data layer's own locator, when it exists
        from medanomaly.data import samples as _samples

        locate = getattr(_samples, "find_data_root", None) or getattr(_samples, "data_root", None)
        if locate is not None:
            root = locate()
            if root is not None and (Path(root) / "brain_lgg_flair_2d").is_dir():
                return Path(root), looked
    except Exception:  # noqa: BLE001 - fall back to our own search
        pass
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data", here.parents[3] / "shared" / "data"]
    for c in candidates:
        if str(c) not in looked:
            looked.append(str(c))
        if (c / "brain_lgg_flair_2d").is_dir():
            return c, looked
    return None, looked


# -- run folders ------------------------------------------------------------------------------------
def is_finished_run(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE).is_file() and (run_dir / WEIGHTS_FILE).is_file()


def _clear_run(run_dir: Path) -> None:
    """Remove what a previous run wrote (our known files and the checkpoints), nothing else."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    if (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")


def load_run(run_dir: str | Path, expect_method: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Load a finished run folder: (detector, its full config dict)."""
    from medanomaly.methods import load_detector

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if expect_method and cfg["method"] != expect_method:
        raise RunFolderError(f"{run_dir} holds a '{cfg['method']}' run, not '{expect_method}'")
    if not (run_dir / WEIGHTS_FILE).is_file():
        hint = ""
        if (run_dir / "checkpoints").is_dir():
            hint = " (training did not finish; continue it with `medanomaly train ... --resume`)"
        raise RunFolderError(f"{run_dir}: {WEIGHTS_FILE} is missing{hint}")
    det = load_detector(run_dir)
    det.work_dir = None
    return det, cfg


@dataclass
class TrainSummary:
    run_dir: Path
    method: str
    seconds: float
    n_train: int
    n_val: int
    resumed: bool = False
    reused: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def train_run(
    method: str,
    data: Any,
    out: str | Path,
    *,
    split: str = "train",
    val_split: str | None = "val",
    config_set: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    preset: str | None = None,
    size: Any = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> TrainSummary:
    """Train ``method`` on the healthy images of ``data``/``split`` and save a run folder at ``out``.

    The validation set is the ``val_split`` of the same data, normal images only; no lesion mask or label of
    it reaches the method (``fit`` reads images and foreground only). A finished run at ``out`` is refused
    unless ``force``; an unfinished one (checkpoints, no weights) needs ``resume`` or ``force``.
    """
    from medanomaly.methods import get_method
    from medanomaly.training import seed_everything

    say = _echo(quiet, echo)
    run_dir = Path(out)
    params, data_opts = resolve_config(method, config_set=config_set, config_file=config_file, overrides=overrides)
    preset = preset if preset is not None else data_opts.get("preset")
    size = size if size is not None else data_opts.get("size")
    max_cases = data_opts.get("max_cases")
    if seed is not None:
        params = _apply_seed(params, seed)
    seed_used = seed if seed is not None else (_find_seed(params) or 0)
    request = {
        "method": method,
        "params": params,
        "data": {"name": _data_name(data), "split": split, "preset": preset, "size": size, "max_cases": max_cases},
        "seed": seed_used,
    }
    request = json.loads(json.dumps(request, default=str))  # plain types, comparable with the YAML round trip

    resumed = False
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"{run_dir} exists and is not a folder")
    if is_finished_run(run_dir):
        if not force:
            old = read_run_config(run_dir).get("method", "?")
            raise PipelineError(
                f"{run_dir} already holds a finished '{old}' run; use --force to overwrite it or choose another --out"
            )
        _clear_run(run_dir)
    elif (run_dir / REQUEST_FILE).exists() or (run_dir / "checkpoints").is_dir():
        if force:
            _clear_run(run_dir)
        elif not resume:
            raise PipelineError(f"{run_dir} holds an unfinished run; use --resume to continue it or --force to start over")
        else:
            old = _load_yaml(run_dir / REQUEST_FILE) if (run_dir / REQUEST_FILE).exists() else None
            if old is not None and old != request:
                diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
                detail = _param_diff(old.get("params", {}), request["params"]) if "params" in diff else ""
                raise PipelineError(
                    f"--resume: {run_dir} was started with different settings ({', '.join(diff)}{detail}); "
                    "repeat the original options or use --force to start over"
                )
            resumed = True
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise PipelineError(f"{run_dir} is not empty and holds no medanomaly run; choose another --out or use --force")

    det = get_method(method, **params)
    say(f"loading {split} data from {request['data']['name']} ...")
    train = _open_dataset(data, split, normal_only=True, preset=preset, size=size, max_cases=max_cases)
    desc = _describe_dataset(train)
    if desc["spatial_dims"] not in det.spatial_dims_supported:
        raise PipelineError(
            f"method '{method}' supports {det.spatial_dims_supported}-D images, the data are {desc['spatial_dims']}-D"
        )
    val = None
    if val_split:
        try:
            val = _open_dataset(data, val_split, normal_only=True, preset=preset, size=size, max_cases=max_cases)
            if len(val) == 0:
                val = None
        except (KeyError, ValueError, FileNotFoundError) as e:
            say(f"note: no '{val_split}' split ({e}); training without validation")
            val = None
    say(f"training '{method}' on {len(train)} healthy images" + (f", validating on {len(val)}" if val is not None else ""))

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / REQUEST_FILE, yaml.safe_dump(request, sort_keys=True))
    det.work_dir = run_dir
    det.resume = resume
    det.quiet = quiet
    seed_everything(seed_used)
    t0 = time.perf_counter()
    det.fit(train, val)
    seconds = time.perf_counter() - t0

    det.save(run_dir, seed=seed_used)
    cfg = read_run_config(run_dir)
    cfg["data"] = {
        "name": request["data"]["name"],
        "split": split,
        "val_split": val_split if val is not None else None,
        "preset": desc["preset"] or preset,
        "preset_config": desc["preset_config"],
        "size": size,
        "max_cases": max_cases,
        "spatial_dims": desc["spatial_dims"],
        "channels": desc["channels"],
        "image_shape": desc["image_shape"],
        "n_train": len(train),
        "n_val": len(val) if val is not None else 0,
    }
    cfg["train"] = {
        "seed": seed_used,
        "config_set": config_set,
        "config_file": str(config_file) if config_file else None,
        "overrides": overrides or {},
        "seconds": round(seconds, 3),
        "resumed": resumed,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    cfg = json.loads(json.dumps(cfg, default=str))
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / REQUEST_FILE).unlink(missing_ok=True)
    say(f"saved run to {run_dir} ({seconds:.1f} s)")
    return TrainSummary(run_dir, method, seconds, len(train), len(val) if val is not None else 0, resumed, False, cfg)


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunFolderError(f"{path}: not valid YAML ({e})") from e


def _param_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            inner = _param_diff(a[k], b[k], f"{prefix}{k}.")
            if inner:
                keys.append(inner.strip(": "))
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return ": " + ", ".join(keys) if keys else ""


# -- evaluation -------------------------------------------------------------------------------------
def describe_device(det: Any = None) -> str:
    """The device predictions run on, in words (with the thread count on CPU)."""
    import torch

    from medanomaly.training import get_device

    dev = getattr(det, "device", None)
    if dev is None and isinstance(getattr(det, "params", None), dict):
        dev = det.params.get("device")
    d = get_device(str(dev) if dev is not None else None)
    if d.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(d)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.floating):
        return _nan_to_none(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def _check_data_matches_run(desc: dict[str, Any], run_data: dict[str, Any] | None, what: str) -> None:
    if not run_data:
        return
    want = run_data.get("image_shape")
    if want is not None and list(desc["image_shape"]) != list(want):
        raise PipelineError(
            f"{what} gives images of shape {tuple(desc['image_shape'])}, the run was trained on {tuple(want)} "
            f"(preset {run_data.get('preset')}, size {run_data.get('size')})"
        )
    if run_data.get("channels") is not None and desc["channels"] != run_data["channels"]:
        raise PipelineError(f"{what} has {desc['channels']} channel(s), the run was trained on {run_data['channels']}")


def evaluate_run(
    run: str | Path,
    data: Any = None,
    out: str | Path | None = None,
    *,
    split: str = "test",
    batch_size: int = 16,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Predict a whole split of ``data`` (default: the run's own data) and write ``metrics.json`` + ``report.html``.

    Pixel metrics are over foreground pixels of the images whose lesion mask is known; sample metrics over
    the images with a known label. ``seconds_per_image`` times ``predict`` only (no data loading).
    """
    import torch
    from tqdm.auto import tqdm

    from medanomaly.data.dataset import collate_samples

    say = _echo(quiet, echo)
    det, cfg = load_run(run)
    run_data = cfg.get("data") or {}
    if data is None:
        if not run_data.get("name"):
            raise PipelineError(f"{run} does not record its data; pass --data")
        data = run_data["name"]
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and (out_dir / "metrics.json").exists() and not force:
        raise PipelineError(f"{out_dir / 'metrics.json'} already exists; use --force to overwrite or choose another --out")

    ds = _open_dataset(data, split, preset=run_data.get("preset"), size=run_data.get("size"),
                       preset_config=run_data.get("preset_config"))
    desc = _describe_dataset(ds)
    _check_data_matches_run(desc, run_data, f"{_data_name(data)} ({split})")
    if batch_size < 1:
        raise PipelineError(f"batch size must be >= 1, got {batch_size}")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_samples, num_workers=0)

    scores, masks, fgs, images = [], [], [], []
    img_scores, labels, has_mask, case_ids, slice_idx = [], [], [], [], []
    # the method's healthy-looking images (AnomalyResult.extras["restoration"]), for the report only
    restorations: list[np.ndarray] | None = [] if report and out is not None else None
    rest_bytes, rest_note = 0, ""
    predict_seconds, n_batches = 0.0, 0
    cuda = torch.cuda.is_available()
    t_wall = time.perf_counter()
    with tqdm(total=len(ds), desc=f"evaluate {cfg['method']}", disable=quiet, dynamic_ncols=True, leave=False) as bar:
        for batch in loader:
            t0 = time.perf_counter()
            with torch.no_grad():
                res = det.predict(batch["image"], batch["foreground"])
            if cuda:
                torch.cuda.synchronize()
            predict_seconds += time.perf_counter() - t0
            n_batches += 1
            ps = res.pixel_scores.detach().float().cpu()
            if tuple(ps.shape[1:]) != tuple(batch["image"].shape[2:]):
                raise RuntimeError(
                    f"{cfg['method']}: pixel scores {tuple(ps.shape)} do not match images {tuple(batch['image'].shape)}"
                )
            scores.append(ps.numpy().astype(np.float32))
            if restorations is not None:
                r = res.extras.get("restoration")
                r = r.detach().float().cpu() if isinstance(r, torch.Tensor) else None
                if r is not None and r.ndim == ps.ndim + 1:
                    r = r[:, 0]  # (B, C, *S) -> channel 0
                if r is None:  # a method without one (intensity, multitask): nothing to note
                    restorations = None
                elif tuple(r.shape) != tuple(ps.shape):
                    rest_note = f"extras['restoration'] has shape {tuple(r.shape)}, not the maps' {tuple(ps.shape)}"
                    restorations = None
                elif rest_bytes + r.numel() * 4 > 1 << 30:
                    rest_note = "restorations not kept: over 1 GB for this split"
                    restorations = None
                else:
                    restorations.append(r.numpy().astype(np.float32))
                    rest_bytes += r.numel() * 4
            masks.append(batch["mask"][:, 0].numpy())
            fgs.append(batch["foreground"][:, 0].numpy())
            images.append(batch["image"].numpy().astype(np.float32))
            img_scores.append(res.image_scores.detach().float().cpu().numpy())
            labels.append(batch["label"].numpy())
            has_mask.append(batch["has_mask"].numpy())
            case_ids += list(batch["case_id"])
            slice_idx += batch["slice_index"].tolist()
            bar.update(len(batch["case_id"]))
    wall = time.perf_counter() - t_wall
    S, M, F = np.concatenate(scores), np.concatenate(masks), np.concatenate(fgs)
    IS, L, HM = np.concatenate(img_scores), np.concatenate(labels), np.concatenate(has_mask)
    n = len(IS)

    from medanomaly.evaluation.metrics import pixel_metrics, sample_metrics

    metrics: dict[str, Any] = {
        "method": cfg["method"],
        "run": str(Path(run)),
        "data": _data_name(data),
        "split": split,
        "preset": run_data.get("preset"),
        "n_images": int(n),
        "n_with_mask": int(HM.sum()),
        "n_abnormal": int((L == 1).sum()),
        "n_normal": int((L == 0).sum()),
    }
    pm: dict[str, Any] = {}
    if HM.any():
        sel = HM.astype(bool)
        pm = pixel_metrics(S[sel], M[sel], foreground=F[sel], case_ids=[c for c, k in zip(case_ids, sel, strict=True) if k])
    metrics["pixel_ap"] = _nan_to_none(pm.get("ap")) if pm else None
    metrics["pixel_auroc"] = _nan_to_none(pm.get("auroc")) if pm else None
    metrics["best_dice"] = _nan_to_none(pm.get("best_dice")) if pm else None
    metrics["best_threshold"] = _nan_to_none(pm.get("best_threshold")) if pm else None
    for k, v in pm.items():
        if k not in ("ap", "auroc", "best_dice", "best_threshold") and isinstance(v, int | float | np.number):
            metrics[f"pixel_{k}"] = _nan_to_none(v)
    known = L >= 0
    if known.any() and len(set(L[known].tolist())) == 2:
        sm = sample_metrics(IS[known], L[known])
        metrics["sample_ap"], metrics["sample_auroc"] = _nan_to_none(sm.get("ap")), _nan_to_none(sm.get("auroc"))
    else:
        metrics["sample_ap"] = metrics["sample_auroc"] = None
    metrics.update(
        {
            "seconds_per_image": predict_seconds / max(n, 1),
            "seconds_per_batch": predict_seconds / max(n_batches, 1),
            "batch_size": batch_size,
            "predict_seconds": predict_seconds,
            "wall_seconds": wall,
            "device": describe_device(det),
            "train_seconds": (cfg.get("train") or {}).get("seconds"),
            "pixel_metrics_over": "foreground pixels of images with a known mask",
        }
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        per_image = [
            {"case_id": c, "slice_index": s, "label": int(lab), "image_score": float(v)}
            for c, s, lab, v in zip(case_ids, slice_idx, L, IS, strict=True)
        ]
        atomic_write_text(out_dir / "image_scores.json", json.dumps(per_image))
        if report:
            settings = {
                "method": cfg["method"],
                "params": json.dumps(cfg.get("params", {}), sort_keys=True),
                "run": str(Path(run).resolve()),
                "data": metrics["data"],
                "split": split,
                "preset": json.dumps(run_data.get("preset_config") or run_data.get("preset")),
                "trained_on": f"{run_data.get('name')} / {run_data.get('split')} ({run_data.get('n_train')} healthy images)",
                "seed": (cfg.get("train") or {}).get("seed"),
                "batch_size": batch_size,
            }
            if rest_note:
                settings["restorations"] = f"not shown: {rest_note}"
            train_log, log_path = None, Path(run) / "train_log.jsonl"
            if log_path.is_file():
                train_log = []
                for line in log_path.read_text(errors="replace").splitlines():
                    try:
                        rec = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        rec = None
                    if isinstance(rec, dict):
                        train_log.append(rec)
            path = _write_report(out_dir, metrics, settings, images=np.concatenate(images), scores=S, masks=M,
                                 foreground=F, image_scores=IS, labels=L, has_mask=HM, case_ids=case_ids,
                                 restorations=np.concatenate(restorations) if restorations else None, train_log=train_log)
            metrics["report"] = str(path)
            atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        say(f"metrics: {out_dir / 'metrics.json'}" + (f"\nreport:  {metrics['report']}" if metrics.get("report") else ""))
    return metrics


def _write_report(out_dir: Path, metrics: dict[str, Any], settings: dict[str, Any], **arrays: Any) -> Path:
    """The HTML page (metric table, PR/ROC curves, best/median/worst cases with restorations, healthy images,
    training curves) by the evaluation report module. Without any lesion mask the maps still go in (healthy grid)."""
    from medanomaly.evaluation.report import write_report

    has_mask = arrays.pop("has_mask")
    sel = has_mask.astype(bool)
    rest = arrays.get("restorations")
    kw: dict[str, Any] = {"sample_scores": arrays["image_scores"], "sample_labels": arrays["labels"],
                          "train_log": arrays.get("train_log")}
    if sel.any():
        kw.update(scores=arrays["scores"][sel], masks=arrays["masks"][sel], images=arrays["images"][sel],
                  foreground=arrays["foreground"][sel], case_ids=[c for c, k in zip(arrays["case_ids"], sel, strict=True) if k],
                  restorations=rest[sel] if rest is not None else None)
    else:
        kw.update(scores=arrays["scores"], images=arrays["images"], foreground=arrays["foreground"],
                  case_ids=list(arrays["case_ids"]), restorations=rest)
    title = f"medanomaly: {metrics.get('method')} on {metrics.get('data')} ({metrics.get('split')})"
    return Path(write_report(out_dir, metrics, title=title, settings=settings, **kw))


# -- benchmark --------------------------------------------------------------------------------------
MIM_FAMILY = ("mim-ood", "ar-restoration", "token-critic")
MAE_FAMILY = ("mae", "amae", "mae-pseudo")
# modules each MIM-family method trains (the order of ``reuse.modules``)
_MIM_MODULES = {"mim-ood": ["tokenizer", "mvtm", "atd"], "ar-restoration": ["tokenizer", "ar"],
                "token-critic": ["tokenizer", "mvtm", "critic"]}
_TOKENIZER_KEYS = ("tokenizer", "tokenizer_train", "augment", "seed")
_MVTM_KEYS = ("transformer", "transformer_train", "masks", "seed")
_MAE_KEYS = ("mae", "pretrain", "seed")
_MEMBER_FREE = ("max_models", "members", "predict", "num_workers", "reuse_members_from")  # not in a member's training


def parse_benchmark_methods(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["intensity", "mim-ood-r8=mim-ood"]`` -> ``[(label, method), ...]``; a label names a variant's run."""
    from medanomaly.methods import get_method_class

    out: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        label, eq, method = item.partition("=")
        label, method = label.strip(), (method.strip() if eq else label.strip())
        if not label or not method or "/" in label or label.startswith("."):
            raise PipelineError(f"--methods: '{item}' is not NAME or LABEL=NAME")
        get_method_class(method)  # unknown method: fails before any training
        out.append((label, method))
    if not out:
        raise PipelineError("--methods is empty; give a comma-separated list, e.g. intensity,autoencoder")
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise PipelineError(f"--methods lists a label twice: {','.join(labels)} (name variants LABEL=METHOD)")
    return out


def parse_benchmark_overrides(items: Sequence[str] | None, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["mim-ood-r8.restoration.R=8"]`` -> ``{"mim-ood-r8": {"restoration.R": 8}}``; the first part is a label."""
    flat = parse_overrides(items)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        label = next((lab for lab in sorted(labels, key=len, reverse=True) if key.startswith(lab + ".")), None)
        if label is None:
            raise PipelineError(f"--set {key}: must start with one of the labels in --methods ({', '.join(labels)}), "
                                "e.g. --set mim-ood.restoration.R=8")
        out.setdefault(label, {})[key[len(label) + 1:]] = value
    return out


def _same_keys(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> bool:
    return all(a.get(k) == b.get(k) for k in keys)


def _strip(p: dict[str, Any]) -> dict[str, Any]:
    """Training-relevant parameters: all but the inference-time ``restoration`` and the ``reuse`` source."""
    return {k: v for k, v in p.items() if k not in ("restoration", "reuse")}


def plan_sharing(
    entries: Sequence[tuple[str, str]], params: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]],
    runs_dir: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Which runs start from another run's trained parts, as in the papers' comparisons.

    - MIM family: the first of ``mim-ood``/``ar-restoration``/``token-critic`` listed trains the VQ-VAE; the others
      reuse it (``reuse.run_dir``) when their tokenizer settings are equal. ``token-critic`` also reuses an earlier
      ``mim-ood``'s MVTM when the transformer settings are equal (the paper's MVTM + Token Critic baseline). A
      variant of an earlier-listed method that differs from it only in ``restoration.*`` reuses every trained
      module of it (an inference-only variant, e.g. R = 8).
    - MAE family: ``mae`` (or else the first of ``amae``/``mae-pseudo``) pre-trains the MAE; the others start
      from it (``pretrained``) when their MAE settings are equal.
    - ``multitask``: a variant of an earlier-listed run that differs only in which members it keeps
      (``max_models``, ``members``) or in prediction settings loads the members they have in common
      (``reuse_members_from``) and trains only the others.

    A label whose overrides already set ``reuse``/``pretrained`` is left alone. Returns (extra overrides per
    label, a note per label) -- the notes go into the comparison table.
    """
    extra: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    own = {lab: overrides.get(lab) or {} for lab, _ in entries}
    first_of: dict[str, tuple[str, str]] = {}
    for lab, m in entries:
        if m in MIM_FAMILY:
            src = first_of.setdefault("mim", (lab, m))
            if src[0] == lab or any(k.startswith("reuse") for k in own[lab]):
                continue
            p = params[lab]
            twin = next((lb for lb, mm in entries[: entries.index((lab, m))] if mm == m), None)
            if twin is not None and _strip(p) == _strip(params[twin]):
                extra[lab] = {"reuse.run_dir": str(runs_dir / twin), "reuse.modules": list(_MIM_MODULES[m])}
                notes[lab] = f"{', '.join(_MIM_MODULES[m])} from {twin}"
                continue
            slab = src[0]
            if not _same_keys(p, params[slab], _TOKENIZER_KEYS):
                notes[lab] = f"own tokenizer (settings differ from {slab})"
                continue
            modules = ["tokenizer"]
            if m == "token-critic":
                mv = next((lb for lb, mm in entries[: entries.index((lab, m))] if mm == "mim-ood"
                           and _same_keys(p, params[lb], _MVTM_KEYS + _TOKENIZER_KEYS)), None)
                if mv is not None:
                    slab, modules = mv, ["tokenizer", "mvtm"]
            extra[lab] = {"reuse.run_dir": str(runs_dir / slab), "reuse.modules": modules}
            notes[lab] = f"{', '.join(modules)} from {slab}"
        elif m == "multitask":
            if "reuse_members_from" in own[lab]:
                continue
            twin = next((lb for lb, mm in entries[: entries.index((lab, m))] if mm == m), None)
            if twin is None:
                continue
            a, b = ({k: v for k, v in q.items() if k not in _MEMBER_FREE} for q in (params[lab], params[twin]))
            if a == b:
                extra[lab] = {"reuse_members_from": str(runs_dir / twin)}
                notes[lab] = f"members in common with {twin}"
        elif m in MAE_FAMILY:
            if "mae" not in first_of:
                mae_lab = next((lb for lb, mm in entries if mm == "mae"), None)
                first_of["mae"] = (mae_lab, "mae") if mae_lab else (lab, m)
            slab, _ = first_of["mae"]
            if slab == lab or "pretrained" in own[lab]:
                continue
            if not _same_keys(params[lab], params[slab], _MAE_KEYS):
                notes[lab] = f"own MAE pre-training (settings differ from {slab})"
                continue
            extra[lab] = {"pretrained": str(runs_dir / slab)}
            notes[lab] = f"pre-trained MAE from {slab}"
    return extra, notes


def run_benchmark(
    methods: Sequence[str],
    data: Any,
    out: str | Path,
    *,
    config_set: str | None = "cpu-small",
    overrides: dict[str, dict[str, Any]] | None = None,
    split: str = "test",
    train_split: str = "train",
    train_data: Any = None,
    seed: int | None = None,
    size: Any = None,
    batch_size: int = 16,
    share: bool = True,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse finished runs under ``out/runs/<label>``) and evaluate each method on the same split.

    ``methods``: names or ``LABEL=METHOD`` variants (``mim-ood-r8=mim-ood``); ``overrides``: parameters per label.
    ``train_data``: train on other data than ``data`` (e.g. healthy IXI, test on BraTS); default: ``data``.
    ``share``: runs start from the trained parts of others where the papers share them (see
    :func:`plan_sharing`); those parts are trained first. Writes ``out/eval/<label>/`` per method and one
    comparison table (Markdown, CSV, HTML) in ``out``. A finished run is reused only when it was trained with the
    same method, data, config set and overrides; ``force`` retrains everything.
    """
    say = _echo(quiet, echo)
    entries = parse_benchmark_methods(methods)
    from medanomaly.methods import get_method_class

    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown = sorted(set(overrides) - {lab for lab, _ in entries})
    if unknown:
        raise PipelineError(f"overrides for {unknown}, which --methods does not list")
    params: dict[str, dict[str, Any]] = {}
    for lab, m in entries:  # fail before any training on a typo
        cls = get_method_class(m)
        if config_set and config_set not in cls.config_sets():
            avail = ", ".join(cls.config_sets()) or "(none)"
            raise PipelineError(f"method '{m}' has no config set '{config_set}'; available: {avail}")
        try:
            params[lab] = resolve_config(m, config_set=config_set, overrides=overrides.get(lab))[0]
        except KeyError as e:
            raise PipelineError(f"--set for '{lab}': {e.args[0] if e.args else e}") from e
    out = Path(out)
    train_data = data if train_data is None else train_data
    extra, notes = plan_sharing(entries, params, overrides, out / "runs") if share else ({}, {})
    sources = {Path(v).name for ov in extra.values() for k, v in ov.items() if k in ("reuse.run_dir", "pretrained")}
    order = [e for e in entries if e[0] in sources] + [e for e in entries if e[0] not in sources]
    results: dict[str, dict[str, Any]] = {}
    for lab, m in order:
        run_dir = out / "runs" / lab
        ov = {**overrides.get(lab, {}), **extra.get(lab, {})}
        reused = False
        if is_finished_run(run_dir) and not force:
            cfg = read_run_config(run_dir)
            same = (
                cfg.get("method") == m
                and (cfg.get("train") or {}).get("config_set") == config_set
                and (cfg.get("data") or {}).get("name") == _data_name(train_data)
                and (cfg.get("train") or {}).get("overrides", {}) == json.loads(json.dumps(ov, default=str))
                and (size is None or (cfg.get("data") or {}).get("size") == size)
            )
            if not same:
                raise PipelineError(
                    f"{run_dir} holds a run trained with other settings (method/data/config set/overrides); "
                    "use --force to retrain"
                )
            reused = True
            say(f"[{lab}] reusing the finished run in {run_dir}")
        else:
            say(f"[{lab}] training {m}" + (f" ({notes[lab]})" if lab in notes else "") + " ...")
            train_run(m, train_data, run_dir, split=train_split, config_set=config_set, overrides=ov or None,
                      seed=seed, size=size, resume=True, force=force, quiet=quiet, echo=echo)
        say(f"[{lab}] evaluating on '{split}' ...")
        metrics = evaluate_run(run_dir, data, out / "eval" / lab, split=split, batch_size=batch_size, force=True,
                               quiet=quiet, echo=echo)
        results[lab] = {
            "method": lab,
            "base_method": m,
            "config_set": config_set,
            "pixel_ap": metrics["pixel_ap"],
            "pixel_auroc": metrics["pixel_auroc"],
            "best_dice": metrics["best_dice"],
            "sample_ap": metrics["sample_ap"],
            "sample_auroc": metrics["sample_auroc"],
            "train_seconds": metrics.get("train_seconds"),
            "seconds_per_image": metrics["seconds_per_image"],
            "seconds_per_batch": metrics["seconds_per_batch"],
            "device": metrics["device"],
            "n_test": metrics["n_images"],
            "reused_run": reused,
            "shares": notes.get(lab, ""),
            "settings": json.dumps(overrides.get(lab) or {}, sort_keys=True, default=str) if overrides.get(lab) else "",
            "report": str(Path("eval") / lab / "report.html"),
        }
    rows = [results[lab] for lab, _ in entries]
    from medanomaly.evaluation.report import write_comparison_table

    write_comparison_table(rows, out)
    record = {"data": _data_name(data), "train_data": _data_name(train_data), "split": split, "config_set": config_set,
              "batch_size": batch_size, "methods": {lab: m for lab, m in entries}, "rows": rows,
              "versions": _versions()}
    atomic_write_text(out / "benchmark.json", json.dumps(record, indent=1, default=str))
    say(f"comparison table: {out / 'comparison.md'}")
    return rows


def _versions() -> dict[str, str]:
    from medanomaly.methods.base import library_versions

    return library_versions()


# -- demo -------------------------------------------------------------------------------------------
def data_not_found_message(looked: Sequence[str]) -> str:
    places = "; ".join(looked) if looked else "(nowhere)"
    return (
        f"the shared real data (a folder holding brain_lgg_flair_2d/) was not found. Looked in: {places}. "
        "Point to it with `export MEDANOMALY_DATA=/path/to/data` (the folder that holds brain_lgg_flair_2d/, "
        "see its README.md/SOURCE.md for where the data come from), or run `medanomaly train/evaluate` on your own "
        "manifest with --data FILE.csv"
    )


def run_demo(
    out: str | Path = "medanomaly-demo",
    *,
    method: str = DEMO_METHOD,
    data: str = DEMO_DATA,
    config_set: str | None = DEMO_CONFIG_SET,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Train the demo method's small configuration on the real 2D brain data, evaluate on the test split.

    Reuses a finished demo run in ``out/run`` (``force`` retrains). Returns the metrics, with ``report`` (the
    HTML page), ``train_seconds`` and ``total_seconds``.
    """
    say = _echo(quiet, echo)
    root, looked = find_data_root()
    if root is None:
        raise DataNotFoundError(data_not_found_message(looked))
    os.environ.setdefault("MEDANOMALY_DATA", str(root))
    t0 = time.perf_counter()
    out = Path(out)
    run_dir = out / "run"
    if is_finished_run(run_dir) and not force:
        say(f"reusing the finished demo run in {run_dir} (use --force to retrain)")
    else:
        ov = {**DEMO_OVERRIDES, **(overrides or {})}
        train_run(method, data, run_dir, config_set=config_set, overrides=ov or None, resume=True, force=force,
                  quiet=quiet, echo=echo, size=DEMO_DATA_OPTIONS.get("size"), preset=DEMO_DATA_OPTIONS.get("preset"))
    metrics = evaluate_run(run_dir, data, out / "eval", split="test", force=True, quiet=quiet, echo=echo)
    metrics["total_seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "eval" / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


# -- listing ----------------------------------------------------------------------------------------
def _names_from(module: str, *funcs: str) -> list[str]:
    """Call the first of ``funcs`` that ``module`` has; [] when the module/function is not there."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    for f in funcs:
        fn = getattr(mod, f, None)
        if callable(fn):
            res = fn()
            return sorted(res) if not isinstance(res, dict) else sorted(res)
    return []


def list_everything() -> dict[str, Any]:
    """Registered methods with their config sets, built-in datasets, preprocessing presets, synth tasks."""
    from medanomaly.methods import get_method_class, list_methods

    return {
        "methods": {m: get_method_class(m).config_sets() for m in list_methods()},
        "datasets": _names_from("medanomaly.data", "list_datasets", "builtin_datasets"),
        "presets": _names_from("medanomaly.data.preprocess", "list_presets")
        or _names_from("medanomaly.data", "list_presets"),
        "synth_tasks": _names_from("medanomaly.synth", "list_tasks"),
    }


# -- predict ----------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npz"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _unfit_2d(maps: np.ndarray, geo: dict[str, Any]) -> np.ndarray:
    """Undo ``fit_2d``: (N, size, size) maps -> (N, *orig) (crop the padding, resize back bilinearly)."""
    import torch
    import torch.nn.functional as F

    nh, nw = (int(v) for v in geo["resized"])
    top, left = (int(v) for v in geo["pad"])
    h, w = (int(v) for v in geo["orig"])
    crop = torch.from_numpy(np.ascontiguousarray(maps[:, top : top + nh, left : left + nw], dtype=np.float32))[:, None]
    if (nh, nw) != (h, w):
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    return crop[:, 0].numpy()


def _predict_batches(det: Any, images: np.ndarray, fg: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        with torch.no_grad():
            res = det.predict(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)),
                              torch.from_numpy(np.ascontiguousarray(fg[i : i + batch_size], dtype=bool)))
        maps.append(res.pixel_scores.detach().float().cpu().numpy())
        scores.append(res.image_scores.detach().float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def predict_files(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    batch_size: int = 16,
    force: bool = False,
    quiet: bool = False,
    echo: Echo | None = None,
) -> list[Path]:
    """Anomaly maps for image files, written in each input's own geometry.

    The run's stored preset preprocesses each input. ``brain-mri-2d`` runs take 2D images (PNG/JPEG/TIFF, 2D
    NIfTI, DICOM file) or 3D volumes (processed as axial slices, the map written back as a volume); 3D presets take
    volumes (NIfTI, DICOM folder); ``cxr`` takes 2D images. Writes ``<name>_anomaly.nii.gz`` for NIfTI/volume
    inputs, ``<name>_anomaly.png`` for 2D inputs (scaled from the map's min..max, recorded in ``scores.csv``),
    ``<name>_overlay.png`` for all, and ``scores.csv`` (image score per input). Returns the map paths.
    """
    from tqdm.auto import tqdm

    from medanomaly.data.io import read_image, save_overlay_png, write_nifti_map, write_png_map
    from medanomaly.data.preprocess import get_preset
    from medanomaly.data.samples import volume_to_slices

    say = _echo(quiet, echo)
    det, cfg = load_run(run)
    run_data = cfg.get("data") or {}
    pc = run_data.get("preset_config")
    if not pc:
        raise PipelineError(
            f"{run} records no preprocessing preset (it was not trained with `medanomaly train` on files); cannot predict files"
        )
    pc = dict(pc)
    preset = get_preset(pc.pop("name"), **pc)
    want_shape = [int(s) for s in run_data.get("image_shape") or []]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise PipelineError("no input files given")
    stems = [_stem(p) for p in inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise PipelineError(f"several inputs share the name {dup[0]!r}; predict them into different --out folders")
    out = Path(out)
    planned = []
    for s in stems:
        planned += [out / f"{s}_anomaly.nii.gz", out / f"{s}_anomaly.png", out / f"{s}_overlay.png"]
    existing = [q for q in planned + [out / "scores.csv"] if q.exists()]
    if existing and not force:
        raise PipelineError(f"{existing[0]} already exists; use --force to overwrite or choose another --out")
    for p in inputs:
        if not p.exists():
            raise PipelineError(f"input {p} does not exist")

    def _read(path: Path) -> Any:
        ld = read_image(path)
        arr = ld.array
        while arr.ndim > 2 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and ld.meta.get("format") == "pil" and arr.shape[-1] in (3, 4):
            arr = arr[..., :3].mean(-1)
        if arr.ndim not in (2, 3):
            raise PipelineError(f"{path}: expected a 2D image or a 3D volume, got shape {tuple(ld.array.shape)}")
        if preset.spatial_dims == 3 and arr.ndim != 3:
            raise PipelineError(f"{path}: the run expects 3D volumes (preset {preset.name}), got a 2D image {arr.shape}")
        if preset.spatial_dims == 2 and arr.ndim == 3 and preset.name != "brain-mri-2d":
            raise PipelineError(f"{path}: preset {preset.name} takes 2D images, got a 3D volume {arr.shape}")
        ld.array = arr
        return ld

    for p in inputs:  # check every input before writing anything
        _read(p)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    rows = ["input,image_score,map,map_min,map_max"]
    for path, stem in tqdm(list(zip(inputs, stems, strict=True)), desc="predict", disable=quiet, dynamic_ncols=True,
                           leave=False):
        ld = _read(path)
        arr, fmt = ld.array, ld.meta.get("format")
        if preset.spatial_dims == 2 and arr.ndim == 3:  # a volume through a 2D run: axial slices
            from medanomaly.data.preprocess import reorient

            slices = volume_to_slices(arr, ld.affine)
            st = preset.apply_slices(slices, where=f"{path}: ")
            _check_shape(st.images.shape[2:], want_shape, path, preset.name)
            maps, scores = _predict_batches(det, st.images, st.foreground, batch_size)
            back = _unfit_2d(maps, st.meta["geometry"])  # (S, rows, cols) in slice orientation
            # slices the preset flags as nearly empty (datasets drop them from every split) get no score
            back[~np.asarray(st.keep, bool)] = 0.0
            vol_ras = np.moveaxis(np.rot90(back, k=-1, axes=(1, 2)), 0, 2)
            _, ras_aff = reorient(np.zeros(arr.shape, np.uint8), ld.affine, "RAS")
            score = float(scores[st.keep].max()) if st.keep.any() else float(scores.max())
            target = write_nifti_map(vol_ras, ld, out / f"{stem}_anomaly.nii.gz", map_affine=ras_aff)
            amap = np.asarray(__import__("nibabel").load(str(target)).dataobj, dtype=np.float32)
        else:
            pre = preset(ld)
            _check_shape(pre.image.shape[1:], want_shape, path, preset.name)
            if run_data.get("channels") is not None and pre.image.shape[0] != run_data["channels"]:
                raise PipelineError(f"{path}: {pre.image.shape[0]} channel(s) after the preset, the run expects "
                                    f"{run_data['channels']}")
            maps, scores = _predict_batches(det, pre.image[None], pre.foreground[None], 1)
            score = float(scores[0])
            if arr.ndim == 3:
                target = write_nifti_map(maps[0], ld, out / f"{stem}_anomaly.nii.gz", map_affine=pre.affine)
                amap = np.asarray(__import__("nibabel").load(str(target)).dataobj, dtype=np.float32)
            else:
                geo = pre.meta.get("geometry") or {"resized": arr.shape, "pad": (0, 0), "orig": arr.shape}
                if "geometry" not in pre.meta and tuple(maps.shape[1:]) != tuple(arr.shape):  # e.g. cxr: plain resize
                    geo = {"resized": maps.shape[1:], "pad": (0, 0), "orig": arr.shape}
                amap = _unfit_2d(maps, geo)[0]
                if fmt == "nifti":
                    write_nifti_map(amap, ld, out / f"{stem}_anomaly.nii.gz")
                target = write_png_map(amap, out / f"{stem}_anomaly.png")
        k = int(np.argmax(amap.reshape(-1, amap.shape[-1]).sum(0))) if amap.ndim == 3 else None  # the hottest slice
        save_overlay_png(_display(arr), amap, None, out / f"{stem}_overlay.png", slice_index=k,
                         title=f"{stem}: score {score:.4g}" + (f" (slice {k})" if k is not None else ""))
        written.append(Path(target))
        rows.append(f"{path},{score:.6g},{Path(target).name},{float(amap.min()):.6g},{float(amap.max()):.6g}")
    atomic_write_text(out / "scores.csv", "\n".join(rows) + "\n")
    say(f"wrote {len(written)} map(s) and scores.csv to {out}")
    return written


def _display(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1)


def _check_shape(shape: Sequence[int], want: list[int], path: Path, preset_name: str) -> None:
    if want and [int(s) for s in shape] != want:
        raise PipelineError(
            f"{path}: after the run's preset ({preset_name}) the image is {tuple(int(s) for s in shape)}, "
            f"but the run was trained on {tuple(want)}"
        )
