"""MTMLW: multi-task synthetic-anomaly U-Net with cross-validation over tasks (method ``multitask``)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"multitask": "medanomaly.methods.multitask.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "MultiTaskDetector": "medanomaly.methods.multitask.detector",
    "Combination": "medanomaly.methods.multitask.folds",
    "assign_folds": "medanomaly.methods.multitask.folds",
    "select_combinations": "medanomaly.methods.multitask.folds",
    "task_combinations": "medanomaly.methods.multitask.folds",
    "MultiTaskUNet": "medanomaly.methods.multitask.model",
})
