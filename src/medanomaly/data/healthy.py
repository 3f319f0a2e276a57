"""The healthy-only view of a dataset that ``Detector.fit`` receives.

Training must never see a lesion mask or an image label. Rather than trusting every method to remember that, the
base class hands ``_fit`` a :class:`HealthyView`: its samples hold ``image``, ``foreground``, ``case_id`` and
``slice_index`` only, and asking for ``mask``, ``has_mask``, ``label`` or ``labels`` raises :class:`LabelAccessError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medanomaly.data.dataset import ImageDataset

__all__ = ["HEALTHY_KEYS", "HealthySample", "HealthyView", "LabelAccessError"]

#: the keys of a sample that training may read
HEALTHY_KEYS = ("image", "foreground", "case_id", "slice_index")
_LABEL_KEYS = ("mask", "has_mask", "label")


class LabelAccessError(KeyError):
    """A method read a lesion mask or label during ``fit``."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else "label access during fit"


class HealthySample(dict):
    """A sample without its labels: reading one raises :class:`LabelAccessError`."""

    def __missing__(self, key: str) -> Any:
        if key in _LABEL_KEYS:
            raise LabelAccessError(
                f"'{key}' was read during fit: training sees healthy images only (image, foreground, case_id)"
            )
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:  # dict.get bypasses __missing__
        if key in _LABEL_KEYS:
            return self.__missing__(key)
        return super().get(key, default)


class HealthyView(ImageDataset):
    """Wraps an :class:`ImageDataset`; exposes image, foreground and case id only.

    ``base`` is kept private; ``name``, ``preset`` and ``spatial_dims`` are copied so methods can describe the data.
    """

    def __init__(self, base: ImageDataset, *, where: str = "training data") -> None:
        if isinstance(base, HealthyView):
            base = base._base
        if not isinstance(base, ImageDataset):
            raise TypeError(f"{where} must be an ImageDataset, got {type(base).__name__}")
        self._base = base
        self._where = where
        self.spatial_dims, self.preset, self.name = base.spatial_dims, base.preset, base.name

    def __len__(self) -> int:
        return len(self._base)

    def get(self, i: int) -> HealthySample:
        s = self._base[i]
        return HealthySample({k: s[k] for k in HEALTHY_KEYS if k in s})

    @property
    def labels(self) -> Any:
        raise LabelAccessError(f"the labels of the {self._where} were read during fit: training sees healthy images only")

    def subset(self, indices: Sequence[int]) -> HealthyView:
        return HealthyView(self._base.subset(indices), where=self._where)

    @property
    def case_ids(self) -> list[str]:
        ids = getattr(self._base, "case_ids", None)
        if ids is not None:
            return list(ids)
        return [str(self._base[i]["case_id"]) for i in range(len(self._base))]

    def __repr__(self) -> str:
        return f"HealthyView({self.name or type(self._base).__name__}, n={len(self)})"
