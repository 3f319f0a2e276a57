"""Writing helpers shared by the report page and the comparison table: JSON-safe values, number formatting,
atomic file writes, the page style."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_safe", "format_value", "is_number", "atomic_write", "REPORT_CSS"]


def json_safe(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, nan/inf to None, tensors to lists, paths to str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def format_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if not math.isfinite(x):
            return "n/a"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"
        return f"{x:.3e}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) atomically with the package's one atomic writer (a reader never sees half a
    file; ordinary permissions, since a report is for people)."""
    from medanomaly.training.atomic import atomic_write_bytes

    atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


REPORT_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3;font-weight:600}td{font-family:ui-monospace,monospace}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#666;font-size:.9em}.note{color:#555;font-size:.9em}"""
