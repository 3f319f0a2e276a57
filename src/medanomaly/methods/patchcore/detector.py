"""``patchcore``: PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

No ImageNet weights exist here, so the feature extractor is our own self-supervised encoder: the encoder half of
the ``autoencoder`` baseline (MONAI ``AutoEncoder``), pre-trained on the healthy training images by reconstruction.
It is chosen over the MAE encoder because a strided conv encoder gives dense, translation-equivariant feature maps
at several resolutions (the paper's mid-level ``layer2``/``layer3``) in 2D and 3D for a few conv layers, while the
ViT gives one token grid at the patch size, 2D only, at transformer cost.

Following the paper: the outputs of the encoder layers ``layers`` are resampled to the finest of them, each
averaged over a ``patch_size`` neighbourhood (local aggregation) and concatenated; the memory bank is a greedy
k-center coreset (``coreset_fraction`` of the healthy foreground patches, distances on a random Gaussian
projection to ``projection_dim``); the map is each patch's distance to its nearest memory-bank patch, upsampled
(bilinear) to the image, Gaussian-smoothed (``sigma`` pixels) and 0 outside the foreground. The image score is the
project's rule (``image_score``; the paper's is the max, without its nearest-neighbour reweighting).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medanomaly.evaluation.postprocess import gaussian_smooth
from medanomaly.evaluation.scoring import check_image_score, image_scores
from medanomaly.methods.base import AnomalyResult, Detector, register
from medanomaly.methods.baselines.autoencoder import AutoencoderDetector
from medanomaly.methods.baselines.common import foreground_or_ones
from medanomaly.methods.params import DEVICE, IMAGE_SCORE_SCHEMA, SEED, Float, Int, ListOf
from medanomaly.training.progress import track

__all__ = ["PatchCoreDetector", "greedy_coreset"]

#: the autoencoder parameters that make up the encoder section (the rest of its parameters keep their defaults)
_ENCODER_KEYS = ("channels", "strides", "num_res_units", "norm", "dropout", "loss", "batch_size", "val_fraction",
                 "val_max_images", "train")


def greedy_coreset(features: torch.Tensor, k: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` (N, D) chosen by greedy k-center selection (the paper's Algorithm 1).

    Start from a random row; repeatedly add the row farthest from those chosen, which keeps the largest distance
    of any row to its nearest chosen row within twice the optimum. Distances are computed on a random Gaussian
    projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss), none when ``projection_dim`` is 0 or >= D.
    """
    n, d = features.shape
    k = max(1, min(int(k), n))
    gen = torch.Generator().manual_seed(int(seed))
    x = features.float()
    if 0 < projection_dim < d:
        x = x @ (torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim))
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(k, dtype=torch.int64)
    chosen[0] = first
    min_d = ((x - x[first]) ** 2).sum(1)
    for i in range(1, k):
        j = int(torch.argmax(min_d))
        chosen[i] = j
        min_d = torch.minimum(min_d, ((x - x[j]) ** 2).sum(1))
    return chosen


@register
class PatchCoreDetector(Detector):
    """PatchCore: nearest-neighbour distance of locally aggregated patch features to a coreset of healthy patches."""

    name: ClassVar[str] = "patchcore"
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {
        "encoder": {k: AutoencoderDetector.defaults[k] for k in _ENCODER_KEYS},
        "layers": [1, 2],  # encoder layers (0-based) whose outputs are the patch features (mid-level ones)
        "patch_size": 3,  # local neighbourhood aggregation: average over patch_size^dims feature positions
        "coreset_fraction": 0.1,  # memory bank: this fraction of the (subsampled) training patches
        "max_patches": 40000,  # training patches the coreset is chosen from (random, an equal share per image)
        "projection_dim": 128,  # random projection for the coreset distances (0: none)
        "sigma": 4.0,  # Gaussian smoothing of the upsampled map, in pixels (0: none)
        "predict_batch_size": 32,
        "image_score": {"reduce": "max", "fraction": 0.01},
        "seed": 0,
        "device": "auto",
    }
    parameter_schema: ClassVar[dict[str, Any]] = {
        "encoder": {k: AutoencoderDetector.parameter_schema[k] for k in _ENCODER_KEYS},
        "layers": ListOf(Int(0, 15), 1, 16),
        "patch_size": Int(1, 99),
        "coreset_fraction": Float(0, 1, closed="right"),
        "max_patches": Int(1, 10**8),
        "projection_dim": Int(0, 65536),
        "sigma": Float(0, None),
        "predict_batch_size": Int(1, 65536),
        "image_score": IMAGE_SCORE_SCHEMA,
        "seed": SEED,
        "device": DEVICE,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        check_image_score(p["image_score"], self.name)
        if p["patch_size"] % 2 == 0:
            raise ValueError(f"patchcore: patch_size must be odd, got {p['patch_size']}")
        if max(p["layers"]) >= len(p["encoder"]["channels"]) or len(set(p["layers"])) != len(p["layers"]):
            raise ValueError(f"patchcore: layers {p['layers']} must be distinct indices of the "
                             f"{len(p['encoder']['channels'])} encoder layers")
        self.ae = self._autoencoder()  # checks the encoder section at construction
        self.memory_bank_: torch.Tensor | None = None

    def _autoencoder(self) -> AutoencoderDetector:
        p = self.params
        return AutoencoderDetector(**p["encoder"], seed=p["seed"], device=p["device"])

    # -- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, C, *S) images -> (B, D, *h) aggregated patch features on the padded grid, and the padded size."""
        net = self.ae.net
        assert net is not None
        xp, _ = self.ae._pad(x)
        nd = x.ndim - 2
        outs, h = [], xp
        for i, layer in enumerate(net.encode):  # type: ignore[union-attr]
            h = layer(h)
            if i in self.params["layers"]:
                outs.append(h.float())
            if i >= max(self.params["layers"]):
                break
        grid = tuple(outs[0].shape[2:]) if len(outs) == 1 else tuple(max(o.shape[2 + d] for o in outs) for d in range(nd))
        mode = "bilinear" if nd == 2 else "trilinear"
        k = int(self.params["patch_size"])
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        feats = []
        for o in outs:
            if tuple(o.shape[2:]) != grid:
                o = F.interpolate(o, size=grid, mode=mode, align_corners=False)
            feats.append(pool(o, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else o)
        return torch.cat(feats, 1), tuple(xp.shape[2:])

    def _patch_foreground(self, fg: torch.Tensor, padded: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
        """(B, *S) bool foreground -> (B, *h): patches at least half inside the foreground."""
        f = fg[:, None].float()
        pad: list[int] = []
        for s, t in zip(reversed(fg.shape[1:]), reversed(padded), strict=True):
            pad += [(t - s) // 2, (t - s) - (t - s) // 2]
        f = F.pad(f, pad)
        return F.interpolate(f, size=grid, mode="area")[:, 0] >= 0.5

    # -- contract ---------------------------------------------------------------------------------
    def _fit(self, train: Any, val: Any | None = None) -> None:
        """Pre-train the encoder (the autoencoder baseline's training), then build the coreset memory bank."""
        from medanomaly.training import get_device

        p = self.params
        self.ae = self._autoencoder()
        self.ae.context_ = self.context_
        self.ae._fit(train, val)
        self.train_log = [{**r, "stage": "encoder"} for r in self.ae.train_log]
        device = get_device(p["device"])
        self.ae.net.to(device).eval()  # type: ignore[union-attr]
        gen = torch.Generator().manual_seed(int(p["seed"]))
        per_image = max(1, math.ceil(int(p["max_patches"]) / len(train)))
        bank: list[torch.Tensor] = []
        bs = int(p["predict_batch_size"])
        for s in track(range(0, len(train), bs), desc="patchcore features", quiet=self.quiet):
            samples = [train[i] for i in range(s, min(s + bs, len(train)))]
            x = torch.stack([smp["image"] for smp in samples]).float()
            fg = torch.stack([smp.get("foreground", torch.ones_like(smp["image"][:1], dtype=torch.bool))
                              for smp in samples])
            feats, padded = self._features(x.to(device))
            feats = feats.cpu()
            pfg = self._patch_foreground(fg[:, 0], padded, tuple(feats.shape[2:]))
            for b in range(feats.shape[0]):
                f = feats[b].flatten(1).T  # (h*w, D)
                keep = pfg[b].flatten()
                f = f[keep] if keep.any() else f
                if len(f) > per_image:
                    f = f[torch.randperm(len(f), generator=gen)[:per_image]]
                bank.append(f)
        allf = torch.cat(bank)
        k = max(1, round(float(p["coreset_fraction"]) * len(allf)))
        idx = greedy_coreset(allf, k, int(p["projection_dim"]), seed=int(p["seed"]))
        self.memory_bank_ = allf[idx].contiguous()
        self.train_log.append({"stage": "coreset", "patches": len(allf), "memory_bank": int(k),
                               "feature_dim": int(allf.shape[1])})
        self.ae.net.to("cpu")  # type: ignore[union-attr]

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        from medanomaly.training import get_device

        assert self.memory_bank_ is not None and self.ae.net is not None
        if images.ndim - 2 != self.ae.spatial_dims or images.shape[1] != self.ae.in_channels:
            raise ValueError(f"patchcore: fitted on {self.ae.in_channels}-channel {self.ae.spatial_dims}D images, "
                             f"got images of shape {tuple(images.shape)}")
        device = get_device(self.params["device"])
        self.ae.net.to(device).eval()
        bank = self.memory_bank_.to(device)
        nd = images.ndim - 2
        size = tuple(images.shape[2:])
        bs = int(self.params["predict_batch_size"])
        maps = []
        for s in range(0, images.shape[0], bs):
            feats, padded = self._features(images[s:s + bs].to(device, torch.float32))
            grid = tuple(feats.shape[2:])
            q = feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1])
            dist = torch.cat([torch.cdist(c, bank).min(1).values for c in q.split(4096)])
            m = dist.reshape(feats.shape[0], 1, *grid)
            m = F.interpolate(m, size=padded, mode="bilinear" if nd == 2 else "trilinear", align_corners=False)
            offs = [(t - o) // 2 for t, o in zip(padded, size, strict=True)]
            maps.append(m[(slice(None), 0, *[slice(o, o + n) for o, n in zip(offs, size, strict=True)])].cpu())
        self.ae.net.to("cpu")
        out = torch.cat(maps)
        if float(self.params["sigma"]) > 0:
            out = gaussian_smooth(out, float(self.params["sigma"]), spatial_dims=nd)
        fg = foreground_or_ones(images, foreground).cpu()
        out = torch.where(fg, out, torch.zeros_like(out)).float()
        return AnomalyResult(pixel_scores=out, image_scores=image_scores(out, fg, **self.params["image_score"]))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.memory_bank_ is not None
        return {**self.ae.state_tensors(), "memory_bank": self.memory_bank_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "memory_bank" not in tensors:
            raise ValueError("patchcore: the weights file lacks 'memory_bank'")
        self.ae = self._autoencoder()
        self.ae.load_state_tensors({k: v for k, v in tensors.items() if k != "memory_bank"})
        self.memory_bank_ = tensors["memory_bank"].float()
