"""Small helpers shared by the baselines: map smoothing, foreground handling, image-score reduction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SCORES", "foreground_or_ones", "image_scores", "min_avg_smooth", "check_image_score"]

IMAGE_SCORES = ("max", "mean", "topk")


def check_image_score(where: str, how: str, k: float) -> None:
    if how not in IMAGE_SCORES:
        raise ValueError(f"{where}: image_score must be one of {IMAGE_SCORES}, got '{how}'")
    if not 0 < float(k) <= 1:
        raise ValueError(f"{where}: topk_fraction must be in (0, 1], got {k}")


def foreground_or_ones(images: torch.Tensor, foreground: torch.Tensor | None) -> torch.Tensor:
    """(B, *S) bool foreground; everything when None."""
    if foreground is None:
        return torch.ones((images.shape[0], *images.shape[2:]), dtype=torch.bool, device=images.device)
    return foreground[:, 0].to(device=images.device, dtype=torch.bool)


def min_avg_smooth(maps: torch.Tensor, min_size: int, avg_size: int) -> torch.Tensor:
    """Min filter (removes thin isolated residuals, e.g. along edges) then box average; (B, *S) -> (B, *S).

    Uses ``medanomaly.evaluation.postprocess.smooth_min_avg`` when that module exists, else torch pooling
    (windows clipped at the border, so the borders are not biased by padding).
    """
    try:
        from medanomaly.evaluation.postprocess import smooth_min_avg
    except ImportError:
        smooth_min_avg = None
    if smooth_min_avg is not None:
        out: Any = smooth_min_avg(maps, min_size, avg_size)
        return torch.as_tensor(out, dtype=maps.dtype, device=maps.device).reshape(maps.shape)
    nd = maps.ndim - 1
    x = maps.unsqueeze(1)
    max_pool = F.max_pool2d if nd == 2 else F.max_pool3d
    avg_pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    if min_size > 1:
        x = -_pool_same(lambda t, k: max_pool(t, k, stride=1), -x, min_size, float("-inf"))
    if avg_size > 1:
        x = _pool_same(lambda t, k: avg_pool(t, k, stride=1, padding=k // 2, count_include_pad=False), x, avg_size, None)
    return x[:, 0]


def _pool_same(pool: Any, x: torch.Tensor, k: int, pad_value: float | None) -> torch.Tensor:
    """Stride-1 pooling with output size = input size (odd or even ``k``)."""
    nd = x.ndim - 2
    if pad_value is None:  # the pool pads itself (k//2 each side); an even k gives one extra voxel: crop it
        y = pool(x, k)
    else:
        lo, hi = k // 2, k - 1 - k // 2
        y = pool(F.pad(x, [lo, hi] * nd, value=pad_value), k)
    return y[(..., *[slice(0, s) for s in x.shape[2:]])]


def image_scores(maps: torch.Tensor, fg: torch.Tensor, how: str, k: float) -> torch.Tensor:
    """One score per image from its map over the foreground (``medanomaly.evaluation.metrics.reduce_map``)."""
    from medanomaly.evaluation.metrics import reduce_map

    return torch.as_tensor(reduce_map(maps.detach().cpu(), how=how, k=k, foreground=fg.cpu()), dtype=torch.float32)
