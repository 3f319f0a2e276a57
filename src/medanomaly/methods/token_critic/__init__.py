"""MVTM + Token Critic restoration baseline (registers ``token-critic``)."""

from medanomaly.methods.discovery import lazy_exports

#: the methods this package registers, and the module whose import registers each (see methods/discovery.py)
METHODS = {"token-critic": "medanomaly.methods.token_critic.method"}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "TokenCritic": "medanomaly.methods.token_critic.method",
})
