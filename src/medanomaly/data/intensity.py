"""Intensity normalisation: percentile clip to [0, 1] (brain MRI) and histogram equalisation (chest X-ray).

Both are pointwise maps of the intensities, so they need no inverse for anomaly maps (maps live on the geometry,
see :mod:`medanomaly.data.geometry`). The DICOM window is :func:`medanomaly.data.io.apply_window`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalise_intensity", "equalize_histogram"]


def normalise_intensity(arr: np.ndarray, foreground: np.ndarray, clip_percentile: float = 98.0,
                        zero_background: bool = True, low: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Scale to [0, 1]: ``(x - low) / (P_clip(foreground) - low)``, clipped (``low``: default the array's minimum;
    presets pass the brain's own floor for skull-stripped scans whose background is not the minimum); with
    ``zero_background`` everything outside the foreground is exactly 0. Returns the array and the two bounds."""
    a = np.asarray(arr, dtype=np.float32)
    vals = a[foreground] if foreground.any() else a.ravel()
    lo = float(a.min()) if low is None else float(low)
    hi = float(np.percentile(vals, clip_percentile))
    if hi <= lo:
        hi = float(vals.max()) if vals.max() > lo else lo + 1.0
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    if zero_background:
        out = np.where(foreground, out, 0.0)
    return out.astype(np.float32), {"low": lo, "high": hi}


def equalize_histogram(arr: np.ndarray, max_levels: int = 4096) -> np.ndarray:
    """Histogram equalisation to [0, 1]: each value maps to its empirical CDF (exact by rank for up to
    ``max_levels`` distinct values, binned otherwise), rescaled so the lowest value maps to 0."""
    a = np.asarray(arr, dtype=np.float64)
    vals, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    if vals.size == 1:
        return np.zeros(a.shape, np.float32)
    if vals.size <= max_levels:
        cdf = np.cumsum(counts) / a.size
        mapped = cdf[inv.reshape(a.shape)]
    else:
        hist, edges = np.histogram(a, bins=max_levels)
        cdf = np.cumsum(hist) / a.size
        mapped = np.interp(a, edges[1:], cdf)
    c0 = cdf[0]
    return ((mapped - c0) / max(1.0 - c0, 1e-12)).clip(0, 1).astype(np.float32)
