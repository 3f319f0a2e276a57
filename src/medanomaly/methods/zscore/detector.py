"""``zscore``: how far each voxel is from the healthy training images at the same position, in standard deviations.

The classic normative model for registered scans (every image on the same grid, e.g. volumes registered to a
template, or slices of one preset): ``fit`` keeps the voxel-wise mean and standard deviation of the healthy training
images; the map is the z-score of each voxel (both signs, or only brighter / darker). It is also the smallest
complete method of the package, the one ``docs/adding_a_method.md`` walks through.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import AnomalyResult, Detector, register
from medanomaly.methods.params import IMAGE_SCORE_SCHEMA, MAX_WIDTH, SEED, Float, Int, Options
from medanomaly.training.progress import track

__all__ = ["ZScoreDetector"]


@register
class ZScoreDetector(Detector):
    """Voxel-wise z-score against the healthy training images.

    ``sign``: 0 scores |z| (brighter or darker than healthy), 1 only brighter, -1 only darker. ``min_std``: floor of
    the voxel-wise standard deviation (voxels that never vary in the training images would otherwise divide by 0).
    ``channel``: the image channel to use. Outside the foreground the map is 0.
    """

    name: ClassVar[str] = "zscore"
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {
        "sign": 0,
        "min_std": 0.05,
        "channel": 0,
        "image_score": {"reduce": "topk", "fraction": 0.01},
        "seed": 0,
    }
    parameter_schema: ClassVar[dict[str, Any]] = {
        "sign": Options(0, 1, -1),
        "min_std": Float(0, None, closed="neither"),
        "channel": Int(0, MAX_WIDTH - 1),
        "image_score": IMAGE_SCORE_SCHEMA,
        "seed": SEED,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)  # merges and validates the parameters against parameter_schema
        self.mean_: torch.Tensor | None = None
        self.std_: torch.Tensor | None = None

    def _fit(self, train: Any, val: Any | None = None) -> None:
        """Voxel-wise mean and standard deviation of the training images (Welford's running update, float64)."""
        c = int(self.params["channel"])
        n, mean, m2 = 0, None, None
        for i in track(range(len(train)), desc="zscore statistics", quiet=self.quiet):
            img = train[i]["image"]
            if c >= img.shape[0]:
                raise ValueError(f"zscore: channel {c} does not exist in training images with {img.shape[0]} channel(s)")
            x = img[c].double()
            if mean is None:
                mean, m2 = torch.zeros_like(x), torch.zeros_like(x)
            elif x.shape != mean.shape:
                raise ValueError(f"zscore: training image {i} has shape {tuple(x.shape)}, the first one {tuple(mean.shape)}; "
                                 "a normative model needs every image on the same grid")
            n += 1
            delta = x - mean
            mean += delta / n
            m2 += delta * (x - mean)
        assert mean is not None and m2 is not None  # the base class refuses empty training data
        self.mean_ = mean.float()
        self.std_ = (m2 / max(n - 1, 1)).sqrt().float()

    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        assert self.mean_ is not None and self.std_ is not None
        if tuple(images.shape[2:]) != tuple(self.mean_.shape):
            raise ValueError(f"zscore: images of spatial shape {tuple(images.shape[2:])}, the model was fitted on "
                             f"{tuple(self.mean_.shape)}")
        c = int(self.params["channel"])
        if c >= images.shape[1]:
            raise ValueError(f"zscore: channel {c} does not exist in images with {images.shape[1]} channel(s)")
        z = (images[:, c].float() - self.mean_) / self.std_.clamp_min(float(self.params["min_std"]))
        sign = int(self.params["sign"])
        maps = z.abs() if sign == 0 else (z * sign).clamp_min(0)
        if foreground is not None:
            maps = maps * foreground[:, 0]
        return AnomalyResult(pixel_scores=maps, image_scores=image_scores(maps, foreground, **self.params["image_score"]))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.mean_ is not None and self.std_ is not None
        return {"mean": self.mean_, "std": self.std_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "std"} - set(tensors)
        if missing:
            raise ValueError(f"zscore: the weights file lacks {sorted(missing)}")
        if tensors["mean"].shape != tensors["std"].shape:
            raise ValueError("zscore: mean and std in the weights file differ in shape")
        self.mean_, self.std_ = tensors["mean"].float(), tensors["std"].float()
