"""The masked-autoencoder family's shared parts and the plain ``mae`` reconstruction detector."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"mae": "medanomaly.methods.mae.detector"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "MAEDetector": "medanomaly.methods.mae.detector",
})
