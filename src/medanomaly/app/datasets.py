"""Opening data for the commands: built-in names, manifests or in-memory datasets, and the extra training data a
method asks for (its :meth:`~medanomaly.methods.base.Detector.data_sources`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medanomaly.app.errors import PipelineError

__all__ = ["EVALUATION_SPLITS", "data_name", "describe_dataset", "load_sources", "open_dataset", "preprocessing_record",
           "preset_config"]

#: splits that hold evaluation data: never used for training, model selection or thresholds
EVALUATION_SPLITS = ("test",)


def open_dataset(
    data: Any,
    split: str,
    *,
    normal_only: bool = False,
    preset: str | None = None,
    size: Any = None,
    preset_config: dict[str, Any] | None = None,
    max_cases: int | None = None,
    preset_override: str | None = None,
    foreground: str | None = None,
    lesion_labels: Any = None,
) -> Any:
    """``data`` is a built-in name, a manifest path (options as ``x.csv:view=slices``) or an :class:`ImageDataset`
    (used as given).

    ``preset_config`` (a preset's full ``{"name", **params}`` record, as a run stores it) wins over
    ``preset``/``size``: data are then preprocessed exactly as the run's training data were. The user's overrides
    (``--preset``, ``--foreground``) change that record: ``preset_override`` keeps the recorded parameters the other
    preset knows (e.g. ``size``), ``foreground`` sets ``head|brain|mask|all``. ``lesion_labels`` (manifests):
    which labels of a multi-class lesion mask are lesion (``"1,2,4"`` or ``">0"``).
    """
    from medanomaly.data.dataset import ImageDataset

    if isinstance(data, ImageDataset):
        if preset_override or foreground or lesion_labels is not None:
            raise PipelineError("--preset, --foreground and --lesion-labels need data given by name or manifest")
        return data
    from medanomaly.data import load_dataset
    from medanomaly.data.presets import PRESETS, get_preset

    kw: dict[str, Any] = {}
    if preset_override and preset_override not in PRESETS:
        raise PipelineError(f"unknown preset {preset_override!r}; available: {', '.join(sorted(PRESETS))}")
    try:
        if preset_config:
            pc = dict(preset_config)
            name = pc.pop("name")
            if preset_override and preset_override != name:
                pc = {k: v for k, v in pc.items() if k in PRESETS[preset_override].defaults}
                name = preset_override
            if foreground:
                pc["foreground"] = foreground
            kw["preset"] = get_preset(name, **pc)
        else:
            if preset or preset_override:
                kw["preset"] = preset_override or preset
            if size is not None:
                kw["size"] = size
            if foreground:
                if "foreground" not in PRESETS[kw.get("preset") or _default_preset(data)].defaults:
                    raise PipelineError(f"--foreground: the preset {kw.get('preset') or _default_preset(data)} has no "
                                        "foreground choice")
                kw["foreground"] = foreground
    except ValueError as e:
        if isinstance(e, PipelineError):
            raise
        raise PipelineError(str(e)) from None
    if max_cases:
        kw["max_cases"] = int(max_cases)
    if lesion_labels is not None:
        from medanomaly.data.samples import parse_data_spec

        if Path(parse_data_spec(str(data))[0]).suffix.lower() not in (".csv", ".json"):
            raise PipelineError(f"--lesion-labels applies to manifests (a .csv/.json with a mask column), not to {data}")
        kw["lesion_labels"] = lesion_labels
    return load_dataset(str(data), split=split, normal_only=normal_only, **kw)


def _default_preset(data: Any) -> str:
    """The preset a dataset uses when none is given (for option checks only)."""
    from medanomaly.data.samples import parse_data_spec

    name = parse_data_spec(str(data))[0]
    return "cxr" if name in ("pneumoniamnist", "cxr-kermany-256") else "brain-mri-2d"


def preset_config(ds: Any) -> dict[str, Any] | None:
    """The full preset record of a dataset built by the data layer (None for in-memory datasets)."""
    obj = getattr(ds, "preset_obj", None)
    if obj is not None and hasattr(obj, "config"):
        return dict(obj.config)
    if hasattr(ds, "geometry"):
        rec = ds.geometry(0).get("preset") if len(ds) else None
        if isinstance(rec, dict) and "name" in rec:
            return dict(rec)
    return None


def preprocessing_record(ds: Any) -> dict[str, Any]:
    """What preprocessing did to a dataset's cases: the preset actually used (name and parameters) and the summary of
    its per-case records (foreground kind and source, skull-stripped cases, head coverage, dropped slices)."""
    from medanomaly.app.guards import summarise_records

    out: dict[str, Any] = {"preset": preset_config(ds)}
    recs = getattr(ds, "prep_records", None)
    if isinstance(recs, dict):
        out.update(summarise_records(recs))
    return out


def data_name(data: Any) -> str:
    """How a run records its data: the dataset's name, a manifest's absolute path, or a built-in spec."""
    from medanomaly.data.dataset import ImageDataset

    if isinstance(data, ImageDataset):
        return data.name or "in-memory"
    from medanomaly.data.samples import parse_data_spec

    text = str(data)
    try:
        name = parse_data_spec(text)[0]
    except ValueError:
        name = text
    if name != text and Path(name).suffix.lower() in (".csv", ".json"):  # a manifest with options
        return f"{Path(name).resolve()}{text[len(name):]}"
    p = Path(text)
    return str(p.resolve()) if p.suffix or p.exists() else text


def describe_dataset(ds: Any) -> dict[str, Any]:
    """Dimensionality, channels, image shape and preset of a (non-empty) dataset."""
    if len(ds) == 0:
        raise PipelineError(f"dataset '{getattr(ds, 'name', '?')}' is empty")
    img = ds[0]["image"]
    return {
        "spatial_dims": int(img.ndim - 1),
        "channels": int(img.shape[0]),
        "image_shape": [int(s) for s in img.shape[1:]],
        "preset": getattr(ds, "preset", "") or None,
        "preset_config": preset_config(ds),
    }


def _same_data(a: str, b: str) -> bool:
    from medanomaly.data.samples import parse_data_spec

    try:
        return parse_data_spec(a)[0] == parse_data_spec(b)[0]
    except (ValueError, KeyError):
        return a == b


def load_sources(
    cls: Any, params: dict[str, Any], *, eval_data: str | None = None, eval_split: str | None = None,
    say: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the extra training data ``cls.data_sources(params)`` asks for: (datasets by keyword, their record).

    Refuses an evaluation split (``test``, or ``eval_split`` of ``eval_data``): a method's extra data (an unlabeled
    pool, another data set to blend from) is training data. An ``optional`` source that cannot be loaded is passed
    as None and recorded so.
    """
    out: dict[str, Any] = {}
    record: dict[str, Any] = {}
    for kw, req in cls.data_sources(params).items():
        req = dict(req)
        name, split = str(req.pop("data")), str(req.pop("split", "train"))
        optional = bool(req.pop("optional", False))
        normal_only = bool(req.pop("normal_only", True))
        if split in EVALUATION_SPLITS or (eval_data is not None and split == eval_split and _same_data(name, eval_data)):
            raise PipelineError(f"{cls.name}: its '{kw}' data would be the '{split}' split of {name}, which is evaluation "
                                "data; choose another split (e.g. train)")
        try:
            ds = open_dataset(name, split, normal_only=normal_only, size=req.pop("size", None))
        except Exception as e:  # data missing or unreadable
            if not optional:
                raise PipelineError(f"{cls.name}: cannot load its '{kw}' data {name} ({split}): {e}") from e
            if say is not None:
                say(f"note: {cls.name}'s optional '{kw}' data {name} is not available ({e}); going without it")
            out[kw] = None
            record[kw] = {"data": name, "split": split, "loaded": False, "reason": str(e)[:200]}
            continue
        out[kw] = ds
        record[kw] = {"data": data_name(name), "split": split, "normal_only": normal_only, "n": len(ds), "loaded": True}
    return out, record
