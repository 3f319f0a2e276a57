"""MAE + pseudo-abnormal module + residual classifier (seed paper 003, Georgescu)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"mae-pseudo": "medanomaly.methods.mae_pseudo.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "MAEPseudo": "medanomaly.methods.mae_pseudo.detector",
    "ResidualClassifier": "medanomaly.methods.mae_pseudo.detector",
})
