"""The shared masked-autoencoder backbone of the MAE family (``mae``, ``amae``, ``mae-pseudo``).

The parameters live in MONAI's :class:`monai.networks.nets.MaskedAutoEncoderViT`; this module adds what its
``forward`` does not offer and the anomaly methods need:

- masks drawn from an explicit ``torch.Generator`` (MONAI draws them from the global RNG, so fixed-seed test
  maskings and a resumable training loop would otherwise disturb or depend on global state);
- the encoder applied to *all* patches (features for a classifier head);
- patchify / un-patchify in the token order of MONAI's patch embedding, the loss on masked patches only, and
  reconstructions averaged over several random maskings;
- pre-training through :func:`medanomaly.training.train_model` and loading of a pre-trained checkpoint.

Works for 2D and 3D images (``spatial_dims``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

__all__ = [
    "ARCH_DEFAULTS",
    "PRETRAIN_DEFAULTS",
    "MAE",
    "build_mae",
    "patchify",
    "unpatchify",
    "pretrain_mae",
    "load_mae_weights",
    "masked_val_loss",
]

#: the architecture keys of :class:`MAE` and their defaults (the ``cpu-small`` size)
ARCH_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "img_size": 64,
    "patch_size": 8,
    "spatial_dims": 2,
    "hidden_size": 128,
    "mlp_dim": 256,
    "num_layers": 4,
    "num_heads": 4,
    "decoder_hidden_size": 96,
    "decoder_mlp_dim": 192,
    "decoder_num_layers": 2,
    "decoder_num_heads": 4,
}

#: pre-training settings (used by :func:`pretrain_mae`)
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 3000,
    "batch_size": 64,
    "lr": 1.5e-3,
    "weight_decay": 0.05,
    "warmup_steps": 200,
    "mask_ratio": 0.75,
    "flip": True,
    "val_every": 250,
    "checkpoint_every": 500,
}


def patchify(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C * prod(patch)), tokens in the row-major grid order of MONAI's patch embedding."""
    b, c, *spatial = x.shape
    d = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size, strict=True)]
    shape = [b, c]
    for g, p in zip(grid, patch_size, strict=True):
        shape += [g, p]
    x = x.reshape(shape)
    perm = [0] + [2 + 2 * i for i in range(d)] + [1] + [3 + 2 * i for i in range(d)]
    return x.permute(perm).reshape(b, math.prod(grid), c * math.prod(patch_size))


def unpatchify(tokens: torch.Tensor, patch_size: tuple[int, ...], img_size: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, C * prod(patch)) -> (B, C, *img_size)."""
    b = tokens.shape[0]
    d = len(img_size)
    grid = [s // p for s, p in zip(img_size, patch_size, strict=True)]
    x = tokens.reshape(b, *grid, channels, *patch_size)
    # axes now: 0, grid 1..d, channel d+1, patch d+2..2d+1  ->  b, c, g1, p1, g2, p2, ...
    perm = [0, d + 1]
    for i in range(d):
        perm += [1 + i, d + 2 + i]
    return x.permute(perm).reshape(b, channels, *img_size)


class MAE(nn.Module):
    """A masked autoencoder with MONAI's ``MaskedAutoEncoderViT`` as parameter store (see the module docstring).

    ``self.net`` is the MONAI module (its state dict keys are the checkpoint format).
    """

    def __init__(self, **arch: Any) -> None:
        super().__init__()
        unknown = set(arch) - set(ARCH_DEFAULTS)
        if unknown:
            raise KeyError(f"MAE: unknown architecture key(s) {sorted(unknown)}; valid: {sorted(ARCH_DEFAULTS)}")
        a = {**ARCH_DEFAULTS, **arch}
        d = int(a["spatial_dims"])
        if d not in (2, 3):
            raise ValueError(f"MAE: spatial_dims must be 2 or 3, got {d}")
        img = tuple(int(v) for v in (a["img_size"] if isinstance(a["img_size"], list | tuple) else [a["img_size"]] * d))
        ps = tuple(int(v) for v in (a["patch_size"] if isinstance(a["patch_size"], list | tuple) else [a["patch_size"]] * d))
        if len(img) != d or len(ps) != d:
            raise ValueError(f"MAE: img_size {img} and patch_size {ps} must have {d} entries")
        if any(s % p for s, p in zip(img, ps, strict=True)):
            raise ValueError(f"MAE: img_size {img} must be divisible by patch_size {ps}")
        self.arch = a
        self.img_size, self.patch_size, self.spatial_dims = img, ps, d
        self.in_channels = int(a["in_channels"])
        self.n_patches = math.prod(s // p for s, p in zip(img, ps, strict=True))
        self.net = MaskedAutoEncoderViT(
            in_channels=self.in_channels, img_size=img, patch_size=ps,
            hidden_size=a["hidden_size"], mlp_dim=a["mlp_dim"], num_layers=a["num_layers"], num_heads=a["num_heads"],
            decoder_hidden_size=a["decoder_hidden_size"], decoder_mlp_dim=a["decoder_mlp_dim"],
            decoder_num_layers=a["decoder_num_layers"], decoder_num_heads=a["decoder_num_heads"],
            spatial_dims=d, qkv_bias=True, pos_embed_type="sincos", decoder_pos_embed_type="sincos",
        )

    # -- masks ------------------------------------------------------------------------------------
    def random_masks(self, batch: int, ratio: float, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep indices (B, K) sorted, mask (B, N) float with 1 = masked); drawn on CPU from ``generator``."""
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        n = self.n_patches
        n_keep = max(1, int(round(n * (1.0 - ratio))))
        noise = torch.rand(batch, n, generator=generator)
        keep = torch.argsort(noise, dim=1)[:, :n_keep].sort(dim=1).values
        mask = torch.ones(batch, n)
        mask.scatter_(1, keep, 0.0)
        device = device or next(self.parameters()).device
        return keep.to(device), mask.to(device)

    # -- encoder / decoder ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"MAE: expected images of shape (B, {self.in_channels}, {', '.join(map(str, self.img_size))}), "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, 1 + K, D) with the class token first; ``keep=None`` encodes every patch."""
        self._check(x)
        tok = self.net.patch_embedding(x)
        if keep is not None:
            tok = torch.gather(tok, 1, keep.unsqueeze(-1).expand(-1, -1, tok.shape[-1]))
        cls = self.net.cls_token.expand(tok.shape[0], -1, -1)
        return self.net.blocks(torch.cat([cls, tok], dim=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder features of all patches (class token excluded): (B, hidden_size)."""
        return self.encode(x)[:, 1:].mean(dim=1)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Decoder: (B, 1 + K, D) encoder output -> (B, N, C * prod(patch)) pixel predictions for every patch."""
        net = self.net
        z = net.decoder_embed(latent)
        b = z.shape[0]
        full = net.mask_tokens.to(z.dtype).expand(b, self.n_patches, -1).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, z.shape[-1]), z[:, 1:])
        full = full + net.decoder_pos_embedding.to(z.dtype)
        out = net.decoder_blocks(torch.cat([z[:, :1], full], dim=1))
        return net.decoder_pred(out)[:, 1:]

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches (B, N, P) and the mask (B, N) (1 = masked)."""
        keep, mask = self.random_masks(x.shape[0], mask_ratio, generator, x.device)
        return self.decode(self.encode(x, keep), keep), mask

    def loss(self, x: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None,
             n_masks: int = 1) -> torch.Tensor:
        """Mean squared error on the masked patches, averaged over ``n_masks`` random masks per image."""
        if n_masks > 1:
            x = x.repeat_interleave(n_masks, dim=0)
        pred, mask = self(x, mask_ratio, generator)
        target = patchify(x, self.patch_size)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask_ratio: float = 0.75, n_masks: int = 4,
                    generator: torch.Generator | None = None, batch_size: int = 64) -> torch.Tensor:
        """Reconstruction (B, C, *S) averaged over ``n_masks`` random maskings.

        The ``n_masks`` masks are drawn once and shared by every image, so an image's reconstruction depends only
        on the generator's seed, never on the batch it comes in. Each patch takes the mean of the predictions
        made while it was masked; a patch never masked in the ``n_masks`` draws takes the mean of all of them.
        """
        self._check(x)
        masks = [self.random_masks(1, mask_ratio, generator, x.device) for _ in range(n_masks)]
        outs = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            b = xb.shape[0]
            acc_m = torch.zeros(b, self.n_patches, 1, device=x.device)
            sum_m = torch.zeros(b, self.n_patches, 1, device=x.device)
            sum_all: torch.Tensor | float = 0.0
            for keep, mask in masks:
                keep_b = keep.expand(b, -1)
                pred = self.decode(self.encode(xb, keep_b), keep_b).float()
                m = mask.expand(b, -1).unsqueeze(-1)
                sum_m = sum_m + pred * m
                sum_all = sum_all + pred
                acc_m = acc_m + m
            tok = torch.where(acc_m > 0, sum_m / acc_m.clamp_min(1.0), sum_all / max(n_masks, 1))
            outs.append(unpatchify(tok, self.patch_size, self.img_size, self.in_channels))
        return torch.cat(outs)


def build_mae(arch: dict[str, Any]) -> MAE:
    """An :class:`MAE` from an architecture dict (keys of :data:`ARCH_DEFAULTS`)."""
    return MAE(**arch)


def load_mae_weights(model: MAE, path: str | Path, prefix: str = "mae.") -> dict[str, Any]:
    """Load pre-trained weights into ``model`` from a run folder or a ``.safetensors`` file (never a pickle).

    - run folder (``weights.safetensors`` [+ ``config.yaml``]) of ``mae``, ``amae`` or ``mae-pseudo``: the tensors
      under ``prefix``;
    - ``.safetensors`` file: tensors under ``prefix`` or, when none, the bare MONAI state dict; a checkpoint of
      :func:`medanomaly.training.train_model` (``checkpoints/mae.safetensors``) gives its best-validation weights
      (``best/``), else its last ones (``model/``).

    A ``.pt``/``.pth``/pickle file is refused (unpickling can run code): convert it once with
    ``safetensors.torch.save_file``. Returns the architecture recorded in a run folder (empty otherwise). Raises
    ``ValueError`` when the file is missing/unreadable or the shapes differ from ``model``'s architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    arch: dict[str, Any] = {}
    if path.is_dir():
        cfg_path = path / "config.yaml"
        if cfg_path.exists():
            import yaml

            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            arch = dict((cfg.get("params") or {}).get("mae") or {})
        path = path / "weights.safetensors"
    if path.suffix.lower() in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"):
        raise ValueError(f"pre-trained MAE: {path} is a pickle file, which is never loaded (unpickling can run code); "
                         "convert it to .safetensors with safetensors.torch.save_file(state_dict, 'mae.safetensors')")
    if not path.exists():
        raise ValueError(f"pre-trained MAE: {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"pre-trained MAE: {path} must be a run folder or a .safetensors file (got suffix '{path.suffix}')")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # unreadable/corrupt file: one clear message
        raise ValueError(f"pre-trained MAE: cannot read {path} ({e})") from e
    for ck in ("best/", "model/"):  # a train_model checkpoint
        if any(k.startswith(ck) for k in tensors):
            tensors = {k[len(ck):]: v for k, v in tensors.items() if k.startswith(ck)}
            break
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not sub:
        sub = tensors
    # ``sub`` is now either MAE (keys 'net.…') or a bare MONAI state dict
    if not any(k.startswith("net.") for k in sub):
        sub = {f"net.{k}": v for k, v in sub.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sub))
    bad = sorted(k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape))
    if missing or bad:
        diff = {k: (arch.get(k), model.arch[k]) for k in ARCH_DEFAULTS if k in arch and arch.get(k) != model.arch[k]}
        raise ValueError(
            f"pre-trained MAE {path} does not fit the architecture: {len(missing)} missing and {len(bad)} mis-shaped "
            f"tensors (e.g. {(missing + bad)[:3]}); architecture differences (checkpoint, ours): {diff or 'unknown'}"
        )
    model.load_state_dict({k: sub[k] for k in own})
    return arch


def _seed_from(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


@torch.no_grad()
def masked_val_loss(model: MAE, images: torch.Tensor, mask_ratio: float, seed: int = 12345, batch_size: int = 64) -> float:
    """Masked-patch MSE on ``images`` with fixed masks (a validation quantity that needs no labels)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        xb = images[i:i + batch_size].to(dev)
        tot += float(model.loss(xb, mask_ratio, g)) * xb.shape[0]
        n += xb.shape[0]
    return tot / max(n, 1)


def pretrain_mae(
    model: MAE,
    images: torch.Tensor,
    settings: dict[str, Any],
    *,
    val_images: torch.Tensor | None = None,
    seed: int = 0,
    device: str = "auto",
    run_dir: str | Path | None = None,
    name: str = "mae",
    resume: bool = True,
    quiet: bool = False,
    n_masks: int = 1,
    desc: str = "MAE pre-training",
) -> Any:
    """Train ``model`` to reconstruct masked patches of ``images`` (N, C, *S) (already at the model's size).

    ``settings``: keys of :data:`PRETRAIN_DEFAULTS`. Batches are a deterministic function of (seed, step), so a
    resumed run equals an uninterrupted one. Returns the :class:`medanomaly.training.TrainResult`.
    """
    from medanomaly.training.loop import TrainConfig, train_model

    s = {**PRETRAIN_DEFAULTS, **settings}
    if images.ndim != model.spatial_dims + 2 or images.shape[0] == 0:
        raise ValueError(f"pretrain_mae: need a non-empty (N, C, *S) image tensor, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("pretrain_mae: images contain NaN or Inf values")
    images = images.float().cpu()
    n = images.shape[0]
    bs = int(s["batch_size"])
    flip = bool(s["flip"])

    def batch_fn(step: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, n, size=bs)
        x = images[torch.as_tensor(idx)]
        if flip:
            f = torch.as_tensor(rng.random(bs) < 0.5)
            x = torch.where(f.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        return x, _seed_from(rng)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x, gseed = batch
        dev = next(m.parameters()).device
        return m.loss(x.to(dev), float(s["mask_ratio"]), torch.Generator().manual_seed(gseed), n_masks=n_masks)

    val_fn: Callable[[nn.Module], float] | None = None
    if val_images is not None and len(val_images) and s["val_every"]:
        vimg = val_images.float().cpu()
        val_fn = lambda m: masked_val_loss(m, vimg, float(s["mask_ratio"]), seed=seed + 999)  # noqa: E731
    cfg = TrainConfig(
        steps=int(s["steps"]), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]), betas=(0.9, 0.95),
        warmup_steps=int(s["warmup_steps"]), checkpoint_every=int(s["checkpoint_every"]),
        val_every=int(s["val_every"]) if val_fn is not None else 0, val_mode="min", seed=seed, device=device,
        quiet=quiet, desc=desc,
    )
    return train_model(model, loss_fn, batch_fn, cfg, run_dir=run_dir, val_fn=val_fn, name=name, resume=resume)


def resize_to(x: torch.Tensor, size: tuple[int, ...], nearest: bool = False) -> torch.Tensor:
    """Resize (B, C, *S) to ``size`` (bilinear/trilinear, or nearest for masks); a no-op when already there."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if nearest:
        return F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(x.float(), size=size, mode=mode, align_corners=False)
