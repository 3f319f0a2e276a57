"""Token-level metrics: lesion masks downsampled to token grids, AP/AUROC of token scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medanomaly.evaluation._checks import check_binary, check_scores, squeeze_channel, to_numpy
from medanomaly.evaluation.metrics import exact_binary_metrics

__all__ = ["token_labels", "token_metrics"]


def _factor_tuple(factor: int | Sequence[int], nd: int) -> tuple[int, ...]:
    f = (int(factor),) * nd if np.isscalar(factor) else tuple(int(x) for x in factor)
    if len(f) != nd or min(f) < 1:
        raise ValueError(f"factor must be a positive int or {nd} positive ints, got {factor}")
    return f


def _block_fraction(a: np.ndarray, f: tuple[int, ...]) -> np.ndarray:
    """Fraction of True voxels in each f-block: (N, *S) -> (N, *S/f)."""
    n, sp = a.shape[0], a.shape[1:]
    for d, (s, k) in enumerate(zip(sp, f, strict=True)):
        if s % k:
            raise ValueError(f"mask size {s} along spatial axis {d} is not a multiple of the token factor {k}")
    shape = [n]
    for s, k in zip(sp, f, strict=True):
        shape += [s // k, k]
    axes = tuple(range(2, 2 * len(sp) + 1, 2))
    return a.reshape(shape).mean(axis=axes, dtype=np.float64)


def token_labels(masks: Any, factor: int | Sequence[int], min_fraction: float = 0.0) -> np.ndarray:
    """Lesion masks (N, *S) downsampled to token grids (N, *S/factor) as bool.

    A token is anomalous when the fraction of its pixels inside the lesion is > 0 (``min_fraction=0``, the default:
    any lesion pixel, i.e. max-pooling) or >= ``min_fraction`` otherwise (``0.5``: majority).
    """
    m = check_binary(squeeze_channel(to_numpy(masks, "masks")), "masks")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    frac = _block_fraction(m, _factor_tuple(factor, m.ndim - 1))
    return frac > 0 if min_fraction == 0 else frac >= min_fraction


def token_metrics(
    token_scores: Any,
    masks: Any,
    factor: int | Sequence[int],
    min_fraction: float = 0.0,
    foreground: Any = None,
) -> dict[str, float | int]:
    """AP/AUROC of token scores (N, h, w[, d]) against lesion masks (N, H, W[, D]) downsampled by ``factor``.

    Token labels as in :func:`token_labels`. With ``foreground`` (pixel resolution) only tokens containing at least
    one foreground pixel are evaluated. Returns ``ap``, ``auroc``, ``n_tokens``, ``n_pos``.
    """
    t = check_scores(squeeze_channel(to_numpy(token_scores, "token_scores")), "token_scores")
    m = squeeze_channel(to_numpy(masks, "masks"))
    if t.ndim != m.ndim or t.shape[0] != m.shape[0]:
        raise ValueError(f"token_scores shape {t.shape} and masks shape {m.shape} do not correspond")
    f = _factor_tuple(factor, m.ndim - 1)
    expect = tuple(s * k for s, k in zip(t.shape[1:], f, strict=True))
    if expect != m.shape[1:]:
        raise ValueError(f"token grid {t.shape[1:]} x factor {f} = {expect} does not match the mask size {m.shape[1:]}")
    y = token_labels(m, f, min_fraction)
    keep = np.ones_like(y, dtype=bool)
    if foreground is not None:
        fg = check_binary(squeeze_channel(to_numpy(foreground, "foreground")), "foreground")
        if fg.shape != m.shape:
            raise ValueError(f"foreground shape {fg.shape} does not match masks shape {m.shape}")
        keep = _block_fraction(fg, f) > 0
        if not keep.any():
            raise ValueError("foreground is empty: no token to evaluate")
    r = exact_binary_metrics(t[keep], y[keep], "token_metrics")
    return {"ap": r["ap"], "auroc": r["auroc"], "n_tokens": int(keep.sum()), "n_pos": int(y[keep].sum())}
