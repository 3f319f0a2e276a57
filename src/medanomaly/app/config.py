"""Resolving a method's parameters: defaults < config set < config file < ``--set`` overrides.

Files are read by the one reader, :mod:`medanomaly.param_files`; values are typed and checked when the detector is
constructed (the method's parameter schema), before any data is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medanomaly.app.errors import PipelineError

__all__ = ["parse_overrides", "resolve_config", "resolve_params"]


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["a.b=3", "name=foo"]`` -> ``{"a.b": 3, "name": "foo"}``; values are parsed as YAML scalars (no aliases)."""
    from medanomaly.yamlsafe import load_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PipelineError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise PipelineError(f"--set expects key=value, got '{item}' (empty key)")
        try:
            out[key] = load_yaml(raw, where=f"--set {key}") if raw.strip() else ""
        except ValueError as e:
            raise PipelineError(f"--set {key}: value '{raw}' is not a valid YAML value ({e})") from e
    return out


def resolve_config(
    method: str,
    *,
    config_set: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters, data options): method defaults < config set < config file < overrides.

    Unknown parameter keys raise a ``KeyError`` naming them; ``data.size=64`` etc. in overrides set data options.
    The parameters are validated against the method's schema (a bad value fails here, before data are read).
    """
    from medanomaly.methods import get_method_class
    from medanomaly.methods.base import merge_params
    from medanomaly.param_files import DATA_KEYS, ParamFileError, read_param_file

    cls = get_method_class(method)
    params, data = dict(cls.defaults), {}
    try:
        if config_set:
            params = merge_params(params, cls.config_set(config_set), where=f"{method} config set '{config_set}'")
        if config_file:
            res = read_param_file(config_file, method)
            if res is None:
                raise PipelineError(f"config file {config_file} has no section for method '{method}' under 'methods:'")
            params = merge_params(params, res[0], where=f"config file {config_file}")
            data.update(res[1])
    except ParamFileError as e:
        raise PipelineError(str(e)) from None
    if overrides:
        ov = dict(overrides)
        dkeys = [k for k in ov if k.startswith("data.")]
        for k in dkeys:
            sub = k[5:]
            if sub not in DATA_KEYS:
                raise PipelineError(f"--set {k}: unknown data option; valid: {', '.join(DATA_KEYS)}")
            data[sub] = ov.pop(k)
        params = merge_params(params, ov, where=f"{method} --set")
    cls(**params)  # typed validation now, before any data is read
    return params, data


def resolve_params(method: str, **kw: Any) -> dict[str, Any]:
    """The method parameters of :func:`resolve_config`."""
    return resolve_config(method, **kw)[0]
