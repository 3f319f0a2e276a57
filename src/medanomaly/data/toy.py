"""Small generated brain-like data for tests and examples (no files needed).

Each image is an ellipse "brain" with smooth texture in [0, 1]; abnormal images carry 1-2 bright blobs
("lesions") with their masks. 2D or 3D.
"""

from __future__ import annotations

import numpy as np

from medanomaly.data.dataset import ArrayDataset

__all__ = ["make_toy_dataset"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(rng.standard_normal(shape), sigma=max(1.0, min(shape) / 8))
    return scale * z / (np.abs(z).max() + 1e-8)


def make_toy_dataset(
    n: int = 16,
    size: int = 32,
    spatial_dims: int = 2,
    abnormal_fraction: float = 0.0,
    seed: int = 0,
    lesion_intensity: float = 0.45,
) -> ArrayDataset:
    """``n`` images of side ``size``; a fraction ``abnormal_fraction`` carries lesions (label 1, masks)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    rng = np.random.default_rng(seed)
    shape = (size,) * spatial_dims
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * spatial_dims, indexing="ij"))
    n_abn = int(round(abnormal_fraction * n))
    images = np.zeros((n, 1, *shape), np.float32)
    fgs = np.zeros((n, 1, *shape), bool)
    masks = np.zeros((n, 1, *shape), bool)
    labels = np.zeros(n, int)
    for i in range(n):
        radii = rng.uniform(0.7, 0.85, spatial_dims)
        centre = rng.uniform(-0.05, 0.05, spatial_dims)
        r2 = sum(((grid[d] - centre[d]) / radii[d]) ** 2 for d in range(spatial_dims))
        fg = r2 <= 1.0
        img = (0.5 + 0.15 * np.cos(3 * np.sqrt(r2)) + _smooth_noise(rng, shape, 0.08)) * fg
        if i >= n - n_abn:
            labels[i] = 1
            for _ in range(rng.integers(1, 3)):
                c = centre + rng.uniform(-0.35, 0.35, spatial_dims)
                rad = rng.uniform(0.12, 0.22)
                blob = sum((grid[d] - c[d]) ** 2 for d in range(spatial_dims)) <= rad**2
                blob &= fg
                img = np.where(blob, np.minimum(img + lesion_intensity, 1.0), img)
                masks[i, 0] |= blob
        images[i, 0] = np.clip(img, 0, 1)
        fgs[i, 0] = fg
    return ArrayDataset(images, foreground=fgs, masks=masks, labels=labels,
                        case_ids=[f"toy_{i:03d}" for i in range(n)], name="toy", preset="toy")
