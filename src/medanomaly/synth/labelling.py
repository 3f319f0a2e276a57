"""Labellers: turn the intensity change of a synthetic anomaly into a per-voxel label in [0, 1].

All labellers take the change ``d`` (after - before, any shape) and the anomaly ``mask`` (same shape, bool) and return
float32 labels that are 0 outside the mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["flipped_gaussian_label", "logistic_label", "binary_label", "get_labeller", "LABELLERS", "intensity_change"]


def intensity_change(before: np.ndarray, after: np.ndarray, channels: bool) -> np.ndarray:
    """Per-voxel change; for multi-channel images (C, *S) the largest absolute change over channels, shape (1, *S)."""
    d = np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)
    if channels and d.shape[0] == 1:
        return d
    if channels:
        idx = np.abs(d).argmax(axis=0)[None]
        return np.take_along_axis(d, idx, axis=0)
    return d


def flipped_gaussian_label(d: np.ndarray, mask: np.ndarray, sigma: float = 0.2) -> np.ndarray:
    """MTMLW labeller ``y = 1 - exp(-d^2 / (2 sigma^2))``: exactly 0 where nothing changed, smooth (C1) near 0."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d = np.asarray(d, dtype=np.float32)
    y = -np.expm1(-(d * d) * np.float32(0.5 / (sigma * sigma)))
    return np.where(np.asarray(mask, dtype=bool), y, np.float32(0.0)).astype(np.float32, copy=False)


def logistic_label(d: np.ndarray, mask: np.ndarray, k: float = 22.0, x0: float = 0.1) -> np.ndarray:
    """NSA-style scaled logistic ``y = 1 / (1 + exp(-k (|d| - x0)))`` inside the mask (about 0.1 at ``d = 0``)."""
    d = np.abs(np.asarray(d, dtype=np.float64))
    y = 0.5 * (1.0 + np.tanh(0.5 * k * (d - x0)))  # numerically stable logistic
    return (y * np.asarray(mask, dtype=bool)).astype(np.float32)


def binary_label(d: np.ndarray, mask: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """1 over the mask; with ``threshold``, only where ``|d| > threshold``."""
    m = np.asarray(mask, dtype=bool)
    if threshold is not None:
        m = m & (np.abs(np.asarray(d)) > threshold)
    return m.astype(np.float32)


LABELLERS: dict[str, Callable[..., np.ndarray]] = {
    "flipped-gaussian": flipped_gaussian_label,
    "logistic": logistic_label,
    "binary": binary_label,
}


def get_labeller(name: str | Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """A labeller by name (``flipped-gaussian``, ``logistic``, ``binary``) or a callable ``f(d, mask) -> labels``."""
    if callable(name):
        return name
    try:
        return LABELLERS[name]
    except KeyError:
        raise ValueError(f"unknown labeller {name!r}; choose from {sorted(LABELLERS)}") from None
