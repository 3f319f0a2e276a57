"""``medanomaly list``: registered methods with their config sets, built-in datasets, presets, synthetic tasks."""

from __future__ import annotations

from typing import Any

__all__ = ["list_everything"]


def list_everything() -> dict[str, Any]:
    from medanomaly.data import list_datasets
    from medanomaly.data.presets import list_presets
    from medanomaly.methods import get_method_class, list_methods
    from medanomaly.synth import list_tasks

    return {
        "methods": {m: get_method_class(m).config_sets() for m in list_methods()},
        "datasets": sorted(list_datasets()),
        "presets": sorted(list_presets()),
        "synth_tasks": sorted(list_tasks()),
    }
