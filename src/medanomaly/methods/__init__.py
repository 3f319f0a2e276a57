"""Anomaly detectors: one contract (:mod:`medanomaly.methods.base`) and one registry.

Methods are found by discovery (:mod:`medanomaly.methods.discovery`): each sub-package declares the names it
registers; a method's module is imported when the method is first asked for, so loading one run imports one method.
"""

from __future__ import annotations

from medanomaly.methods.base import (
    AnomalyResult,
    Detector,
    RunContext,
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
    "RunContext",
    "RunFolderError",
    "get_method",
    "get_method_class",
    "list_methods",
    "load_detector",
    "register",
]
