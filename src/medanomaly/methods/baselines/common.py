"""Small helpers shared by the baselines: map smoothing and foreground handling.

Image scores come from :func:`medanomaly.evaluation.scoring.image_scores` (the rule shared by every method).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_smooth", "foreground_or_ones", "min_avg_smooth"]


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
