"""``intensity``: the normalised image intensity inside the foreground is the anomaly score."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from medanomaly.evaluation.scoring import check_image_score, image_scores
from medanomaly.methods.base import AnomalyResult, Detector, register
from medanomaly.methods.baselines.common import check_smooth, foreground_or_ones, min_avg_smooth
from medanomaly.methods.params import IMAGE_SCORE_SCHEMA, MAX_WIDTH, SEED, Int, Options
from medanomaly.training.progress import track

__all__ = ["IntensityDetector"]

NORMALISE = ("image", "dataset", "none")


@register
class IntensityDetector(Detector):
    """Score = ``sign`` x normalised intensity, inside the foreground.

    ``normalise``: ``"image"`` z-scores each image over its own foreground; ``"dataset"`` z-scores with the
    mean/std of foreground intensities of the (healthy) training images, computed in ``fit``; ``"none"`` uses the
    preprocessed intensity. Nothing label-related is read. Multi-channel images use channel ``channel``
    (-1: the channel mean). Outside the foreground the map is set to its lowest foreground value.
    """

    name: ClassVar[str] = "intensity"
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {
        "sign": 1,
        "normalise": "image",
        "channel": 0,
        "smooth": {"min_size": 1, "avg_size": 1},
        "image_score": {"reduce": "topk", "fraction": 0.01},
        "seed": 0,
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`); smoothing sizes must also be odd
    parameter_schema: ClassVar[dict[str, Any]] = {
        "sign": Options(1, -1),
        "normalise": Options(*NORMALISE),
        "channel": Int(-1, MAX_WIDTH - 1),  # -1: the channel mean
        "smooth": {"min_size": Int(1, 99), "avg_size": Int(1, 99)},
        "image_score": IMAGE_SCORE_SCHEMA,
        "seed": SEED,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p["sign"] not in (1, -1):
            raise ValueError(f"intensity: sign must be +1 or -1, got {p['sign']}")
        if p["normalise"] not in NORMALISE:
            raise ValueError(f"intensity: normalise must be one of {NORMALISE}, got '{p['normalise']}'")
        check_image_score(p["image_score"], "intensity")
        check_smooth("intensity", p["smooth"])
        self.stats: dict[str, float] = {}

    def _channel(self, images: torch.Tensor) -> torch.Tensor:
        c = int(self.params["channel"])
        if c == -1:
            return images.mean(1)
        if not -images.shape[1] <= c < images.shape[1]:
            raise ValueError(f"intensity: channel {c} does not exist in images with {images.shape[1]} channel(s)")
        return images[:, c]

    def _fit(self, train: Any, val: Any | None = None) -> None:
        """Only for ``normalise="dataset"``: mean/std of foreground intensities of the training images."""
        self.stats = {}
        if self.params["normalise"] == "dataset":
            if len(train) == 0:
                raise ValueError("intensity: the training set is empty")
            s = s2 = n = 0.0
            for i in track(range(len(train)), desc="intensity stats", quiet=self.quiet):
                sample = train[i]
                img = self._channel(sample["image"][None].double())[0]
                fg = sample.get("foreground")
                v = img[fg[0].bool()] if fg is not None else img.reshape(-1)
                s, s2, n = s + float(v.sum()), s2 + float((v * v).sum()), n + v.numel()
            if n == 0:
                raise ValueError("intensity: the training images have no foreground voxels")
            mean = s / n
            self.stats = {"mean": mean, "std": max((s2 / n - mean * mean), 0.0) ** 0.5 or 1.0}

    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x = self._channel(images.detach().double())
        fg = foreground_or_ones(images, foreground)
        how = self.params["normalise"]
        if how == "image":
            w = fg.double()
            n = w.flatten(1).sum(1).clamp_min(1)
            mean = (x * w).flatten(1).sum(1) / n
            var = (((x - _bc(mean, x)) ** 2) * w).flatten(1).sum(1) / n
            x = (x - _bc(mean, x)) / _bc(var.sqrt().clamp_min(1e-6), x)
        elif how == "dataset":
            x = (x - self.stats["mean"]) / self.stats["std"]
        x = x * int(self.params["sign"])
        sm = self.params["smooth"]
        x = min_avg_smooth(x, int(sm["min_size"]), int(sm["avg_size"]))
        low = torch.where(fg, x, torch.full_like(x, float("inf"))).flatten(1).amin(1)
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
        maps = torch.where(fg, x, _bc(low, x)).float()
        scores = image_scores(maps, fg, **self.params["image_score"])
        return AnomalyResult(pixel_scores=maps, image_scores=scores)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"intensity keeps no tensors, but the weights file holds {sorted(tensors)[:3]}")

    def extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stats = dict(state.get("stats", {}))
        if self.params["normalise"] == "dataset" and not {"mean", "std"} <= set(self.stats):
            raise ValueError("intensity: normalise='dataset' but state.json has no dataset statistics")


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable to ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))
