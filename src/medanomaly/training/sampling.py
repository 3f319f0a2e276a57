"""Deterministic batches from a dataset, for ``train_model``'s ``batch_fn(step)``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["BatchSampler"]


class BatchSampler:
    """``sampler(step) -> {"image": (B, C, *S), "foreground": (B, 1, *S)}``, a pure function of (seed, step).

    Reads only ``image`` and ``foreground`` of each sample (never masks or labels). When the whole set fits in
    ``cache_mb`` megabytes it is loaded into memory once; otherwise samples are read on each step.
    Sampling is uniform with replacement: ``np.random.default_rng([seed, step]).integers(0, n, batch_size)``.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int = 0, cache_mb: float = 1024.0, quiet: bool = True) -> None:
        n = len(dataset)
        if n == 0:
            raise ValueError("cannot train on an empty dataset (0 samples)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.n = dataset, int(batch_size), int(seed), n
        first = dataset[0]
        if "image" not in first:
            raise ValueError(f"dataset samples must be dicts with an 'image' key, got keys {sorted(first)}")
        per = first["image"].numel() * 4 + first["image"][:1].numel()
        self.images: torch.Tensor | None = None
        self.foreground: torch.Tensor | None = None
        if n * per <= cache_mb * 2**20:
            from medanomaly.training.progress import track

            imgs, fgs = [], []
            for i in track(range(n), desc="loading", quiet=quiet):
                s = dataset[i]
                imgs.append(s["image"])
                fgs.append(s.get("foreground", torch.ones_like(s["image"][:1], dtype=torch.bool)))
            self.images, self.foreground = _stack(imgs, "image"), _stack(fgs, "foreground")

    def indices(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(step)]).integers(0, self.n, self.batch_size)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices(step)
        if self.images is not None:
            t = torch.as_tensor(idx)
            return {"image": self.images[t], "foreground": self.foreground[t]}
        samples = [self.dataset[int(i)] for i in idx]
        return {
            "image": _stack([s["image"] for s in samples], "image"),
            "foreground": _stack([s.get("foreground", torch.ones_like(s["image"][:1], dtype=torch.bool)) for s in samples],
                                 "foreground"),
        }


def _stack(ts: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) > 1:
        raise ValueError(f"samples have different {what} shapes {sorted(shapes)[:4]}; resample the data to one size")
    return torch.stack([torch.as_tensor(t) for t in ts])
