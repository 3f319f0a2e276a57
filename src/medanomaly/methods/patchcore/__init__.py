"""``patchcore``: PatchCore (Roth et al. 2022) on the features of a self-supervised convolutional encoder."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"patchcore": "medanomaly.methods.patchcore.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PatchCoreDetector": "medanomaly.methods.patchcore.detector",
    "greedy_coreset": "medanomaly.methods.patchcore.detector",
})
