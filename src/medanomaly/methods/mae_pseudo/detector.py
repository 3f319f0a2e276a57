"""``mae-pseudo``: masked autoencoder + pseudo-abnormal module + classifier (Georgescu, seed paper 003).

1. An MAE learns healthy anatomy (pre-trained here or loaded from ``pretrained``).
2. Every healthy training image ``x`` is reconstructed with a high mask ratio (0.85), averaged over 4 random
   maskings with a fixed seed: ``r``.
3. A ViT classifier (MONAI ``ViT``) learns on residuals: negatives ``|x - r|``, positives ``|x - P(r)|`` where
   ``P`` is the pseudo-abnormal module (intensity changes of random regions of the reconstruction).
4. The kept classifier is the one with the lowest cross-entropy on a *synthetic* validation set (healthy
   validation images and their pseudo-abnormal versions); real anomaly labels are never used.

Beyond the paper, a pixel map: the residual weighted by the classifier's input-gradient saliency (smoothed,
normalised per image) and by the classifier's anomaly probability, so that the method localises.
Image score: the classifier's logit margin (abnormal - normal); the pixel map's own score (``image_score``, by
:mod:`medanomaly.evaluation.scoring`) is in ``extras["map_image_scores"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import AnomalyResult, register
from medanomaly.methods.mae.common import (
    MAE_COMMON_DEFAULTS,
    MAE_COMMON_SCHEMA,
    MAEFamilyDetector,
    apply_synth,
    dataset_tensors,
    synth_task,
)
from medanomaly.methods.params import IMAGE_SCORE_SCHEMA, MAX_WIDTH, SEED, TRAIN_SPECS, Float, Int, Options, Str, pick
from medanomaly.nets.mae import resize_to

__all__ = ["MAEPseudo", "ResidualClassifier"]


class ResidualClassifier(nn.Module):
    """MONAI ViT with a linear classification head (2 logits) on residual images."""

    def __init__(self, in_channels: int, img_size: tuple[int, ...], patch_size: int, hidden_size: int, mlp_dim: int,
                 num_layers: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.vit = ViT(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, classification=True, num_classes=2,
                       dropout_rate=dropout, spatial_dims=len(img_size), post_activation=None, qkv_bias=True)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return self.vit(d)[0]


@register
class MAEPseudo(MAEFamilyDetector):
    name = "mae-pseudo"
    defaults = {
        **MAE_COMMON_DEFAULTS,
        "recon": {"mask_ratio": 0.85, "n_masks": 4, "seed": 1234},
        "pseudo": {"task": "pseudo-abnormal"},
        "classifier": {"patch_size": 8, "hidden_size": 128, "mlp_dim": 256, "num_layers": 4, "num_heads": 4,
                       "dropout": 0.1},
        "train": {"steps": 1000, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.05, "warmup_steps": 100,
                  "val_every": 100, "early_stopping_patience": 0, "checkpoint_every": 500},
        "pixel_map": {"kind": "residual_x_saliency", "smooth": 5, "gamma": 0.5},  # | residual | saliency
        "image_score": {"reduce": "topk", "fraction": 0.01},  # the map's score, extras["map_image_scores"]
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`)
    parameter_schema = {
        **MAE_COMMON_SCHEMA,
        "recon": {"mask_ratio": Float(0, 1, closed="neither"), "n_masks": Int(1, 1024), "seed": SEED},
        "pseudo": {"task": Str(nonempty=True)},  # a medanomaly.synth task name, resolved in fit
        "classifier": {"patch_size": Int(1, 1024), "hidden_size": Int(1, MAX_WIDTH), "mlp_dim": Int(1, 4 * MAX_WIDTH),
                       "num_layers": Int(1, 128), "num_heads": Int(1, 256), "dropout": Float(0, 1, closed="left")},
        "train": pick(TRAIN_SPECS, defaults["train"]),
        # smooth: an odd box size (1: off)
        "pixel_map": {"kind": Options("residual_x_saliency", "residual", "saliency"), "smooth": Int(1, 99),
                      "gamma": Float(0, None)},
        "image_score": IMAGE_SCORE_SCHEMA,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.clf: ResidualClassifier | None = None

    def _build_clf(self) -> ResidualClassifier:
        c = self.params["classifier"]
        return ResidualClassifier(int(self.params["mae"]["in_channels"]), self.model_size, int(c["patch_size"]),
                                  int(c["hidden_size"]), int(c["mlp_dim"]), int(c["num_layers"]), int(c["num_heads"]),
                                  float(c["dropout"]))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions of images at the model size (fixed-seed maskings)."""
        r = self.params["recon"]
        g = torch.Generator().manual_seed(int(r["seed"]))
        return self.mae.reconstruct(x.to(self.device), float(r["mask_ratio"]), int(r["n_masks"]), g,
                                    int(self.params["batch_size"])).cpu()

    def _fit(self, train: Any, val: Any | None = None) -> None:
        from medanomaly.training.loop import TrainConfig, train_model

        train, val = self._split(train, val)
        x, fg = dataset_tensors(train, self.model_size, "train")
        xv, fgv = dataset_tensors(val, self.model_size, "val") if val is not None else (None, None)
        self.mae = self._backbone(x, xv)
        seed = int(self.params["seed"])
        pa = synth_task(self.params["pseudo"]["task"])
        rec = self.reconstruct(x)
        t = self.params["train"]
        half = max(1, int(t["batch_size"]) // 2)
        n = x.shape[0]

        def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            rng = np.random.default_rng([seed, 3, step])
            i_neg = torch.as_tensor(rng.integers(0, n, size=half))
            i_pos = torch.as_tensor(rng.integers(0, n, size=half))
            neg = (x[i_neg] - rec[i_neg]).abs()
            pos = (x[i_pos] - apply_synth(pa, rec[i_pos], fg[i_pos], rng)).abs()
            d = torch.cat([neg, pos])
            if rng.random() < 0.5:
                d = d.flip(-1)
            return d, torch.cat([torch.zeros(half), torch.ones(half)]).long()

        ce = nn.CrossEntropyLoss()
        dev = self.device

        def loss_fn(clf: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            d, y = batch
            logits = clf(d.to(dev))
            y = y.to(dev)
            return ce(logits.float(), y), {"acc": float((logits.argmax(1) == y).float().mean())}

        val_fn = None
        if xv is not None and len(xv):
            rv = self.reconstruct(xv)
            rng = np.random.default_rng([seed, 4])
            dv = torch.cat([(xv - rv).abs(), (xv - apply_synth(pa, rv, fgv, rng)).abs()]).to(dev)
            yv = torch.cat([torch.zeros(len(xv)), torch.ones(len(xv))]).long().to(dev)

            def val_fn(clf: nn.Module) -> float:  # synthetic validation only
                return float(sum(ce(clf(dv[i:i + 128]).float(), yv[i:i + 128]) * len(yv[i:i + 128])
                                 for i in range(0, len(yv), 128)) / len(yv))

        cfg = TrainConfig(
            steps=int(t["steps"]), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]),
            warmup_steps=int(t["warmup_steps"]), val_every=int(t["val_every"]) if val_fn else 0, val_mode="min",
            early_stopping_patience=int(t["early_stopping_patience"]), checkpoint_every=int(t["checkpoint_every"]),
            seed=seed, device=self.params["device"], quiet=self.quiet, desc="mae-pseudo classifier",
        )
        torch.manual_seed(seed)
        self.clf = self._build_clf()
        res = train_model(self.clf, loss_fn, batch_fn, cfg, run_dir=self._stage_dir("classifier"), val_fn=val_fn,
                          name="classifier", resume=self.resume)
        self._log(res.history, "classifier")
        self.clf.eval()

    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x, fg = self._prepare(images, foreground)
        pm = self.params["pixel_map"]
        kind = pm["kind"]
        if kind not in ("residual_x_saliency", "residual", "saliency"):
            raise ValueError(f"mae-pseudo: unknown pixel_map.kind '{kind}' (residual_x_saliency | residual | saliency)")
        rec = self.reconstruct(x).to(self.device)
        d = (x - rec).abs()
        bs = int(self.params["batch_size"])
        margins, sal = [], []
        for i in range(0, len(d), bs):
            db = d[i:i + bs].clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.clf(db).float()
                m = logits[:, 1] - logits[:, 0]
                (g,) = torch.autograd.grad(m.sum(), db)
            margins.append(m.detach())
            sal.append(g.abs().mean(1))
        margin = torch.cat(margins)
        prob = torch.sigmoid(margin)
        res_map = d.mean(1)
        k = int(pm["smooth"])
        if k > 1:
            res_map_s = F.avg_pool2d(res_map.unsqueeze(1), k, 1, k // 2, count_include_pad=False)[:, 0]
        else:
            res_map_s = res_map
        if kind == "residual":
            maps = res_map
        else:
            s = torch.cat(sal)
            if k > 1:
                s = F.avg_pool2d(s.unsqueeze(1), k, 1, k // 2, count_include_pad=False)[:, 0]
            s = s / s.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (s.ndim - 1))
            w = prob.view(-1, *[1] * (s.ndim - 1))
            maps = s * w if kind == "saliency" else res_map_s * s.clamp_min(0) ** float(pm["gamma"]) * w
        if fg is not None:
            maps = maps * fg[:, 0]
        out = self._to_input_size(maps.detach(), tuple(images.shape[2:]))
        map_scores = image_scores(maps.detach(), fg, **self.params["image_score"]).cpu()
        return AnomalyResult(out.cpu(), margin.cpu(), {"probabilities": prob.cpu(), "reconstructions": rec.cpu(),
                                                       "map_image_scores": map_scores,
                                                       "residuals": res_map.cpu(),
                                                       "restoration": resize_to(rec, tuple(images.shape[2:])).cpu()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = self._mae_state("mae.")
        t.update({f"clf.{k}": v for k, v in self.clf.state_dict().items()})
        return t

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mae = self._load_mae(tensors, "mae.")
        self.clf = self._build_clf()
        self.clf.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("clf.")})
        self.clf.to(self.device).eval()
