"""Input checks shared by the evaluation modules: arrays from numpy/torch, finite scores, binary masks."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor or sequence, with a clear error for anything else."""
    if x is None:
        raise ValueError(f"{name} is None")
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            return x.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{name} could not be converted to an array: {e}") from e
    if a.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got an object array (ragged or mixed input?)")
    return a


def check_scores(a: np.ndarray, name: str) -> np.ndarray:
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype == bool:
        a = a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            n_nan = int(np.isnan(a).sum())
            raise ValueError(
                f"{name} contains non-finite values: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite of {a.size}"
            )
    else:
        a = a.astype(np.float64)
    return a


def check_binary(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == bool:
        return a
    if a.size and not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {a.dtype}")
    ok = (a == 0) | (a == 1)
    if not ok.all():
        bad = np.unique(a[~ok])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1); found other values such as {bad.tolist()}")
    return a.astype(bool)


def squeeze_channel(a: np.ndarray) -> np.ndarray:
    """(N, 1, *spatial) -> (N, *spatial); other shapes unchanged."""
    if a.ndim >= 3 and a.shape[1] == 1:
        return a[:, 0]
    return a


def prepare_maps(
    scores: Any, masks: Any, foreground: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked (N, V) scores, (N, V) bool masks and (N, V) bool foreground (or None)."""
    s = check_scores(squeeze_channel(to_numpy(scores, "scores")), "scores")
    m = squeeze_channel(to_numpy(masks, "masks"))
    if s.ndim < 2:
        raise ValueError(f"scores must be (N, *spatial) or (N, 1, *spatial), got shape {s.shape}")
    if m.shape != s.shape:
        raise ValueError(f"scores shape {s.shape} does not match masks shape {m.shape} (after dropping a channel axis)")
    m = check_binary(m, "masks")
    f = None
    if foreground is not None:
        f = squeeze_channel(to_numpy(foreground, "foreground"))
        if f.shape != s.shape:
            raise ValueError(f"foreground shape {f.shape} does not match scores shape {s.shape}")
        f = check_binary(f, "foreground").reshape(len(f), -1)
        if not f.any():
            raise ValueError("foreground is empty: no voxel to evaluate")
    n = s.shape[0]
    return s.reshape(n, -1), m.reshape(n, -1), f

