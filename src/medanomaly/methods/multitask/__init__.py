"""MTMLW: multi-task synthetic-anomaly U-Net with cross-validation over tasks (method ``multitask``)."""

from medanomaly.methods.multitask.detector import MultiTaskDetector
from medanomaly.methods.multitask.folds import Combination, assign_folds, select_combinations, task_combinations
from medanomaly.methods.multitask.model import MultiTaskUNet

__all__ = ["Combination", "MultiTaskDetector", "MultiTaskUNet", "assign_folds", "select_combinations", "task_combinations"]
