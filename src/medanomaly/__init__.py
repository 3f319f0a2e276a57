"""medanomaly: unsupervised anomaly detection and localisation in medical images."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "get_method", "list_methods"]


def get_method(name: str, **params):  # noqa: ANN201 - thin re-export
    """Build a registered detector by name (see :func:`medanomaly.methods.get_method`)."""
    from medanomaly.methods import get_method as _get

    return _get(name, **params)


def list_methods() -> list[str]:
    """Names of all registered detectors."""
    from medanomaly.methods import list_methods as _list

    return _list()
