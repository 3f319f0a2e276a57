"""Random N-D anomaly shapes: ellipsoids and boxes with random size, rotation and shear, placed on the foreground.

A :class:`Shape` maps unit-shape coordinates ``u`` to image coordinates ``p = centre + matrix @ u``; a voxel is
inside when ``|u|_2 <= 1`` (ellipse/ellipsoid) or ``|u|_inf <= 1`` (box/cuboid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Shape",
    "mtmlw_sizes",
    "random_rotation",
    "random_shear",
    "make_shape",
    "random_shape",
    "anomaly_count",
    "as_foreground",
]

SHAPE_KINDS = ("ellipse", "box")


@dataclass
class Shape:
    """One rasterised shape. ``box`` is the clipped bounding box of ``mask`` in the image."""

    kind: str
    centre: np.ndarray
    matrix: np.ndarray
    mask: np.ndarray
    box: tuple[slice, ...]

    def local(self, points: np.ndarray) -> np.ndarray:
        """Unit-shape coordinates of image points (..., D)."""
        inv = np.linalg.inv(self.matrix)
        return (np.asarray(points, dtype=np.float64) - self.centre) @ inv.T

    def norm(self, u: np.ndarray) -> np.ndarray:
        """Shape norm of local coordinates: <= 1 inside."""
        return np.sqrt((u * u).sum(-1)) if self.kind == "ellipse" else np.abs(u).max(-1)

    def indices(self) -> tuple[np.ndarray, ...]:
        """``np.nonzero(self.mask)``, computed on the bounding box only."""
        nz = np.nonzero(self.mask[self.box])
        return tuple(a + s.start for a, s in zip(nz, self.box, strict=True))

    def inside_fraction(self, foreground: np.ndarray) -> float:
        """Fraction of the shape's voxels that lie in ``foreground``."""
        m = self.mask[self.box]
        n = int(m.sum())
        return float((m & foreground[self.box]).sum() / n) if n else 0.0


def as_foreground(foreground: np.ndarray | None, spatial: tuple[int, ...]) -> np.ndarray:
    """Foreground as a bool array of shape ``spatial`` (accepts (1, *S); ``None`` means everything)."""
    if foreground is None:
        return np.ones(spatial, dtype=bool)
    fg = np.asarray(foreground)
    if fg.shape == (1, *spatial):
        fg = fg[0]
    if fg.shape != tuple(spatial):
        raise ValueError(f"foreground shape {fg.shape} does not match image spatial shape {tuple(spatial)}")
    return fg.astype(bool, copy=False)


def mtmlw_sizes(spatial: tuple[int, ...], rng: np.random.Generator, low: float = 0.06, high: float = 0.8) -> np.ndarray:
    """Side lengths in voxels: ``(0.03 + Gamma(k=2, theta=0.1)) * dim`` clipped to ``[low, high] * dim`` (MTMLW)."""
    dims = np.asarray(spatial, dtype=np.float64)
    frac = 0.03 + rng.gamma(shape=2.0, scale=0.1, size=len(spatial))
    return np.clip(frac, low, high) * dims


def random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (det +1) in ``ndim`` dimensions."""
    if ndim == 1:
        return np.ones((1, 1))
    if ndim == 2:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_shear(ndim: int, rng: np.random.Generator, max_shear: float = 0.3) -> np.ndarray:
    """Upper-triangular shear with off-diagonal entries in ``U(-max_shear, max_shear)``."""
    s = np.eye(ndim)
    iu = np.triu_indices(ndim, 1)
    s[iu] = rng.uniform(-max_shear, max_shear, size=len(iu[0]))
    return s


def make_shape(spatial: tuple[int, ...], kind: str, centre: np.ndarray, matrix: np.ndarray) -> Shape:
    """Rasterise a shape (evaluating only its bounding box)."""
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPE_KINDS}")
    spatial = tuple(int(s) for s in spatial)
    centre = np.asarray(centre, dtype=np.float64)
    half = np.abs(matrix).sum(axis=1)
    lo = np.clip(np.floor(centre - half).astype(int), 0, np.asarray(spatial) - 1)
    hi = np.clip(np.ceil(centre + half).astype(int), 0, np.asarray(spatial) - 1)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=False))
    mask = np.zeros(spatial, dtype=bool)
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box], indexing="ij")
    pts = np.stack(grids, axis=-1)
    shape = Shape(kind, centre, np.asarray(matrix, dtype=np.float64), mask, box)
    inside = shape.norm(shape.local(pts)) <= 1.0
    ci = tuple(int(round(c)) for c in centre)
    mask[box] = inside
    if all(0 <= c < s for c, s in zip(ci, spatial, strict=False)):
        mask[ci] = True  # a shape always holds its centre voxel
    nz = np.nonzero(mask[box])
    shape.box = tuple(slice(int(a.min()) + b.start, int(a.max()) + 1 + b.start) for a, b in zip(nz, box, strict=True))
    return shape


def random_shape(
    spatial: tuple[int, ...],
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    kind: str | None = None,
    sizes: np.ndarray | None = None,
    size_range: tuple[float, float] = (0.06, 0.8),
    max_shear: float = 0.3,
    min_inside: float = 0.5,
    max_tries: int = 30,
    fg_index: np.ndarray | None = None,
) -> Shape:
    """A random ellipse/box with MTMLW sizes, random rotation and shear, at least ``min_inside`` in the foreground.

    The centre is drawn among foreground voxels; up to ``max_tries`` shapes are drawn and the first that meets
    ``min_inside`` is returned (else the one with the largest foreground fraction). ``fg_index``: optional
    precomputed ``np.flatnonzero(foreground)`` (saves a pass over large volumes when drawing several shapes).
    """
    spatial = tuple(int(s) for s in spatial)
    fg = as_foreground(foreground, spatial)
    fg_idx = np.flatnonzero(fg) if fg_index is None else fg_index
    best: tuple[float, Shape] | None = None
    for _ in range(max_tries):
        k = kind or SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        side = sizes if sizes is not None else mtmlw_sizes(spatial, rng, *size_range)
        half = np.maximum(np.asarray(side, dtype=np.float64) / 2.0, 1.0)
        matrix = random_rotation(len(spatial), rng) @ random_shear(len(spatial), rng, max_shear) @ np.diag(half)
        if fg_idx.size:
            centre = np.array(np.unravel_index(fg_idx[rng.integers(fg_idx.size)], spatial), dtype=np.float64)
        else:
            centre = np.array([rng.uniform(0, s - 1) for s in spatial])
        shape = make_shape(spatial, k, centre, matrix)
        frac = shape.inside_fraction(fg)
        if frac >= min_inside:
            return shape
        if best is None or frac > best[0]:
            best = (frac, shape)
    assert best is not None
    return best[1]


def anomaly_count(rng: np.random.Generator, p_more: float = 0.5, max_count: int = 4) -> int:
    """1, then one more with probability ``p_more`` each time, up to ``max_count`` (MTMLW)."""
    n = 1
    while n < max_count and rng.random() < p_more:
        n += 1
    return n
