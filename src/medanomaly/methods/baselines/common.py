"""Small helpers shared by the baselines: map smoothing, foreground handling, image-score reduction."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["IMAGE_SCORES", "foreground_or_ones", "image_scores", "min_avg_smooth", "check_image_score", "check_smooth"]

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


def check_smooth(where: str, smooth: dict[str, Any]) -> None:
    for k in ("min_size", "avg_size"):
        v = smooth.get(k)
        if not isinstance(v, int) or v < 1 or v % 2 == 0:
            raise ValueError(f"{where}: smooth.{k} must be an odd integer >= 1 (1: off), got {v!r}")


def min_avg_smooth(maps: torch.Tensor, min_size: int, avg_size: int) -> torch.Tensor:
    """Min filter (removes thin isolated residuals, e.g. along edges) then box average; (B, *S) -> (B, *S).

    Thin wrapper of :func:`medanomaly.evaluation.postprocess.smooth_min_avg` (odd window sizes; 1 = off).
    """
    from medanomaly.evaluation.postprocess import smooth_min_avg

    out = smooth_min_avg(maps, min_size if min_size > 1 else None, avg_size if avg_size > 1 else None,
                         spatial_dims=maps.ndim - 1)
    return torch.as_tensor(out, dtype=maps.dtype, device=maps.device).reshape(maps.shape)


def image_scores(maps: torch.Tensor, fg: torch.Tensor, how: str, k: float) -> torch.Tensor:
    """One score per image from its map over the foreground (``medanomaly.evaluation.metrics.reduce_map``)."""
    from medanomaly.evaluation.metrics import reduce_map

    return torch.as_tensor(reduce_map(maps.detach().cpu(), how=how, k=k, foreground=fg.cpu()), dtype=torch.float32)
