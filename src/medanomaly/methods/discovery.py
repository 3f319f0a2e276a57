"""Finding methods without importing them: the registry's index, and lazy package exports.

Every sub-package of :mod:`medanomaly.methods` declares, in its ``__init__.py``, ``METHODS = {name: module}``:
the registry names it provides and the module whose import registers each (``@register``). Its ``__init__``
imports nothing heavy; its public classes are exported lazily (:func:`lazy_exports`). So listing the methods costs
a few small imports, and loading one run imports that method's module only. Third-party packages add methods with
an entry point in the group ``medanomaly.methods`` (``name = "package.module"``).

A package that fails to import, or declares no ``METHODS``, is an error naming it, never a silent absence.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "MethodDiscoveryError", "lazy_exports", "method_index"]

ENTRY_POINT_GROUP = "medanomaly.methods"
_INDEX: dict[str, str] | None = None


class MethodDiscoveryError(ImportError):
    """A method package is broken: it fails to import, declares no METHODS, or names a method twice."""


def _scan() -> dict[str, str]:
    import importlib.metadata as md
    import sys

    # the parent package, initialised by the time the registry is asked (methods/__init__ imports base, which
    # imports this module lazily): read from sys.modules rather than imported, so there is no import cycle
    pkg = sys.modules[__package__ or "medanomaly.methods"]

    index: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        name = f"{pkg.__name__}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the package's name
            raise MethodDiscoveryError(f"method package {name} failed to import: {type(e).__name__}: {e}") from e
        methods = getattr(mod, "METHODS", None)
        if not isinstance(methods, dict) or not methods:
            raise MethodDiscoveryError(f"method package {name} declares no METHODS = {{name: module}} in its __init__.py")
        for method, module in methods.items():
            if method in index:
                raise MethodDiscoveryError(f"method '{method}' is declared by both {index[method]} and {module}")
            index[str(method)] = str(module)
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in index:
            raise MethodDiscoveryError(f"entry point '{ep.name}' ({ep.value}) clashes with the built-in method of that name")
        index[ep.name] = ep.value.split(":")[0]
    return index


def method_index(refresh: bool = False) -> dict[str, str]:
    """``{method name: module that registers it}`` for every discoverable method (cached)."""
    global _INDEX
    if _INDEX is None or refresh:
        _INDEX = _scan()
    return dict(_INDEX)


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in sub-modules imported on first use.

    ``names``: ``{public name: module}``; ``from package import Name`` imports ``module`` then.
    """

    def __getattr__(attr: str) -> Any:
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(module), attr)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
