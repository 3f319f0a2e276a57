"""``zscore``: a voxel-wise normative model, and the worked example of docs/adding_a_method.md."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"zscore": "medanomaly.methods.zscore.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {"ZScoreDetector": "medanomaly.methods.zscore.detector"})
