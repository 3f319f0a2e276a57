"""Anomaly detectors: one contract (:mod:`medanomaly.methods.base`) and one registry.

Importing this package imports every method sub-package so that each registers itself.
"""

from __future__ import annotations

import importlib

from medanomaly.methods.base import (
    AnomalyResult,
    Detector,
    RunFolderError,
    get_method,
    get_method_class,
    list_methods,
    load_detector,
    register,
)

__all__ = [
    "AnomalyResult",
    "Detector",
    "RunFolderError",
    "get_method",
    "get_method_class",
    "list_methods",
    "load_detector",
    "register",
]

# Each entry is a sub-package that registers one or more methods when imported.
_METHOD_PACKAGES = ("baselines", "mim_ood", "ar_restoration", "token_critic", "multitask", "mae", "amae", "mae_pseudo")

for _pkg in _METHOD_PACKAGES:
    try:
        importlib.import_module(f"{__name__}.{_pkg}")
    except ModuleNotFoundError as _e:  # a method package not written yet
        if _e.name != f"{__name__}.{_pkg}":
            raise
