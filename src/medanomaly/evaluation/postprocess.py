"""Post-processing of anomaly maps: min-then-average pooling, Gaussian smoothing, masking to the foreground.

Every function takes (N, *spatial) or (N, 1, *spatial) maps, numpy or torch, 2D or 3D, and returns the same
type, shape and dtype family. The number of spatial dims is inferred from the shape (an axis of size 1 right
after the batch axis is a channel) or given with ``spatial_dims``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["smooth_min_avg", "gaussian_smooth", "mask_foreground"]


def _as_tensor(maps: Any, name: str = "maps") -> tuple[torch.Tensor, bool]:
    if isinstance(maps, torch.Tensor):
        return maps, True
    try:
        a = np.asarray(maps)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{name} could not be converted to an array: {e}") from e
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a)), False


def _to_ncs(t: torch.Tensor, spatial_dims: int | None) -> tuple[torch.Tensor, int]:
    """(N, *S) or (N, 1, *S) -> (N, 1, *S) float, and the number of spatial dims."""
    if spatial_dims is None:
        if t.ndim == 3:
            spatial_dims = 2
        elif t.ndim == 4:
            spatial_dims = 2 if t.shape[1] == 1 else 3
        elif t.ndim == 5:
            spatial_dims = 3
        else:
            raise ValueError(f"maps must be (N, H, W[, D]) or (N, 1, H, W[, D]), got shape {tuple(t.shape)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if t.ndim == spatial_dims + 1:
        t = t.unsqueeze(1)
    elif not (t.ndim == spatial_dims + 2 and t.shape[1] == 1):
        raise ValueError(f"maps of shape {tuple(t.shape)} are not (N, *spatial) or (N, 1, *spatial), {spatial_dims} spatial dims")
    if t.numel() == 0:
        raise ValueError(f"maps are empty (shape {tuple(t.shape)})")
    return t, spatial_dims


def _check_size(k: int | None, what: str) -> int:
    if k is None or k == 0:
        return 1
    if int(k) != k or k < 1 or k % 2 == 0:
        raise ValueError(f"{what} must be a positive odd integer (or 0/None to skip), got {k}")
    return int(k)


def _back(out: torch.Tensor, like: torch.Tensor, was_torch: bool, squeeze: bool) -> Any:
    if squeeze:
        out = out[:, 0]
    out = out.to(like.dtype) if like.is_floating_point() else out
    return out if was_torch else out.numpy()


def smooth_min_avg(maps: Any, min_size: int | None = 3, avg_size: int | None = 3, spatial_dims: int | None = None) -> Any:
    """Min-pooling with window ``min_size`` then average pooling with window ``avg_size`` (stride 1, same shape).

    The min filter removes thin bright structures (residuals along edges), the mean filter then smooths the map.
    Windows are cubes of odd size; at the border only the voxels inside the image count (no padding values enter
    either the minimum or the mean). A size of 1, 0 or None skips that step.
    """
    t, was_torch = _as_tensor(maps)
    kmin, kavg = _check_size(min_size, "min_size"), _check_size(avg_size, "avg_size")
    x, nd = _to_ncs(t, spatial_dims)
    squeeze = x.ndim != t.ndim
    x = x.float() if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16) else x
    if not torch.isfinite(x).all():
        raise ValueError("maps contain NaN or infinite values")
    max_pool = F.max_pool2d if nd == 2 else F.max_pool3d
    avg_pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    if kmin > 1:
        x = -max_pool(-x, kmin, stride=1, padding=kmin // 2)  # max_pool pads with -inf: border uses valid voxels only
    if kavg > 1:
        x = avg_pool(x, kavg, stride=1, padding=kavg // 2, count_include_pad=False)
    return _back(x, t, was_torch, squeeze)


def gaussian_smooth(maps: Any, sigma: float, spatial_dims: int | None = None, truncate: float = 3.0) -> Any:
    """Separable Gaussian smoothing over the spatial axes (reflect padding at the border)."""
    t, was_torch = _as_tensor(maps)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    x, nd = _to_ncs(t, spatial_dims)
    squeeze = x.ndim != t.ndim
    x = x.float() if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16) else x
    if sigma > 0:
        r = max(1, int(truncate * sigma + 0.5))
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
        g = g / g.sum()
        conv = F.conv2d if nd == 2 else F.conv3d
        for d in range(nd):
            shape = [1, 1] + [1] * nd
            shape[2 + d] = g.numel()
            pad = [0, 0] * nd
            pad[2 * (nd - 1 - d)] = pad[2 * (nd - 1 - d) + 1] = r
            size = x.shape[2 + d]
            mode = "reflect" if size > r else "replicate"
            x = conv(F.pad(x, pad, mode=mode), g.reshape(shape))
    return _back(x, t, was_torch, squeeze)


def mask_foreground(maps: Any, foreground: Any, fill: float = 0.0) -> Any:
    """Set map values outside the foreground to ``fill``. ``foreground`` may carry a channel axis the map lacks."""
    t, was_torch = _as_tensor(maps)
    fg = foreground if isinstance(foreground, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(foreground)))
    fg = fg.to(t.device)
    if fg.dtype != torch.bool:
        if not ((fg == 0) | (fg == 1)).all():
            raise ValueError("foreground must be binary (bool or 0/1)")
        fg = fg.bool()
    if fg.shape != t.shape:
        if fg.ndim == t.ndim + 1 and fg.shape[1] == 1:
            fg = fg[:, 0]
        elif t.ndim == fg.ndim + 1 and t.shape[1] == 1:
            fg = fg[:, None]
    if fg.shape != t.shape:
        raise ValueError(f"foreground shape {tuple(fg.shape)} does not match maps shape {tuple(t.shape)}")
    out = torch.where(fg, t, float(fill))
    return out if was_torch else out.numpy()
