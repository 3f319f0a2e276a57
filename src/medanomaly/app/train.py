"""``medanomaly train``: fit a method on the healthy images of a data set and write its run folder.

The run folder (:class:`medanomaly.run_folder.RunFolder`) gets ``config.yaml`` with, beside ``method``/``params``:

- ``data``: where the training data came from and how it was preprocessed (name, split, preset record, size,
  shape, counts, and a content fingerprint of the training images); ``evaluate`` and ``predict`` read the preset
  from here, so a run is applied to new data exactly the way it was trained;
- ``train``: the seed, the config set / file and ``--set`` overrides, the training time;
- ``sources``: extra training data the method asked for (e.g. amae's unlabeled pool), as loaded.

and ``calibration.json``: the run's foreground voxel and image score quantiles on the healthy validation images (or,
recorded as such, the training images without one), for ``predict --threshold`` and ``evaluate``.

While training runs, ``request.yaml`` holds what was asked for, with the data fingerprint; ``--resume`` continues
only when it is asked exactly the same (same parameters and the same training images). Resuming is never a default.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medanomaly.app.config import resolve_config
from medanomaly.app.datasets import (
    EVALUATION_SPLITS,
    data_name,
    describe_dataset,
    load_sources,
    open_dataset,
    preprocessing_record,
)
from medanomaly.app.errors import Echo, PipelineError, check_writable_folder, make_echo
from medanomaly.app.guards import dataset_intensity_stats

__all__ = ["TrainSummary", "param_diff", "train_run"]


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


def param_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    """``": key1, a.b"``: the dotted keys where two nested parameter mappings differ ("" when equal)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            inner = param_diff(a[k], b[k], f"{prefix}{k}.")
            if inner:
                keys.append(inner.strip(": "))
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return ": " + ", ".join(keys) if keys else ""


def resume_conflict(old: dict[str, Any] | None, request: dict[str, Any], method: str) -> str:
    """What differs between the request an unfinished run was started with and this one ("" when it may resume).
    Parameters added to the method since the run started, at their defaults (the old behaviour), are no difference."""
    if old is None:
        return ""
    old = dict(old)
    if isinstance(old.get("params"), dict):
        from medanomaly.methods import get_method_class
        from medanomaly.methods.params import with_new_defaults

        defaults = json.loads(json.dumps(get_method_class(method).defaults, default=str))
        old["params"] = with_new_defaults(old["params"], request["params"], defaults)
    if old == request:
        return ""
    diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
    detail = param_diff(old.get("params", {}), request["params"]) if "params" in diff else ""
    if "data" in diff and (old.get("data") or {}).get("fingerprint") != (request.get("data") or {}).get("fingerprint"):
        detail += " (the training images differ)"
    return ", ".join(diff) + detail


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
    eval_data: Any = None,
    eval_split: str | None = None,
) -> TrainSummary:
    """Train ``method`` on the healthy images of ``data``/``split`` and save a run folder at ``out``.

    The validation set is the ``val_split`` of the same data, normal images only; ``fit`` sees both through a
    healthy-only view (no lesion mask or label). A finished run at ``out`` is refused unless ``force``; an
    unfinished one needs ``resume`` (same request, same training data) or ``force``. ``eval_data``/``eval_split``
    name the evaluation data of a benchmark: a method's extra training data may not come from there.
    """
    from medanomaly.data.fingerprint import dataset_fingerprint
    from medanomaly.methods import get_method, get_method_class
    from medanomaly.run_folder import RunFolder

    say = make_echo(quiet, echo)
    if split in EVALUATION_SPLITS:
        raise PipelineError(f"refusing to train on the '{split}' split: it is evaluation data")
    if val_split in EVALUATION_SPLITS:
        raise PipelineError(f"refusing to validate on the '{val_split}' split: it is evaluation data")
    folder = RunFolder(out)
    params, data_opts = resolve_config(method, config_set=config_set, config_file=config_file, overrides=overrides)
    preset = preset if preset is not None else data_opts.get("preset")
    size = size if size is not None else data_opts.get("size")
    max_cases = data_opts.get("max_cases")
    if seed is not None:
        params = {**params, "seed": int(seed)}
    det = get_method(method, **params)  # typed and checked before any data are read
    params = det.get_params()

    if folder.path.exists() and not folder.path.is_dir():
        raise PipelineError(f"{folder.path} exists and is not a folder")
    resumed = False
    if folder.is_finished:
        if not force:
            old = folder.read_config().get("method", "?")
            raise PipelineError(f"{folder.path} already holds a finished '{old}' run; use --force to overwrite it or "
                                "choose another --out")
        folder.clear()
    elif folder.is_started:
        if force:
            folder.clear()
        elif not resume:
            raise PipelineError(f"{folder.path} holds an unfinished run; use --resume to continue it or --force to start over")
    elif not folder.is_empty() and not force:
        raise PipelineError(f"{folder.path} is not empty and holds no medanomaly run; choose another --out or use --force")
    elif resume and not force:
        say(f"note: --resume: nothing to resume in {folder.path}; training from the start")

    check_writable_folder(folder.path)  # an unwritable --out fails now, not after the data are loaded
    say(f"loading {split} data from {data_name(data)} ...")
    train = open_dataset(data, split, normal_only=True, preset=preset, size=size, max_cases=max_cases)
    desc = describe_dataset(train)
    if desc["spatial_dims"] not in det.spatial_dims_supported:
        raise PipelineError(f"method '{method}' supports {det.spatial_dims_supported}-D images, the data are "
                            f"{desc['spatial_dims']}-D")
    val = None
    if val_split:
        try:
            val = open_dataset(data, val_split, normal_only=True, preset=preset, size=size, max_cases=max_cases)
            if len(val) == 0:
                val = None
        except (KeyError, ValueError, FileNotFoundError) as e:
            say(f"note: no '{val_split}' split ({e}); training without validation")
            val = None
    sources, sources_record = load_sources(get_method_class(method), params, eval_data=None if eval_data is None
                                           else data_name(eval_data), eval_split=eval_split, say=say)
    fingerprint = dataset_fingerprint(train)
    request = json.loads(json.dumps({
        "method": method,
        "params": params,
        "data": {"name": data_name(data), "split": split, "preset": preset, "size": size, "max_cases": max_cases,
                 "fingerprint": fingerprint,
                 "val_fingerprint": dataset_fingerprint(val) if val is not None else None},
        "sources": sources_record,
    }, default=str))

    if folder.is_started and resume and not force:
        old = folder.read_request()
        conflict = resume_conflict(old, request, method)
        if conflict:
            raise PipelineError(f"--resume: {folder.path} was started with different settings ({conflict}); "
                                "repeat the original options or use --force to start over")
        resumed = old is not None
    say(f"training '{method}' on {len(train)} healthy images" + (f", validating on {len(val)}" if val is not None else ""))

    folder.prepare()
    folder.write_request(request)
    from medanomaly.methods.base import RunContext

    t0 = time.perf_counter()
    det.fit(train, val, context=RunContext(work_dir=folder.path, resume=resume, quiet=quiet, data_fingerprint=fingerprint),
            **sources)
    seconds = time.perf_counter() - t0
    from medanomaly.app.calibrate import healthy_calibration

    # healthy-only thresholds for predict/evaluate: the validation images, else (said so) the training images
    if val is not None:
        calibration = healthy_calibration(det, val, source=f"validation split '{val_split}' (healthy images)")
    else:
        calibration = healthy_calibration(det, train, source=f"training split '{split}' (healthy images)",
                                          note="no validation split: calibrated on the training images, so thresholds "
                                               "are likely too low (training scores are optimistic)")
    say(f"calibrated on {calibration['n_images']} healthy images ({calibration['voxel']['n']} foreground voxels)")

    sections = {
        "data": {
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
            "fingerprint": fingerprint,
            # label-free: foreground intensity quantiles and what preprocessing did (guards in evaluate/predict)
            "intensity": dataset_intensity_stats(train),
            "preprocessing": preprocessing_record(train),
        },
        "train": {
            "seed": int(params["seed"]),
            "config_set": config_set,
            "config_file": str(config_file) if config_file else None,
            "overrides": json.loads(json.dumps(overrides or {}, default=str)),
            "seconds": round(seconds, 3),
            "resumed": resumed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "sources": sources_record,
    }
    det.save(folder.path, sections=sections, calibration=calibration)
    cfg = folder.read_config()
    say(f"saved run to {folder.path} ({seconds:.1f} s)")
    return TrainSummary(folder.path, method, seconds, len(train), len(val) if val is not None else 0, resumed, False, cfg)
