"""Synthetic anomalies: seeded N-D tasks (MTMLW, CutPaste, FPI, AnatPaste, pseudo-abnormal), Poisson blending,
shapes, labellers, brush-stroke masks and an on-the-fly :class:`SynthDataset`.

>>> from medanomaly.synth import get_task
>>> res = get_task("sink")(image, foreground, rng)      # SynthResult(image, label, mask, info)
"""

from medanomaly.synth.brush import brush_mask
from medanomaly.synth.dataset import SynthDataset
from medanomaly.synth.labelling import binary_label, flipped_gaussian_label, get_labeller, logistic_label
from medanomaly.synth.poisson import poisson_blend, poisson_blend_torch
from medanomaly.synth.shapes import Shape, anomaly_count, make_shape, mtmlw_sizes, random_shape
from medanomaly.synth.tasks import TASKS, SynthResult, anatomy_mask, get_task, list_tasks, task_defaults


def pseudo_abnormal(image, foreground=None, rng=None, **params) -> SynthResult:  # noqa: ANN001
    """Georgescu's pseudo-abnormal module (see task ``pseudo-abnormal``)."""
    return get_task("pseudo-abnormal")(image, foreground, rng, **params)


def anatpaste(image, foreground=None, rng=None, **params) -> SynthResult:  # noqa: ANN001
    """AnatPaste (see task ``anatpaste``)."""
    return get_task("anatpaste")(image, foreground, rng, **params)


__all__ = [
    "TASKS",
    "Shape",
    "SynthDataset",
    "SynthResult",
    "anatomy_mask",
    "anatpaste",
    "anomaly_count",
    "binary_label",
    "brush_mask",
    "flipped_gaussian_label",
    "get_labeller",
    "get_task",
    "list_tasks",
    "logistic_label",
    "make_shape",
    "mtmlw_sizes",
    "poisson_blend",
    "poisson_blend_torch",
    "pseudo_abnormal",
    "random_shape",
    "task_defaults",
]
