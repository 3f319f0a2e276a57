"""Positional-encoding channels for fully convolutional networks (2D and 3D).

A convolutional network is translation equivariant: it cannot know *where* in the image a pattern is. Anatomy
is strongly position dependent (a bright blob is normal in one place and abnormal in another), so the
multi-task synthetic-anomaly U-Net receives extra input channels that encode the voxel position:

- coordinate channels: one channel per axis with the coordinate scaled to [-1, 1];
- random Fourier features: ``sin``/``cos`` of ``2 pi B p`` for coordinates ``p`` in [0, 1) and a fixed Gaussian
  matrix ``B`` (``n_fourier`` x D, standard deviation ``fourier_scale``), seeded so that every run, save and
  load sees the same frequencies.

MONAI has no module for this, hence this small one. The encoding depends only on the spatial shape; it is
computed once per shape and cached (not saved: it is rebuilt from the seed).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["coordinate_grid", "fourier_features", "PositionalEncoding"]


def coordinate_grid(shape: tuple[int, ...], low: float = -1.0, high: float = 1.0, endpoint: bool = True,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """(D, *shape) tensor: channel ``d`` holds the coordinate along axis ``d``, from ``low`` to ``high``."""
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"coordinate_grid: shape must be non-empty with positive sizes, got {shape}")
    axes = []
    for n in shape:
        if endpoint:
            mid = torch.full((1,), (low + high) / 2, dtype=torch.float64)
            ax = torch.linspace(low, high, n, dtype=torch.float64) if n > 1 else mid
        else:
            ax = low + (high - low) * torch.arange(n, dtype=torch.float64) / n
        axes.append(ax)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.to(dtype=dtype, device=device)


def fourier_features(shape: tuple[int, ...], frequencies: torch.Tensor) -> torch.Tensor:
    """(2 m, *shape) tensor: ``sin`` then ``cos`` of ``2 pi B p`` with ``B = frequencies`` (m, D), ``p`` in [0, 1)."""
    if frequencies.ndim != 2 or frequencies.shape[1] != len(shape):
        raise ValueError(f"fourier_features: frequencies must be (m, {len(shape)}), got {tuple(frequencies.shape)}")
    coords = coordinate_grid(shape, 0.0, 1.0, endpoint=False, dtype=torch.float64, device=frequencies.device)
    proj = torch.einsum("md,d...->m...", frequencies.to(torch.float64), coords) * (2 * np.pi)
    return torch.cat([torch.sin(proj), torch.cos(proj)]).to(frequencies.dtype)


class PositionalEncoding(nn.Module):
    """Appends positional channels to an image batch: ``forward(x (B, C, *S)) -> (B, C + num_channels, *S)``.

    coords: add the D coordinate channels; n_fourier: number of random frequencies (2 channels each, 0 = none);
    fourier_scale: standard deviation of the frequencies (cycles per image side); seed: seeds the frequencies.
    """

    def __init__(self, spatial_dims: int, coords: bool = True, n_fourier: int = 32, fourier_scale: float = 12.0,
                 seed: int = 42) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"PositionalEncoding: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if n_fourier < 0:
            raise ValueError(f"PositionalEncoding: n_fourier must be >= 0, got {n_fourier}")
        self.spatial_dims, self.coords, self.n_fourier = spatial_dims, bool(coords), int(n_fourier)
        self.fourier_scale, self.seed = float(fourier_scale), int(seed)
        b = np.random.default_rng(self.seed).standard_normal((self.n_fourier, spatial_dims)) * self.fourier_scale
        # rebuilt from the seed, so not part of the state dict
        self.register_buffer("frequencies", torch.as_tensor(b, dtype=torch.float32), persistent=False)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_channels(self) -> int:
        return (self.spatial_dims if self.coords else 0) + 2 * self.n_fourier

    def encoding(self, shape: tuple[int, ...], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(num_channels, *shape) encoding of a spatial shape (cached per shape, device and dtype)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.spatial_dims:
            raise ValueError(f"PositionalEncoding: expected {self.spatial_dims} spatial dims, got shape {shape}")
        key = (shape, str(device), dtype)
        if key not in self._cache:
            parts = []
            if self.coords:
                parts.append(coordinate_grid(shape, dtype=torch.float32))
            if self.n_fourier:
                parts.append(fourier_features(shape, self.frequencies.cpu()))
            enc = torch.cat(parts) if parts else torch.zeros((0, *shape))
            if len(self._cache) > 8:  # a few shapes at most in practice; keep memory bounded
                self._cache.clear()
            self._cache[key] = enc.to(device=device, dtype=dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"PositionalEncoding: input must be (B, C, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}")
        if self.num_channels == 0:
            return x
        enc = self.encoding(tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
        return torch.cat([x, enc.unsqueeze(0).expand(x.shape[0], *enc.shape)], dim=1)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, coords={self.coords}, n_fourier={self.n_fourier}, scale={self.fourier_scale}"
