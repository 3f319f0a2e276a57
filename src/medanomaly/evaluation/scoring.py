"""The one rule that turns a voxel-wise anomaly map into one image (or volume) score, for every method.

Parameters (the ``image_score`` section of every method's parameters, :data:`IMAGE_SCORE_DEFAULTS`):

- ``reduce``: ``max``, ``mean`` or ``topk`` over the image's foreground voxels;
- ``fraction`` in (0, 1]: ``topk`` is the mean of the ``max(1, ceil(fraction * n))`` highest foreground voxels,
  ``n`` the image's foreground voxel count (``fraction * n`` is rounded to 6 decimals first, so that floating
  error such as ``0.07 * 100 = 7.000000000000001`` does not add a voxel). ``fraction: 1`` is the mean.

An image whose foreground is empty (or no foreground given) uses all its voxels; empty foregrounds raise one
:class:`~medanomaly.evaluation.metrics.MetricWarning` naming how many images. NaN or infinite maps are an error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from medanomaly.evaluation.metrics import MetricWarning

__all__ = ["IMAGE_SCORE_DEFAULTS", "REDUCTIONS", "check_image_score", "image_scores"]

REDUCTIONS = ("max", "mean", "topk")

#: the default ``image_score`` section; every method declares this section (with its own choice of values)
IMAGE_SCORE_DEFAULTS: dict[str, Any] = {"reduce": "topk", "fraction": 0.01}


def _check_values(reduce: Any, fraction: Any, where: str) -> tuple[str, float]:
    if reduce not in REDUCTIONS:
        raise ValueError(f"{where}image_score.reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
        raise ValueError(f"{where}image_score.fraction must be a number in (0, 1], got {fraction!r}")
    return str(reduce), float(fraction)


def check_image_score(params: Any, where: str = "") -> tuple[str, float]:
    """Check an ``image_score`` section ``{reduce, fraction}``; returns ``(reduce, fraction)``.

    ``where`` (e.g. the method name) prefixes the one-line ``ValueError``.
    """
    pre = f"{where}: " if where else ""
    if not isinstance(params, Mapping):
        raise ValueError(f"{pre}image_score must be a mapping {{reduce: max | mean | topk, fraction: (0, 1]}}, got {params!r}")
    extra = sorted(set(params) - set(IMAGE_SCORE_DEFAULTS))
    missing = sorted(set(IMAGE_SCORE_DEFAULTS) - set(params))
    if extra or missing:
        raise ValueError(f"{pre}image_score must have exactly the keys reduce and fraction; "
                         f"unknown {extra or 'none'}, missing {missing or 'none'}")
    return _check_values(params["reduce"], params["fraction"], pre)


def image_scores(
    maps: torch.Tensor,
    foreground: torch.Tensor | None = None,
    reduce: str = "topk",
    fraction: float = 0.01,
) -> torch.Tensor:
    """One score per image: ``reduce`` of each map over its foreground (module docstring).

    Args:
        maps: (B, *spatial) or (B, 1, *spatial) anomaly maps, higher = more anomalous.
        foreground: bool/0-1 tensor with B * (voxels per image) elements, e.g. (B, *S) or (B, 1, *S); None: all voxels.
        reduce, fraction: the rule.

    Returns:
        (B,) tensor on ``maps``' device, float32 (float64 for float64 maps). Batched, no Python loop over images.
    """
    reduce, fraction = _check_values(reduce, fraction, "")
    if not isinstance(maps, torch.Tensor):
        raise ValueError(f"image_scores: maps must be a torch tensor, got {type(maps).__name__}")
    if maps.ndim < 2 or maps.shape[0] == 0 or maps[0].numel() == 0:
        raise ValueError(f"image_scores: maps must be (B, *spatial) with B >= 1 and voxels, got shape {tuple(maps.shape)}")
    out_dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    work = torch.float32 if maps.device.type == "mps" else torch.float64
    b = maps.shape[0]
    flat = maps.detach().reshape(b, -1)
    if not flat.is_floating_point():
        flat = flat.to(work)
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        n_nan = int(torch.isnan(flat).sum())
        raise ValueError(f"image_scores: maps contain {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values "
                         f"(shape {tuple(maps.shape)})")
    if foreground is None:
        fg = torch.ones_like(flat, dtype=torch.bool)
    else:
        if not isinstance(foreground, torch.Tensor):
            raise ValueError(f"image_scores: foreground must be a torch tensor or None, got {type(foreground).__name__}")
        if foreground.numel() != flat.numel() or foreground.shape[0] != b:
            raise ValueError(f"image_scores: foreground shape {tuple(foreground.shape)} does not match maps shape "
                             f"{tuple(maps.shape)}")
        fg = foreground.detach().reshape(b, -1).to(device=flat.device)
        if fg.dtype != torch.bool:
            if bool(((fg != 0) & (fg != 1)).any()):
                raise ValueError("image_scores: foreground must be binary (bool or 0/1)")
            fg = fg != 0
        empty = ~fg.any(1)
        if bool(empty.any()):
            n_empty = int(empty.sum())
            warnings.warn(f"image_scores: {n_empty} of {b} image(s) have an empty foreground; their score uses all voxels",
                          MetricWarning, stacklevel=2)
            fg = fg | empty[:, None]
    n = fg.sum(1)
    if reduce == "max":
        low = torch.finfo(flat.dtype).min
        return flat.masked_fill(~fg, low).amax(1).to(out_dtype)
    vals = flat.to(work)
    if reduce == "mean":
        return (vals.masked_fill(~fg, 0.0).sum(1) / n.to(work)).to(out_dtype)
    n_cpu = n.cpu()
    k = torch.ceil(torch.round(n_cpu.to(torch.float64) * fraction, decimals=6)).clamp(min=1).to(torch.int64)
    k = torch.minimum(k, n_cpu)
    k_max = int(k.max())
    k = k.to(flat.device)
    top = vals.masked_fill(~fg, -math.inf).topk(k_max, dim=1, sorted=True).values  # (B, k_max), descending
    csum = top.masked_fill(torch.arange(k_max, device=top.device)[None] >= k[:, None], 0.0).sum(1)
    return (csum / k.to(work)).to(out_dtype)
