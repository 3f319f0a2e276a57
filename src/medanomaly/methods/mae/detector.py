"""``mae``: the plain masked-autoencoder reconstruction detector (the pre-training stage of ``amae`` and
``mae-pseudo`` on its own). Map = |x - reconstruction| averaged over random maskings with a fixed seed."""

from __future__ import annotations

from typing import Any

import torch

from medanomaly.methods.base import AnomalyResult, register
from medanomaly.methods.mae.common import MAE_COMMON_DEFAULTS, MAEFamilyDetector, dataset_tensors
from medanomaly.nets.mae import resize_to

__all__ = ["MAEDetector"]


@register
class MAEDetector(MAEFamilyDetector):
    """Masked-autoencoder reconstruction residual. Its run folder is a pre-trained MAE for ``amae``/``mae-pseudo``
    (``pretrained: <run folder>``)."""

    name = "mae"
    defaults = {
        **MAE_COMMON_DEFAULTS,
        "score": {"mask_ratio": 0.75, "n_masks": 4, "seed": 1234, "image_score": "mean"},  # mean | max | top1
    }

    def fit(self, train: Any, val: Any | None = None) -> MAEDetector:
        train, val = self._split(train, val)
        x, _ = dataset_tensors(train, self.model_size, "train")
        xv = dataset_tensors(val, self.model_size, "val")[0] if val is not None else None
        self.mae = self._backbone(x, xv)
        self.is_fitted = True
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x, fg = self._prepare(images, foreground)
        s = self.params["score"]
        g = torch.Generator().manual_seed(int(s["seed"]))
        rec = self.mae.reconstruct(x, float(s["mask_ratio"]), int(s["n_masks"]), g, int(self.params["batch_size"]))
        maps = (x - rec).abs().mean(1)
        if fg is not None:
            maps = maps * fg[:, 0]
        image_scores = image_score(maps, fg, s["image_score"], self._masked_mean)
        out = self._to_input_size(maps, tuple(images.shape[2:]))
        return AnomalyResult(out.cpu(), image_scores.cpu(), {"reconstructions": rec.cpu(),
                                                         "restoration": resize_to(rec, tuple(images.shape[2:])).cpu()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._mae_state()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mae = self._load_mae(tensors)


def image_score(maps: torch.Tensor, fg: torch.Tensor | None, how: str, masked_mean: Any) -> torch.Tensor:
    """Image score of maps (B, *S): ``mean`` (over the foreground), ``max``, or ``top1`` (mean of the top 1%)."""
    if how == "mean":
        return masked_mean(maps, fg)
    flat = maps.flatten(1)
    if how == "max":
        return flat.amax(1)
    if how == "top1":
        k = max(1, int(0.01 * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown image_score '{how}' (mean | max | top1)")
