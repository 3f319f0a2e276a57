"""``mae``: the plain masked-autoencoder reconstruction detector (the pre-training stage of ``amae`` and
``mae-pseudo`` on its own). Map = |x - reconstruction| averaged over random maskings with a fixed seed, set to 0
outside the foreground; image score from the map by :mod:`medanomaly.evaluation.scoring` (``image_score``, default
the foreground mean).

Optional post-processing, ``score.smooth: {min_size, avg_size}`` (odd window sizes in pixels of the model grid
``mae.img_size``; 1 = that step off; default both 1: no post-processing, the map as before this option existed):
MIM-OOD's min-pooling then average pooling (:func:`medanomaly.evaluation.postprocess.smooth_min_avg`), applied to
the foreground-masked map, which is then masked to the foreground again (outside it the map stays 0) and scored.

At the brain's edge: the brain presets zero the background, the MAE blurs that hard step, and the residual is
concentrated in a band along the foreground edge (docs/results/controlled_cases.md). Because the masked map is 0
outside the foreground, the min-pool sets every foreground pixel within ``min_size // 2`` px of the edge to 0 (its
window reaches a background 0), and the average pool then lowers a further ``avg_size // 2`` px band by averaging in
those zeros. This removes the edge band, and thin bright residuals anywhere, but equally lowers a lesion in that band
(a lesion touching the edge loses its rim) and a lesion thinner than ``min_size`` px.
"""

from __future__ import annotations

from typing import Any

import torch

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import AnomalyResult, register
from medanomaly.methods.mae.common import (
    MAE_COMMON_DEFAULTS,
    MAE_COMMON_SCHEMA,
    SMOOTH_DEFAULTS,
    SMOOTH_SCHEMA,
    MAEFamilyDetector,
    check_smooth,
    dataset_tensors,
    residual_map,
)
from medanomaly.methods.params import IMAGE_SCORE_SCHEMA, SEED, Float, Int
from medanomaly.nets.mae import resize_to

__all__ = ["MAEDetector"]


@register
class MAEDetector(MAEFamilyDetector):
    """Masked-autoencoder reconstruction residual. Its run folder is a pre-trained MAE for ``amae``/``mae-pseudo``
    (``pretrained: <run folder>``).

    ``score.smooth`` (``min_size``/``avg_size``, odd, 1 = off, the default): min- then average pooling of the
    foreground-masked map at the model size, re-masked to the foreground (see the module docstring for what the
    min-pool does at the brain edge); the image score is computed from the smoothed map.
    """

    name = "mae"
    #: the plain MAE is the one that pre-trains the backbone others reuse, wherever a benchmark lists it
    share_priority = -1
    defaults = {
        **MAE_COMMON_DEFAULTS,
        # smooth: min- then average pooling of the map (odd sizes in model pixels; 1 = off, the default)
        "score": {"mask_ratio": 0.75, "n_masks": 4, "seed": 1234, "smooth": dict(SMOOTH_DEFAULTS)},
        "image_score": {"reduce": "mean", "fraction": 0.01},  # max | mean | topk, over the foreground
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`); smoothing sizes must also be odd (checked in
    #: ``__init__``)
    parameter_schema = {
        **MAE_COMMON_SCHEMA,
        "score": {"mask_ratio": Float(0, 1, closed="neither"), "n_masks": Int(1, 1024), "seed": SEED,
                  "smooth": SMOOTH_SCHEMA},
        "image_score": IMAGE_SCORE_SCHEMA,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_smooth(self.params["score"]["smooth"], f"{self.name}: score.smooth")

    def _fit(self, train: Any, val: Any | None = None) -> None:
        train, val = self._split(train, val)
        x, _ = dataset_tensors(train, self.model_size, "train")
        xv = dataset_tensors(val, self.model_size, "val")[0] if val is not None else None
        self.mae = self._backbone(x, xv)

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x, fg = self._prepare(images, foreground)
        s = self.params["score"]
        maps, rec = residual_map(self.mae, x, fg, float(s["mask_ratio"]), int(s["n_masks"]), int(s["seed"]),
                                 int(self.params["batch_size"]), s["smooth"])
        scores = image_scores(maps, fg, **self.params["image_score"])
        out = self._to_input_size(maps, tuple(images.shape[2:]))
        return AnomalyResult(out.cpu(), scores.cpu(), {"reconstructions": rec.cpu(),
                                                         "restoration": resize_to(rec, tuple(images.shape[2:])).cpu()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._mae_state()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mae = self._load_mae(tensors)
