"""``mae``: the plain masked-autoencoder reconstruction detector (the pre-training stage of ``amae`` and
``mae-pseudo`` on its own). Map = |x - reconstruction| averaged over random maskings with a fixed seed; image score
from the map by :mod:`medanomaly.evaluation.scoring` (``image_score``, default the foreground mean)."""

from __future__ import annotations

from typing import Any

import torch

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import AnomalyResult, register
from medanomaly.methods.mae.common import MAE_COMMON_DEFAULTS, MAE_COMMON_SCHEMA, MAEFamilyDetector, dataset_tensors
from medanomaly.methods.params import IMAGE_SCORE_SCHEMA, SEED, Float, Int
from medanomaly.nets.mae import resize_to

__all__ = ["MAEDetector"]


@register
class MAEDetector(MAEFamilyDetector):
    """Masked-autoencoder reconstruction residual. Its run folder is a pre-trained MAE for ``amae``/``mae-pseudo``
    (``pretrained: <run folder>``)."""

    name = "mae"
    #: the plain MAE is the one that pre-trains the backbone others reuse, wherever a benchmark lists it
    share_priority = -1
    defaults = {
        **MAE_COMMON_DEFAULTS,
        "score": {"mask_ratio": 0.75, "n_masks": 4, "seed": 1234},
        "image_score": {"reduce": "mean", "fraction": 0.01},  # max | mean | topk, over the foreground
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`)
    parameter_schema = {
        **MAE_COMMON_SCHEMA,
        "score": {"mask_ratio": Float(0, 1, closed="neither"), "n_masks": Int(1, 1024), "seed": SEED},
        "image_score": IMAGE_SCORE_SCHEMA,
    }

    def _fit(self, train: Any, val: Any | None = None) -> None:
        train, val = self._split(train, val)
        x, _ = dataset_tensors(train, self.model_size, "train")
        xv = dataset_tensors(val, self.model_size, "val")[0] if val is not None else None
        self.mae = self._backbone(x, xv)

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x, fg = self._prepare(images, foreground)
        s = self.params["score"]
        g = torch.Generator().manual_seed(int(s["seed"]))
        rec = self.mae.reconstruct(x, float(s["mask_ratio"]), int(s["n_masks"]), g, int(self.params["batch_size"]))
        maps = (x - rec).abs().mean(1)
        if fg is not None:
            maps = maps * fg[:, 0]
        scores = image_scores(maps, fg, **self.params["image_score"])
        out = self._to_input_size(maps, tuple(images.shape[2:]))
        return AnomalyResult(out.cpu(), scores.cpu(), {"reconstructions": rec.cpu(),
                                                         "restoration": resize_to(rec, tuple(images.shape[2:])).cpu()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._mae_state()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mae = self._load_mae(tensors)
