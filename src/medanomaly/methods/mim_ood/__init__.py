"""MIM-OOD: generative masked image modelling for out-of-distribution detection (registers ``mim-ood``)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"mim-ood": "medanomaly.methods.mim_ood.method"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "MIMOOD": "medanomaly.methods.mim_ood.method",
})
