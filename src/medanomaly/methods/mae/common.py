"""What the three MAE-family detectors share: data to tensors at the model size, the pre-trained backbone, synth
tasks with a local fallback, and map helpers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medanomaly.evaluation.scoring import check_image_score
from medanomaly.methods.base import Detector
from medanomaly.methods.params import (
    DEVICE,
    MAX_WIDTH,
    SEED,
    TRAIN_SPECS,
    AnyOf,
    Float,
    Int,
    ListOf,
    Optional,
    Options,
    pick,
)
from medanomaly.methods.params import Path as PathSpec
from medanomaly.nets.mae import ARCH_DEFAULTS, MAE, PRETRAIN_DEFAULTS, load_mae_weights, pretrain_mae, resize_to

__all__ = [
    "MAE_COMMON_DEFAULTS",
    "MAE_COMMON_SCHEMA",
    "SMOOTH_DEFAULTS",
    "SMOOTH_SCHEMA",
    "check_smooth",
    "residual_map",
    "size_spec",
    "MAEFamilyDetector",
    "dataset_tensors",
    "synth_task",
    "apply_synth",
]

#: parameters every MAE-family detector has
MAE_COMMON_DEFAULTS: dict[str, Any] = {
    "mae": dict(ARCH_DEFAULTS),
    "pretrain": dict(PRETRAIN_DEFAULTS),
    #: a run folder / .safetensors / checkpoint of a pre-trained MAE; None: pre-train in ``fit``
    "pretrained": None,
    "val_fraction": 0.1,  # held out of ``train`` (by case) when no ``val`` set is given
    "seed": 0,
    "device": "auto",
    "batch_size": 64,  # prediction batch size
}


def size_spec(max_size: int) -> AnyOf:
    """An int (the same size along every axis) or a list of 2 or 3 ints, each in [1, ``max_size``]."""
    return AnyOf(Int(1, max_size), ListOf(Int(1, max_size), 2, 3))


#: constraints of :data:`MAE_COMMON_DEFAULTS` (see :mod:`medanomaly.methods.params`); divisibility of ``img_size`` by
#: ``patch_size`` is checked by :class:`medanomaly.nets.mae.MAE`
MAE_COMMON_SCHEMA: dict[str, Any] = {
    "mae": {
        "in_channels": Int(1, MAX_WIDTH), "img_size": size_spec(4096), "patch_size": size_spec(1024),
        "spatial_dims": Options(2, 3), "hidden_size": Int(1, MAX_WIDTH), "mlp_dim": Int(1, 4 * MAX_WIDTH),
        "num_layers": Int(1, 128), "num_heads": Int(1, 256), "decoder_hidden_size": Int(1, MAX_WIDTH),
        "decoder_mlp_dim": Int(1, 4 * MAX_WIDTH), "decoder_num_layers": Int(1, 128), "decoder_num_heads": Int(1, 256),
    },
    "pretrain": pick(TRAIN_SPECS, PRETRAIN_DEFAULTS),
    "pretrained": Optional(PathSpec()),
    "val_fraction": Float(0, 1, closed="left"),
    "seed": SEED,
    "device": DEVICE,
    "batch_size": Int(1, 65536),
}


def dataset_tensors(ds: Any, size: tuple[int, ...], what: str = "dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, *size) float32 and foreground (N, 1, *size) bool of an ImageDataset, resized to ``size``.

    Reads only ``image`` and ``foreground`` (never masks or labels).
    """
    if ds is None or len(ds) == 0:
        raise ValueError(f"{what} is empty")
    imgs, fgs = [], []
    for i in range(len(ds)):
        s = ds[i]
        imgs.append(torch.as_tensor(s["image"], dtype=torch.float32))
        fgs.append(torch.as_tensor(s["foreground"]).bool())
    try:
        x = torch.stack(imgs)
        fg = torch.stack(fgs)
    except RuntimeError as e:
        raise ValueError(f"{what}: images of different shapes cannot be stacked ({e})") from e
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: images contain NaN or Inf values")
    return resize_to(x, size), resize_to(fg.float(), size, nearest=True).bool()


def _case_split(ds: Any, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices of ``ds`` into (train, val) by case id so no case is on both sides."""
    n = len(ds)
    cases = [str(ds[i]["case_id"]) for i in range(n)] if n else []
    uniq = sorted(set(cases))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    if len(uniq) >= 2:
        n_val = max(1, int(round(fraction * len(uniq))))
        val_cases = set(uniq[:n_val])
        tr = [i for i in range(n) if cases[i] not in val_cases]
        va = [i for i in range(n) if cases[i] in val_cases]
    else:
        perm = rng.permutation(n)
        n_val = max(1, int(round(fraction * n)))
        va, tr = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    if not tr:
        tr, va = va, []
    return tr, va


# -- synthetic anomalies --------------------------------------------------------------------------
SynthFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def synth_task(name: str, params: dict[str, Any] | None = None) -> SynthFn:
    """``f(image (C,*S), foreground (*S) bool, rng) -> (image, mask (*S))`` from :mod:`medanomaly.synth` task ``name``."""
    from medanomaly.synth import get_task

    params = dict(params or {})
    task = get_task(name)

    def run(img: np.ndarray, fg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        res = task(img, fg[None], rng, channels=True, **params)
        return np.asarray(res.image, dtype=np.float32), np.asarray(res.mask).reshape(img.shape[1:]).astype(bool)

    return run


def apply_synth(fn: SynthFn, x: torch.Tensor, fg: torch.Tensor, rng: np.random.Generator, tries: int = 5) -> torch.Tensor:
    """Apply a synth function to every image of a batch (B, C, *S); foreground (B, 1, *S).

    A draw that changed nothing (empty mask, e.g. a box outside the anatomy) is redrawn up to ``tries`` times, so
    that images labelled 'synthetic anomaly' carry one.
    """
    out = []
    for i in range(x.shape[0]):
        img, fgi = x[i].numpy(), fg[i, 0].numpy()
        for _ in range(tries):
            new, mask = fn(img, fgi, rng)
            if mask.any():
                break
        out.append(torch.from_numpy(np.ascontiguousarray(new)))
    return torch.stack(out).to(x.dtype)


# -- the detector base ----------------------------------------------------------------------------
#: the residual map's optional post-processing (odd window sizes in model pixels; 1 = that step off; both 1 = none)
SMOOTH_DEFAULTS: dict[str, int] = {"min_size": 1, "avg_size": 1}
SMOOTH_SCHEMA: dict[str, Any] = {"min_size": Int(1, 99), "avg_size": Int(1, 99)}


def check_smooth(smooth: dict[str, Any], where: str) -> None:
    """Refuse even window sizes (a min/average pool of even width has no centre pixel)."""
    for k, v in smooth.items():
        if int(v) % 2 == 0:
            raise ValueError(f"{where}.{k} = {v} must be an odd integer >= 1 (1: off)")


def residual_map(mae: MAE, x: torch.Tensor, fg: torch.Tensor | None, mask_ratio: float, n_masks: int, seed: int,
                 batch_size: int, smooth: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, reconstructions): |x - reconstruction| averaged over ``n_masks`` random maskings (``seed``) and the
    channels, times the foreground; with ``smooth`` (``min_size``/``avg_size`` > 1) then min- and average pooled
    (:func:`medanomaly.evaluation.postprocess.smooth_min_avg`) and masked to the foreground again. Both sizes 1: the
    map exactly as before smoothing existed. The one residual map of ``mae`` and of ``amae`` without a pool."""
    from medanomaly.evaluation.postprocess import smooth_min_avg

    rec = mae.reconstruct(x, mask_ratio, n_masks, torch.Generator().manual_seed(seed), batch_size)
    maps = (x - rec).abs().mean(1)
    if fg is not None:
        maps = maps * fg[:, 0]
    sm = smooth or SMOOTH_DEFAULTS
    if int(sm["min_size"]) > 1 or int(sm["avg_size"]) > 1:
        maps = smooth_min_avg(maps, int(sm["min_size"]), int(sm["avg_size"]), spatial_dims=maps.ndim - 1)
        if fg is not None:
            maps = maps * fg[:, 0]
    return maps, rec


class MAEFamilyDetector(Detector):
    """Base of ``mae``, ``amae`` and ``mae-pseudo``: owns ``self.mae`` (the pre-trained backbone)."""

    spatial_dims_supported = (2,)

    @classmethod
    def shared_parts(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The pre-trained MAE (same MAE, pre-training and seed settings): ``mae`` pre-trains it, ``amae`` and
        ``mae-pseudo`` start from it (``pretrained``), as in the papers' comparisons."""
        return {"mae.pre-trained MAE": {k: params[k] for k in ("mae", "pretrain", "seed")}}

    @classmethod
    def reuse_parts(cls, parts: list[str], run_dir: str) -> dict[str, Any]:
        return {"pretrained": run_dir}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_image_score(self.params["image_score"], self.name)
        self.mae: MAE | None = None

    # sizes / devices
    @property
    def model_size(self) -> tuple[int, ...]:
        a = self.params["mae"]
        d = int(a["spatial_dims"])
        s = a["img_size"]
        return tuple(int(v) for v in (s if isinstance(s, list | tuple) else [s] * d))

    @property
    def device(self) -> torch.device:
        from medanomaly.training.loop import get_device

        return get_device(self.params["device"])

    def _stage_dir(self, stage: str) -> Path | None:
        return None if self.work_dir is None else Path(self.work_dir) / stage

    def _split(self, train: Any, val: Any | None) -> tuple[Any, Any | None]:
        """(train, val): ``val`` as given, else a case-wise ``val_fraction`` of ``train``."""
        if val is not None and len(val):
            return train, val
        frac = float(self.params["val_fraction"])
        if frac <= 0 or len(train) < 4:
            return train, None
        tr, va = _case_split(train, frac, int(self.params["seed"]))
        return (train.subset(tr), train.subset(va)) if va else (train, None)

    def _log(self, history: list[dict[str, Any]], stage: str) -> None:
        self.train_log.extend({**r, "stage": stage} for r in history)

    def _backbone(self, x_train: torch.Tensor, x_val: torch.Tensor | None) -> MAE:
        """The pre-trained MAE: loaded from ``pretrained`` or pre-trained here on the healthy images."""
        mae = MAE(**self.params["mae"])
        src = self.params["pretrained"]
        if src:
            load_mae_weights(mae, src)
            self.train_log.append({"stage": "pretrain", "loaded_from": str(src)})
        else:
            res = pretrain_mae(
                mae, x_train, self.params["pretrain"], val_images=x_val, seed=int(self.params["seed"]),
                device=self.params["device"], run_dir=self._stage_dir("pretrain"), name="mae", resume=self.resume,
                quiet=self.quiet,
            )
            self._log(res.history, "pretrain")
        mae.to(self.device).eval()
        for p in mae.parameters():
            p.requires_grad_(False)
        return mae

    def _prepare(self, images: torch.Tensor, foreground: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check and resize ``predict``'s input to the model size (on the model's device)."""
        c = int(self.params["mae"]["in_channels"])
        if images.shape[1] != c:
            raise ValueError(f"{self.name}: images have {images.shape[1]} channels, the model was built for {c}")
        x = resize_to(images.float(), self.model_size).to(self.device)
        fg = None if foreground is None else resize_to(foreground.float(), self.model_size, nearest=True).bool().to(self.device)
        return x, fg

    @staticmethod
    def _to_input_size(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """(B, *S_model) -> (B, *size)."""
        if tuple(maps.shape[1:]) == tuple(size):
            return maps
        return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear" if len(size) == 2 else "trilinear",
                             align_corners=False)[:, 0]

    @staticmethod
    def _masked_mean(maps: torch.Tensor, fg: torch.Tensor | None) -> torch.Tensor:
        """Mean of each map (B, *S) over its foreground (all pixels when none or empty)."""
        flat = maps.flatten(1)
        if fg is None:
            return flat.mean(1)
        w = fg.flatten(1).float()
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        return (flat * w).sum(1) / w.sum(1)

    def _mae_state(self, prefix: str = "mae.") -> dict[str, torch.Tensor]:
        assert self.mae is not None
        return {f"{prefix}{k}": v for k, v in self.mae.state_dict().items()}

    def _load_mae(self, tensors: dict[str, torch.Tensor], prefix: str = "mae.") -> MAE:
        mae = MAE(**self.params["mae"])
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sub:
            raise ValueError(f"{self.name}: weights hold no '{prefix}*' tensors")
        mae.load_state_dict(sub)
        mae.to(self.device).eval()
        for p in mae.parameters():
            p.requires_grad_(False)
        return mae

    @staticmethod
    def clone_trainable(mae: MAE) -> MAE:
        m = copy.deepcopy(mae)
        for p in m.parameters():
            p.requires_grad_(True)
        # sin-cos position embeddings stay fixed
        for name, p in m.named_parameters():
            if "position_embeddings" in name or "decoder_pos_embedding" in name:
                p.requires_grad_(False)
        return m
