"""AMAE (seed paper 002): pre-trained MAE + AnatPaste proxy head (stage 1) + dual-distribution adaptation (stage 2)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"amae": "medanomaly.methods.amae.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "AMAE": "medanomaly.methods.amae.detector",
    "MLPHead": "medanomaly.methods.amae.detector",
    "pseudo_label": "medanomaly.methods.amae.detector",
})
