"""Auto-regressive latent restoration baseline (registers ``ar-restoration``)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"ar-restoration": "medanomaly.methods.ar_restoration.method"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ARRestoration": "medanomaly.methods.ar_restoration.method",
})
