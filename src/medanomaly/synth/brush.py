"""Brush-stroke masks: a brush walking randomly with a randomly changing width, on any N-D grid (pixels or tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["brush_mask"]


def _stamp_segment(mask: np.ndarray, a: np.ndarray, b: np.ndarray, r0: float, r1: float) -> None:
    """Mark grid points within the (linearly tapering) radius of segment a-b."""
    shape = np.asarray(mask.shape)
    rmax = max(r0, r1)
    lo = np.clip(np.floor(np.minimum(a, b) - rmax), 0, shape - 1).astype(int)
    hi = np.clip(np.ceil(np.maximum(a, b) + rmax), 0, shape - 1).astype(int)
    box = tuple(slice(int(x), int(y) + 1) for x, y in zip(lo, hi, strict=False))
    pts = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box], indexing="ij"), -1)
    ab = b - a
    den = float(ab @ ab)
    t = np.clip(((pts - a) @ ab) / den, 0.0, 1.0) if den > 0 else np.zeros(pts.shape[:-1])
    closest = a + t[..., None] * ab
    dist = np.sqrt(((pts - closest) ** 2).sum(-1))
    mask[box] |= dist <= (r0 + (r1 - r0) * t)


def brush_mask(
    shape: Sequence[int],
    rng: np.random.Generator | int | None = None,
    *,
    n_strokes: tuple[int, int] = (1, 3),
    n_steps: tuple[int, int] = (4, 12),
    step_length: tuple[float, float] = (0.05, 0.15),
    width: tuple[float, float] = (0.05, 0.2),
    width_change: float = 0.3,
    turn: float = 0.8,
    target_ratio: float | None = None,
    region: np.ndarray | None = None,
    max_strokes: int = 200,
) -> np.ndarray:
    """A bool mask of ``shape`` (2D or 3D, e.g. 256x256 pixels or a 20x20 token grid) drawn by random brush strokes.

    Each stroke starts at a random grid point (inside ``region`` when given) and takes ``n_steps`` steps of length
    ``step_length * min(shape)``; at each step the direction turns by a random amount (``turn`` ~ std of the
    perturbation) and the width (a fraction of ``min(shape)``, at least 1.5 grid cells) changes by up to
    ``width_change`` of itself, staying in ``width``. Strokes bounce off the border. With ``target_ratio`` strokes are
    added until at least that fraction of the grid (of ``region``) is covered.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"brush_mask: invalid grid shape {shape}")
    if target_ratio is not None and not 0.0 <= target_ratio <= 1.0:
        raise ValueError(f"brush_mask: target_ratio must be in [0, 1], got {target_ratio}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    size = float(min(shape))
    nd = len(shape)
    limit = np.asarray(shape, dtype=np.float64) - 1
    mask = np.zeros(shape, dtype=bool)
    starts = None
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != shape:
            raise ValueError(f"brush_mask: region shape {region.shape} does not match grid {shape}")
        starts = np.flatnonzero(region)
    total = int(region.sum()) if region is not None else mask.size
    w_lo, w_hi = max(width[0] * size, 1.5), max(width[1] * size, 1.5)  # >= 1.5 cells keeps strokes 4-connected
    n_target = int(gen.integers(n_strokes[0], n_strokes[1] + 1))
    k = 0
    while k < max_strokes:
        if target_ratio is None and k >= n_target:
            break
        if target_ratio is not None and (mask if region is None else mask & region).sum() >= target_ratio * total:
            break
        k += 1
        if starts is not None and starts.size:
            pos = np.array(np.unravel_index(starts[gen.integers(starts.size)], shape), dtype=np.float64)
        else:
            pos = gen.uniform(0, 1, nd) * limit
        direction = gen.standard_normal(nd)
        direction /= np.linalg.norm(direction) + 1e-12
        w = gen.uniform(w_lo, w_hi)
        for _ in range(int(gen.integers(n_steps[0], n_steps[1] + 1))):
            direction = direction + turn * gen.standard_normal(nd)
            direction /= np.linalg.norm(direction) + 1e-12
            step = gen.uniform(*step_length) * size
            new = pos + step * direction
            for d in range(nd):  # bounce off the border
                if new[d] < 0:
                    new[d], direction[d] = -new[d], -direction[d]
                elif new[d] > limit[d]:
                    new[d], direction[d] = 2 * limit[d] - new[d], -direction[d]
            new = np.clip(new, 0, limit)
            w_new = float(np.clip(w * (1 + gen.uniform(-width_change, width_change)), w_lo, w_hi))
            _stamp_segment(mask, pos, new, w / 2, w_new / 2)
            pos, w = new, w_new
    return mask
