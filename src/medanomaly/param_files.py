"""The one reader of parameter files: shipped config sets, ``--config`` files and run configs alike.

A parameter file is a YAML mapping in one of three forms, told apart by explicit keys only (never by guessing
whether a key is a method name or a parameter):

1. a run's ``config.yaml``: ``{method: NAME, params: {...}, data: {...}, ...}``: the params, and the ``data``
   section's load options; ``method`` must be the method asked for;
2. one section per method, for a folder holding several methods: ``{methods: {NAME: {...}, OTHER: {...}}}``: the
   section of the method asked for (None when there is none);
3. plain parameters: ``{key: value, ...}``, with an optional ``data`` section of load options.

Data options (``size``, ``preset``, ``max_cases``) say how to load the data these parameters were made for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DATA_KEYS", "ParamFileError", "read_param_file", "split_param_mapping"]

DATA_KEYS = ("size", "preset", "max_cases")
#: keys that mark a form; a method may not use them as parameter names
RESERVED = ("method", "methods", "params", "data")


class ParamFileError(ValueError):
    """A parameter file is unreadable or has the wrong shape."""


def _data_opts(data: Any, where: str) -> dict[str, Any]:
    if not data:
        return {}
    if not isinstance(data, dict):
        raise ParamFileError(f"{where}: 'data' must be a mapping ({', '.join(DATA_KEYS)})")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ParamFileError(f"{where}: unknown data option(s) {unknown}; valid: {', '.join(DATA_KEYS)}")
    return {k: v for k, v in data.items() if v is not None}


def split_param_mapping(cfg: Any, method: str, where: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A parameter mapping -> (method parameters, data options); None for a form-2 file without ``method``."""
    if cfg is None:
        return {}, {}
    if not isinstance(cfg, dict):
        raise ParamFileError(f"{where} must hold a mapping of parameters, got {type(cfg).__name__}")
    if "methods" in cfg:
        extra = sorted(set(cfg) - {"methods"})
        if extra:
            raise ParamFileError(f"{where}: a file with a 'methods' section holds nothing else (found {extra})")
        sections = cfg["methods"]
        if not isinstance(sections, dict):
            raise ParamFileError(f"{where}: 'methods' must map method names to parameter mappings")
        if method not in sections:
            return None
        return split_param_mapping(sections[method] or {}, method, f"{where} [methods.{method}]")
    if "params" in cfg or "method" in cfg:
        if cfg.get("method", method) != method:
            raise ParamFileError(f"{where} is for method '{cfg['method']}', not '{method}'")
        params = cfg.get("params") or {}
        if not isinstance(params, dict):
            raise ParamFileError(f"{where}: 'params' must be a mapping")
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        return dict(params), _data_opts({k: data[k] for k in DATA_KEYS if k in data}, where)
    cfg = dict(cfg)
    data = cfg.pop("data", None)
    return cfg, _data_opts(data, where)


def read_param_file(path: str | Path, method: str, where: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Read ``path`` (safe YAML: size limit, no aliases) and split it as :func:`split_param_mapping` does."""
    from medanomaly.yamlsafe import load_yaml

    path = Path(path)
    name = where or f"config file {path}"
    if not path.is_file():
        raise ParamFileError(f"{name} does not exist")
    try:
        data = load_yaml(path, where=name)
    except ValueError as e:
        raise ParamFileError(str(e)) from None
    return split_param_mapping(data, method, name)
