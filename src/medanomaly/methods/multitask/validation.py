"""Synthetic validation of a multitask member: a fixed set of held-out tasks on held-out-fold images
(:func:`make_validation_set`), the training/validation loss against the soft labels (:func:`label_loss`) and the
pixel AP on the synthetic masks (:func:`validation_ap`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from medanomaly.methods.multitask.model import MultiTaskUNet
from medanomaly.methods.multitask.pool import HealthyPool
from medanomaly.methods.multitask.synthesis import SynthSpec

__all__ = ["label_loss", "validation_loss", "validation_ap", "make_validation_set"]


def label_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    logits = logits.float()
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, target)
    return nn.functional.mse_loss(torch.sigmoid(logits), target)


def validation_loss(model: nn.Module, val: dict[str, torch.Tensor], device: torch.device, kind: str, bs: int) -> float:
    total, n = 0.0, 0
    for s in range(0, val["image"].shape[0], bs):
        x, y = val["image"][s:s + bs].to(device), val["label"][s:s + bs].to(device)
        total += float(label_loss(model(x), y, kind)) * x.shape[0]
        n += x.shape[0]
    return total / max(n, 1)


def validation_ap(model: MultiTaskUNet, val: dict[str, torch.Tensor], device: torch.device, bs: int) -> float | None:
    """Pixel AP of the member on its synthetic validation set (foreground voxels; positives = synthetic mask)."""
    from sklearn.metrics import average_precision_score

    model.to(device).eval()
    scores = []
    with torch.no_grad():
        for s in range(0, val["image"].shape[0], bs):
            scores.append(model.predict_scores(val["image"][s:s + bs].to(device)).float().cpu())
    sc = torch.cat(scores)[:, 0]
    pos = val["mask"][:, 0]
    fg = val["foreground"][:, 0] | pos
    y, s = pos[fg].numpy(), sc[fg].numpy()
    if y.size > 2_000_000:  # subsample evenly to keep this cheap on large 3D sets
        step = int(math.ceil(y.size / 2_000_000))
        y, s = y[::step], s[::step]
    if not y.any() or y.all():
        return None
    return float(average_precision_score(y, s))



def make_validation_set(pool: HealthyPool, indices: np.ndarray, tasks: tuple[int, ...], spec: SynthSpec, n: int, seed: int,
                  member: int) -> dict[str, torch.Tensor]:
    """A fixed synthetic validation set: held-out tasks applied to held-out-fold images (no flips)."""
    if len(indices) == 0:
        raise ValueError("multitask: a validation fold group is empty (too few training images for the task folds)")
    imgs, labels, masks, fgs = [], [], [], []
    for j in range(n):
        rng = np.random.default_rng([seed, member, j, 23])
        i = int(indices[j % len(indices)]) if n >= len(indices) else int(indices[rng.integers(len(indices))])
        task = tasks[j % len(tasks)]
        img, label, mask = spec.apply(task, pool.images[i], pool.foregrounds[i], rng, pool, indices)
        imgs.append(torch.from_numpy(img))
        labels.append(torch.from_numpy(label))
        masks.append(torch.from_numpy(mask))
        fgs.append(torch.from_numpy(pool.foregrounds[i][None].copy()))
    return {"image": torch.stack(imgs), "label": torch.stack(labels), "mask": torch.stack(masks), "foreground": torch.stack(fgs)}
