"""``autoencoder``: a small convolutional autoencoder trained on healthy images; the residual is the map.

The network is MONAI's :class:`monai.networks.nets.AutoEncoder` (strided residual conv encoder, transposed-conv
decoder, no skip connections, so everything passes through the bottleneck of ``channels[-1]`` feature maps
at ``1 / prod(strides)`` resolution). Training minimises the L1 or L2 reconstruction error of healthy images
with :func:`medanomaly.training.train_model`; the weights kept are those with the lowest reconstruction error
on the (label-free) validation images. The anomaly map is the channel-mean residual ``|x - x_hat|`` (or its
square), min- then average-filtered and set to 0 outside the foreground.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medanomaly.evaluation.scoring import check_image_score, image_scores
from medanomaly.methods.base import AnomalyResult, Detector, register
from medanomaly.methods.baselines.common import check_smooth, foreground_or_ones, min_avg_smooth
from medanomaly.methods.params import (
    DEVICE,
    IMAGE_SCORE_SCHEMA,
    MAX_WIDTH,
    SEED,
    TRAIN_SPECS,
    Float,
    Int,
    ListOf,
    Options,
    pick,
)

__all__ = ["AutoencoderDetector"]


def _build_net(spatial_dims: int, in_channels: int, p: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import AutoEncoder

    return AutoEncoder(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(int(c) for c in p["channels"]),
        strides=tuple(int(s) for s in p["strides"]),
        num_res_units=int(p["num_res_units"]),
        norm=p["norm"],
        dropout=p["dropout"] or None,
    )


@register
class AutoencoderDetector(Detector):
    """Reconstruction-residual baseline built from MONAI's ``AutoEncoder`` (2D and 3D)."""

    name: ClassVar[str] = "autoencoder"
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {
        "channels": [32, 64, 64, 16],
        "strides": [2, 2, 2, 1],
        "num_res_units": 0,
        "norm": "instance",
        "dropout": 0.0,
        "loss": "l1",  # l1 | l2, also the residual of the map
        "batch_size": 16,
        "predict_batch_size": 32,
        "val_fraction": 0.1,  # held out of train when fit() gets no val set (0: no validation)
        "val_max_images": 256,  # validation uses at most this many images (a fixed, seeded subset)
        "smooth": {"min_size": 3, "avg_size": 5},
        "image_score": {"reduce": "topk", "fraction": 0.01},
        "seed": 0,
        "device": "auto",
        "train": {
            "steps": 2000,
            "lr": 2e-3,
            "weight_decay": 1e-5,
            "betas": [0.9, 0.999],
            "warmup_steps": 50,
            "schedule": "cosine",
            "min_lr_ratio": 0.0,
            "grad_clip": 1.0,
            "val_every": 100,
            "early_stopping_patience": 0,
            "checkpoint_every": 200,
            "amp": True,
            "deterministic": False,
        },
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`); channels/strides lengths and odd smoothing
    #: sizes are checked in ``__init__``
    parameter_schema: ClassVar[dict[str, Any]] = {
        "channels": ListOf(Int(1, MAX_WIDTH), 1, 16),
        "strides": ListOf(Int(1, 8), 1, 16),
        "num_res_units": Int(0, 16),
        "norm": Options("instance", "batch"),
        "dropout": Float(0, 1, closed="left"),
        "loss": Options("l1", "l2"),
        "batch_size": Int(1, 65536),
        "predict_batch_size": Int(1, 65536),
        "val_fraction": Float(0, 1, closed="left"),
        "val_max_images": Int(1, 10**7),
        "smooth": {"min_size": Int(1, 99), "avg_size": Int(1, 99)},
        "image_score": IMAGE_SCORE_SCHEMA,
        "seed": SEED,
        "device": DEVICE,
        "train": pick(TRAIN_SPECS, defaults["train"]),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p["loss"] not in ("l1", "l2"):
            raise ValueError(f"autoencoder: loss must be 'l1' or 'l2', got '{p['loss']}'")
        if len(p["channels"]) != len(p["strides"]) or not p["channels"]:
            raise ValueError(f"autoencoder: channels {p['channels']} and strides {p['strides']} must have the same length")
        if not 0 <= float(p["val_fraction"]) < 1:
            raise ValueError(f"autoencoder: val_fraction must be in [0, 1), got {p['val_fraction']}")
        check_image_score(p["image_score"], "autoencoder")
        check_smooth("autoencoder", p["smooth"])
        from medanomaly.training import config_from_dict

        self._train_cfg = config_from_dict(dict(p["train"]))  # unknown training keys fail here, not after loading data
        self.net: nn.Module | None = None
        self.spatial_dims: int | None = None
        self.in_channels: int | None = None

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def multiple(self) -> int:
        return int(np.prod([int(s) for s in self.params["strides"]]))

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Pad spatial dims up to a multiple of the total stride (replicate), return the original size."""
        size = tuple(x.shape[2:])
        m = self.multiple
        pad: list[int] = []
        for s in reversed(size):
            extra = (-s) % m
            pad += [extra // 2, extra - extra // 2]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return x, size

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        xp, size = self._pad(x)
        out = self.net(xp)
        offs = [(out.shape[2 + i] - size[i]) // 2 for i in range(len(size))]
        return out[(slice(None), slice(None), *[slice(o, o + s) for o, s in zip(offs, size, strict=True)])]

    def _residual(self, x: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        d = (x - xr).abs() if self.params["loss"] == "l1" else (x - xr) ** 2
        return d.mean(1)

    # -- contract ---------------------------------------------------------------------------------
    def _fit(self, train: Any, val: Any | None = None) -> None:
        """Train on ``train`` (healthy images; only ``image``/``foreground`` are read)."""
        from medanomaly.training import BatchSampler, get_device, train_model
        from medanomaly.training.loop import seed_everything

        p = self.params
        if len(train) == 0:
            raise ValueError("autoencoder: the training set is empty")
        first = train[0]["image"]
        sd = first.ndim - 1
        if sd not in self.spatial_dims_supported:
            raise ValueError(f"autoencoder: images must be (C, H, W) or (C, D, H, W), got a sample of shape {tuple(first.shape)}")
        if val is None and float(p["val_fraction"]) > 0 and len(train) >= 4:
            train, val = _split_by_case(train, float(p["val_fraction"]), int(p["seed"]))
        self.spatial_dims, self.in_channels = sd, int(first.shape[0])
        seed_everything(int(p["seed"]))
        self.net = _build_net(sd, self.in_channels, p)
        device = get_device(p["device"])
        cfg = dataclasses.replace(self._train_cfg, seed=int(p["seed"]), device=str(p["device"]), quiet=self.quiet,
                                  desc="autoencoder")
        sampler = BatchSampler(train, int(p["batch_size"]), seed=int(p["seed"]), quiet=self.quiet)
        loss_kind = p["loss"]

        def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x = batch["image"].to(device, non_blocking=True)
            xp, _ = self._pad(x)
            xr = model(xp)
            return F.l1_loss(xr.float(), xp) if loss_kind == "l1" else F.mse_loss(xr.float(), xp)

        val_fn = None
        if val is not None and len(val) > 0 and cfg.val_every:
            vidx = np.arange(len(val))
            if len(vidx) > int(p["val_max_images"]):
                rng = np.random.default_rng([int(p["seed"]), 1])
                vidx = np.sort(rng.choice(len(val), int(p["val_max_images"]), replace=False))
            vimgs = torch.stack([val[int(i)]["image"] for i in vidx])
            vfg = torch.stack([val[int(i)].get("foreground", torch.ones_like(val[int(i)]["image"][:1], dtype=torch.bool))
                               for i in vidx])[:, 0]

            def val_fn(model: nn.Module) -> float:
                """Mean foreground reconstruction error of the validation images (no labels involved)."""
                tot, n = 0.0, 0.0
                for s in range(0, len(vimgs), int(p["predict_batch_size"])):
                    x = vimgs[s:s + int(p["predict_batch_size"])].to(device)
                    f = vfg[s:s + int(p["predict_batch_size"])].to(device)
                    r = self._residual(x, self._reconstruct(x).float())
                    tot += float((r * f).sum())
                    n += float(f.sum())
                return tot / max(n, 1.0)

        result = train_model(self.net, loss_fn, sampler, cfg, run_dir=self.work_dir, val_fn=val_fn,
                             name="autoencoder", resume=self.resume)
        self.train_log = [{"stage": "autoencoder", **r} for r in result.history]
        self.net.to("cpu").eval()

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        from medanomaly.training import get_device

        assert self.net is not None
        if images.ndim - 2 != self.spatial_dims or images.shape[1] != self.in_channels:
            raise ValueError(f"autoencoder: trained on {self.in_channels}-channel {self.spatial_dims}D images, "
                             f"got images of shape {tuple(images.shape)}")
        device = get_device(self.params["device"])
        self.net.to(device).eval()
        bs = int(self.params["predict_batch_size"])
        maps, recs = [], []
        for s in range(0, images.shape[0], bs):
            x = images[s:s + bs].to(device, torch.float32)
            xr = self._reconstruct(x).float()
            maps.append(self._residual(x, xr).cpu())
            recs.append(xr.cpu())
        m = torch.cat(maps)
        sm = self.params["smooth"]
        m = min_avg_smooth(m, int(sm["min_size"]), int(sm["avg_size"]))
        fg = foreground_or_ones(images, foreground).cpu()
        m = torch.where(fg, m, torch.zeros_like(m)).float()
        scores = image_scores(m, fg, **self.params["image_score"])
        rec = torch.cat(recs)  # the healthy-looking image, at the input size (extras["restoration"] convention)
        return AnomalyResult(pixel_scores=m, image_scores=scores, extras={"reconstruction": rec, "restoration": rec})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.net is not None
        meta = torch.tensor([int(self.spatial_dims or 0), int(self.in_channels or 0)], dtype=torch.int64)
        return {"meta.spatial_dims_in_channels": meta, **{f"net.{k}": v for k, v in self.net.state_dict().items()}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        if not sd:
            raise ValueError("autoencoder: the weights file holds no 'net.*' tensors")
        meta = tensors.get("meta.spatial_dims_in_channels")
        if meta is None or meta.numel() != 2:
            raise ValueError("autoencoder: the weights file has no 'meta.spatial_dims_in_channels' entry")
        self.spatial_dims, self.in_channels = int(meta[0]), int(meta[1])
        self.net = _build_net(self.spatial_dims, self.in_channels, self.params)
        self.net.load_state_dict(sd)
        self.net.eval()


def _split_by_case(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the cases (patients) of ``ds`` for validation; no labels involved."""
    case_of = [str(getattr(ds, "case_ids", None)[i]) if getattr(ds, "case_ids", None) is not None else str(ds[i]["case_id"])
               for i in range(len(ds))]
    cases = sorted(set(case_of))
    rng = np.random.default_rng([seed, 2])
    if len(cases) >= 2:
        n_val = max(1, math.floor(fraction * len(cases) + 0.5))
        held = set(rng.permutation(cases)[:n_val].tolist())
        vidx = [i for i, c in enumerate(case_of) if c in held]
    else:
        vidx = sorted(rng.permutation(len(ds))[: max(1, int(fraction * len(ds)))].tolist())
    tidx = sorted(set(range(len(ds))) - set(vidx))
    return ds.subset(tidx), ds.subset(vidx)
