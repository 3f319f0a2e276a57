"""A content fingerprint of a data set: did a cached result see exactly these images?

:func:`dataset_fingerprint` hashes (sha256), in order, every item's case id, image (bytes, shape, dtype) and
foreground (same, or its absence). Labels and lesion masks are not read. Equal fingerprints mean the same images
in the same order; any changed pixel, case id, shape, dtype or order gives another fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Fingerprinter", "dataset_fingerprint"]

_VERSION = b"medanomaly-data-fingerprint-v1\n"


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x))


class Fingerprinter:
    """Incremental :func:`dataset_fingerprint`: ``add`` the items in order, then ``hexdigest``."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(_VERSION)
        self.count = 0

    def _field(self, tag: str, value: Any) -> None:
        if value is None:
            self._h.update(f"{tag}:none\n".encode())
            return
        a = _as_array(value)
        self._h.update(f"{tag}:{a.dtype.str}:{a.shape}:{a.nbytes}\n".encode())
        self._h.update(a.reshape(-1).view(np.uint8))

    def add(self, case_id: Any, image: Any, foreground: Any = None) -> None:
        """Add one item (``case_id`` None when the data set has none)."""
        cid = b"\x00none" if case_id is None else str(case_id).encode("utf-8")
        self._h.update(f"item:{self.count}:{len(cid)}\n".encode() + cid)
        self._field("image", image)
        self._field("foreground", foreground)
        self.count += 1

    def add_item(self, item: Mapping[str, Any]) -> None:
        """Add a data-set item (a dict with ``image`` and optionally ``foreground``/``case_id``)."""
        if "image" not in item:
            raise KeyError(f"data fingerprint: item {self.count} has no 'image' (keys: {sorted(item)})")
        self.add(item.get("case_id"), item["image"], item.get("foreground"))

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(f"count:{self.count}\n".encode())
        return h.hexdigest()


def dataset_fingerprint(ds: Any) -> str:
    """sha256 (hex) over the case ids and content (image and foreground bytes, shape, dtype) of every item of ``ds``.

    ``ds``: ``len(ds)`` and ``ds[i]`` -> dict with ``image`` [, ``foreground``, ``case_id``] (an ImageDataset).
    """
    fp = Fingerprinter()
    for i in range(len(ds)):
        fp.add_item(ds[i])
    return fp.hexdigest()
