"""``patchcore``: PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

No ImageNet weights exist here, so the feature extractor is one of our own encoders trained on the healthy
training images (``backbone``):

- ``multitask``: the encoder half of one ``multitask`` U-Net (MONAI ``DynUNet`` with positional channels), trained
  on synthetic anomalies of the first task of ``multitask.tasks.names`` (member 0 of the ``multitask`` method:
  ``intra-blend`` by default) with the ``multitask`` section's settings; layer ``i`` is the output of its
  ``i``-th downsampling stage (stride ``2 ** (i + 1)``; the last is the bottleneck);
- ``autoencoder``: the encoder half of the ``autoencoder`` baseline (MONAI ``AutoEncoder``), pre-trained by
  reconstruction with the ``encoder`` section's settings; layer ``i`` is its ``i``-th conv layer. Its default
  normalisation is batch norm: with instance norm (the autoencoder baseline's default) every feature is normalised
  by statistics over the whole image, background included, so the same brain patch gets larger features when
  the brain fills less of the image and small slices score highest (issue 14; docs/results/patchcore_defect.md).

Following the paper: the outputs of the layers ``layers`` are each averaged over a ``patch_size`` neighbourhood
(local aggregation), resampled to the finest of them and concatenated; optionally each feature is standardised
with the mean and std of the training patches (``standardise``). The memory bank is a greedy k-center coreset
(``coreset_fraction`` of the healthy foreground patches, distances on a random Gaussian projection to
``projection_dim``). A patch's score is its distance to its nearest memory-bank patch.

The map only uses foreground patches (those at least half inside the foreground, the patches the bank is made
of): each pixel is the foreground-weighted bilinear interpolation of the patch scores (normalised convolution;
a patch weighs by the share of it inside the foreground), Gaussian-smoothed (``sigma`` pixels) within the
foreground, and 0 outside it. Background patches, which are far from every bank patch, therefore do not leak
into the brain's edge. The image score is the project's rule (``image_score``; the paper's is the max, without
its nearest-neighbour reweighting).
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
from medanomaly.methods.multitask.detector import MultiTaskDetector
from medanomaly.methods.params import DEVICE, IMAGE_SCORE_SCHEMA, SEED, Bool, Float, Int, ListOf, Options
from medanomaly.training.progress import track

__all__ = ["PatchCoreDetector", "greedy_coreset", "foreground_patch_map"]

#: the autoencoder parameters that make up the encoder section (the rest of its parameters keep their defaults)
_ENCODER_KEYS = ("channels", "strides", "num_res_units", "norm", "dropout", "loss", "batch_size", "val_fraction",
                 "val_max_images", "train")
#: the multitask parameters that make up the multitask section (its training device is patchcore's ``device``)
_MULTITASK_KEYS = ("model", "tasks", "fold_seed", "flip_prob", "augment", "loss", "train", "val_samples",
                   "val_metric", "num_workers", "reuse_members_from")


def _section(table: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = {k: table[k] for k in keys}
    if "device" in out.get("train", {}):
        out["train"] = {k: v for k, v in out["train"].items() if k != "device"}
    return out


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


def foreground_patch_map(scores: torch.Tensor, weights: torch.Tensor, foreground: torch.Tensor,
                         padded: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Patch scores -> pixel map from the foreground patches only (normalised convolution).

    Args:
        scores: (B, *h) patch scores on the grid of the padded image.
        weights: (B, *h) share of each patch inside the foreground (0: a background patch, which is ignored).
        foreground: (B, *S) bool foreground of the unpadded images.
        padded: the padded image size the grid covers (centred padding, as the encoders pad).
        sigma: Gaussian smoothing in pixels (0: none), within the foreground.

    Returns:
        (B, *S) float map: ``smooth(up(w * s) * fg) / smooth(up(w) * fg)`` on the foreground (``up``: bilinear),
        0 outside it. A background patch's score never reaches the map.
    """
    nd = scores.ndim - 1
    size = tuple(foreground.shape[1:])
    mode = "bilinear" if nd == 2 else "trilinear"
    w = weights.float()[:, None]
    num = F.interpolate(scores.float()[:, None] * w, size=padded, mode=mode, align_corners=False)
    den = F.interpolate(w, size=padded, mode=mode, align_corners=False)
    offs = [(t - o) // 2 for t, o in zip(padded, size, strict=True)]
    crop = (slice(None), 0, *[slice(o, o + n) for o, n in zip(offs, size, strict=True)])
    num, den = num[crop], den[crop]
    fg = foreground.to(num.device, torch.bool)
    num, den = num * fg, den * fg
    if sigma > 0:
        num = gaussian_smooth(num, float(sigma), spatial_dims=nd)
        den = gaussian_smooth(den, float(sigma), spatial_dims=nd)
    ok = fg & (den > 1e-8)
    return torch.where(ok, num / den.clamp_min(1e-8), torch.zeros_like(num)).float()


@register
class PatchCoreDetector(Detector):
    """PatchCore: nearest-neighbour distance of locally aggregated patch features to a coreset of healthy patches."""

    name: ClassVar[str] = "patchcore"
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = {
        # "autoencoder" stays the default so that run folders of earlier versions (whose config.yaml has no
        # backbone key) load as they were trained; the shipped cpu-small configuration uses "multitask"
        "backbone": "autoencoder",  # autoencoder | multitask: the encoder whose features are the patches
        "encoder": {**_section(AutoencoderDetector.defaults, _ENCODER_KEYS), "norm": "batch"},
        "multitask": _section(MultiTaskDetector.defaults, _MULTITASK_KEYS),
        "layers": [0, 1],  # encoder layers (0-based) whose outputs are the patch features (stride 2 and 4)
        "patch_size": 3,  # local neighbourhood aggregation: average over patch_size^dims feature positions
        "standardise": False,  # z-score each feature with the training patches' mean and std
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
        "backbone": Options("autoencoder", "multitask"),
        "encoder": _section(AutoencoderDetector.parameter_schema, _ENCODER_KEYS),
        "multitask": _section(MultiTaskDetector.parameter_schema, _MULTITASK_KEYS),
        "layers": ListOf(Int(0, 15), 1, 16),
        "patch_size": Int(1, 99),
        "standardise": Bool(),
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
        if p["backbone"] == "autoencoder":
            n_layers, what = len(p["encoder"]["channels"]), "encoder"
        else:
            n_layers, what = int(p["multitask"]["model"]["depth"]) - 1, "multitask encoder (model.depth - 1)"
        if max(p["layers"]) >= n_layers or len(set(p["layers"])) != len(p["layers"]):
            raise ValueError(f"patchcore: layers {p['layers']} must be distinct indices of the {n_layers} "
                             f"{what} layers")
        self.ae = self._autoencoder()  # checks the encoder section at construction
        self.mt = self._multitask()  # checks the multitask section at construction
        self.memory_bank_: torch.Tensor | None = None
        self.feature_mean_: torch.Tensor | None = None
        self.feature_std_: torch.Tensor | None = None

    def _autoencoder(self) -> AutoencoderDetector:
        p = self.params
        return AutoencoderDetector(**p["encoder"], seed=p["seed"], device=p["device"])

    def _multitask(self) -> MultiTaskDetector:
        return MultiTaskDetector(**self._multitask_params(self.params))

    @staticmethod
    def _multitask_params(p: dict[str, Any]) -> dict[str, Any]:
        """The parameters of the multitask backbone (member 0 of a ``multitask`` run with the section's settings)."""
        sec = p["multitask"]
        return {**sec, "train": {**sec["train"], "device": p["device"]}, "members": [0], "seed": p["seed"],
                "predict": {"batch_size": int(p["predict_batch_size"])}}

    #: ranked after ``multitask`` (0), so a benchmark trains the multitask run first and the backbone reuses its
    #: member 0 when the settings are equal
    share_priority: ClassVar[int] = 1

    @classmethod
    def shared_parts(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The multitask backbone is a multitask member: with equal settings, it is the part a ``multitask`` run
        of the same benchmark has already trained (shared as that run's members, keyed the same way)."""
        if params.get("backbone") != "multitask":
            return {}
        mt = MultiTaskDetector(**cls._multitask_params(params)).params
        return MultiTaskDetector.shared_parts(mt)

    @classmethod
    def reuse_parts(cls, parts: list[str], run_dir: str) -> dict[str, Any]:
        return {"multitask.reuse_members_from": run_dir}

    @classmethod
    def data_sources(cls, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The multitask backbone's extra images (inter-blend sources), when it uses them."""
        if params.get("backbone") != "multitask":
            return {}
        return MultiTaskDetector.data_sources(params["multitask"])

    # -- features ---------------------------------------------------------------------------------
    def _layer_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """The selected layers' outputs for (B, C, *S) images, and the padded image size they cover."""
        layers = self.params["layers"]
        outs: list[torch.Tensor] = []
        if self.params["backbone"] == "autoencoder":
            net = self.ae.net
            assert net is not None
            h, _ = self.ae._pad(x)
            padded = tuple(h.shape[2:])
            blocks = list(net.encode)  # type: ignore[union-attr]
        else:
            model = self.mt.models[0]
            h = model.network_input(x)
            padded = tuple(h.shape[2:])
            h = model.net.input_block(h)
            blocks = [*model.net.downsamples, model.net.bottleneck]
        for i, block in enumerate(blocks):
            h = block(h)
            if i in layers:
                outs.append(h.float())
            if i >= max(layers):
                break
        return outs, padded

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, C, *S) images -> (B, D, *h) aggregated patch features on the padded grid, and the padded size.

        Raw features (``standardise`` is applied by the caller with the fitted statistics)."""
        outs, padded = self._layer_outputs(x)
        nd = x.ndim - 2
        grid = tuple(max(o.shape[2 + d] for o in outs) for d in range(nd))
        mode = "bilinear" if nd == 2 else "trilinear"
        k = int(self.params["patch_size"])
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        feats = []
        for o in outs:
            if k > 1:
                o = pool(o, k, stride=1, padding=k // 2, count_include_pad=False)
            if tuple(o.shape[2:]) != grid:
                o = F.interpolate(o, size=grid, mode=mode, align_corners=False)
            feats.append(o)
        return torch.cat(feats, 1), padded

    def _patch_weights(self, fg: torch.Tensor, padded: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
        """(B, *S) bool foreground -> (B, *h): the share of each patch inside the foreground."""
        f = fg[:, None].float()
        pad: list[int] = []
        for s, t in zip(reversed(fg.shape[1:]), reversed(padded), strict=True):
            pad += [(t - s) // 2, (t - s) - (t - s) // 2]
        f = F.pad(f, pad)
        return F.interpolate(f, size=grid, mode="area")[:, 0]

    def _patch_foreground(self, fg: torch.Tensor, padded: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
        """(B, *S) bool foreground -> (B, *h): patches at least half inside the foreground."""
        return self._patch_weights(fg, padded, grid) >= 0.5

    def _net_to(self, device: Any) -> None:
        if self.params["backbone"] == "autoencoder":
            self.ae.net.to(device).eval()  # type: ignore[union-attr]
        else:
            self.mt.models[0].to(device).eval()

    # -- contract ---------------------------------------------------------------------------------
    def _fit(self, train: Any, val: Any | None = None, **sources: Any) -> None:
        """Train the backbone on the healthy images, then build the coreset memory bank."""
        p = self.params
        if p["backbone"] == "autoencoder":
            self.ae = self._autoencoder()
            self.ae.context_ = self.context_
            self.ae._fit(train, val)
            self.train_log = [{**r, "stage": "encoder"} for r in self.ae.train_log]
        else:
            self.mt = self._multitask()
            self.mt.context_ = self.context_
            self.mt._fit(train, val, **sources)
            self.train_log = [{**r, "stage": "encoder"} for r in self.mt.train_log]
        self.train_log.append(self._build_bank(train))

    def _build_bank(self, train: Any) -> dict[str, Any]:
        """The coreset memory bank (and feature statistics) from the foreground patches of ``train``, with the
        fitted backbone; returns the log record. Also used to try bank settings on a trained backbone."""
        from medanomaly.training import get_device

        p = self.params
        device = get_device(p["device"])
        self._net_to(device)
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
        if p["standardise"]:
            self.feature_mean_ = allf.mean(0)
            self.feature_std_ = allf.std(0).clamp_min(1e-6) if len(allf) > 1 else torch.ones(allf.shape[1])
        else:
            self.feature_mean_, self.feature_std_ = torch.zeros(allf.shape[1]), torch.ones(allf.shape[1])
        allf = (allf - self.feature_mean_) / self.feature_std_
        k = max(1, round(float(p["coreset_fraction"]) * len(allf)))
        idx = greedy_coreset(allf, k, int(p["projection_dim"]), seed=int(p["seed"]))
        self.memory_bank_ = allf[idx].contiguous()
        self._net_to("cpu")
        return {"stage": "coreset", "patches": len(allf), "memory_bank": int(k), "feature_dim": int(allf.shape[1])}

    @torch.no_grad()
    def _patch_scores(self, images: torch.Tensor, device: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, *h) nearest-neighbour distances of the (standardised) patch features, and the padded size."""
        assert self.memory_bank_ is not None and self.feature_mean_ is not None and self.feature_std_ is not None
        bank = self.memory_bank_.to(device)
        mean, std = self.feature_mean_.to(device), self.feature_std_.to(device)
        feats, padded = self._features(images.to(device, torch.float32))
        q = (feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]) - mean) / std
        dist = torch.cat([torch.cdist(c, bank).min(1).values for c in q.split(4096)])
        return dist.reshape(feats.shape[0], *feats.shape[2:]), padded

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        from medanomaly.training import get_device

        assert self.memory_bank_ is not None
        if self.params["backbone"] == "autoencoder":
            assert self.ae.net is not None
            dims, chans = self.ae.spatial_dims, self.ae.in_channels
        else:
            assert self.mt.models
            dims, chans = self.mt.spatial_dims_, self.mt.in_channels_
        if images.ndim - 2 != dims or images.shape[1] != chans:
            raise ValueError(f"patchcore: fitted on {chans}-channel {dims}D images, "
                             f"got images of shape {tuple(images.shape)}")
        device = get_device(self.params["device"])
        self._net_to(device)
        fg = foreground_or_ones(images, foreground).cpu()
        bs = int(self.params["predict_batch_size"])
        maps = []
        for s in range(0, images.shape[0], bs):
            dist, padded = self._patch_scores(images[s:s + bs], device)
            dist = dist.cpu()
            w = self._patch_weights(fg[s:s + bs], padded, tuple(dist.shape[1:]))
            maps.append(foreground_patch_map(dist, w, fg[s:s + bs], padded, float(self.params["sigma"])))
        self._net_to("cpu")
        out = torch.cat(maps)
        return AnomalyResult(pixel_scores=out, image_scores=image_scores(out, fg, **self.params["image_score"]))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.memory_bank_ is not None and self.feature_mean_ is not None and self.feature_std_ is not None
        net = self.ae.state_tensors() if self.params["backbone"] == "autoencoder" else {
            f"backbone.{k}": v for k, v in self.mt.state_tensors().items()}
        return {**net, "memory_bank": self.memory_bank_, "feature_mean": self.feature_mean_,
                "feature_std": self.feature_std_}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "memory_bank" not in tensors:
            raise ValueError("patchcore: the weights file lacks 'memory_bank'")
        rest = {k: v for k, v in tensors.items() if k not in ("memory_bank", "feature_mean", "feature_std")}
        if self.params["backbone"] == "autoencoder":
            if any(k.startswith("backbone.") for k in rest):
                raise ValueError("patchcore: the weights file holds a multitask backbone but backbone is 'autoencoder'")
            self.ae = self._autoencoder()
            self.ae.load_state_tensors(rest)
        else:
            if not any(k.startswith("backbone.") for k in rest):
                raise ValueError("patchcore: the weights file holds no multitask backbone ('backbone.*'); was it "
                                 "trained with backbone 'autoencoder'?")
            self.mt = self._multitask()
            self.mt.load_state_tensors({k[len("backbone."):]: v for k, v in rest.items()})
        self.memory_bank_ = tensors["memory_bank"].float()
        d = self.memory_bank_.shape[1]
        # runs of earlier versions stored no statistics: raw features
        self.feature_mean_ = tensors["feature_mean"].float() if "feature_mean" in tensors else torch.zeros(d)
        self.feature_std_ = tensors["feature_std"].float() if "feature_std" in tensors else torch.ones(d)

    def extra_state(self) -> dict[str, Any]:
        return {"backbone_members": self.mt.member_info} if self.params["backbone"] == "multitask" else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.mt.member_info = list(state.get("backbone_members", []))
