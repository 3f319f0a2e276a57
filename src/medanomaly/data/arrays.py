"""Array conversion shared by the data modules (a leaf module: imports nothing from ``medanomaly``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of an array-like or a tensor (bfloat16 tensors become float32)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)
