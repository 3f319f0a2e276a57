"""``amae``: Adaptation of a pre-trained Masked AutoEncoder for dual-distribution anomaly detection
(Bozorgtabar et al., seed paper 002).

- Stage 1: a 3-layer MLP head on mean-pooled features of the *frozen* pre-trained MAE encoder learns to tell
  healthy images (0) from AnatPaste-augmented ones (1), cross-entropy. Beyond the paper, two parameters that the
  small 64 px PneumoniaMNIST setting needs (measured on the synthetic validation, see
  ``docs/results/pneumoniamnist_amae_ratio.md``; defaults = as published, ``configs/cpu-small.yaml`` turns them on):
  ``stage1.patch: normal`` (boxes only: AnatPaste's thin "scar" strips are 1-4 px wide at 64 px from a 28 px
  source and nearly invisible to 8 px tokens) and ``stage1.feature_norm: standardize`` (features standardised with
  the clean training images' mean/std, a fixed affine map like the parameter-free BatchNorm of MAE linear probing).
  Each training pair is one image clean and pasted (optionally flipped, ``stage1.flip``). ``anatomy: cxr``
  uses :func:`medanomaly.methods.amae.anatomy.lung_mask` (lungs may touch the border of cropped radiographs).
  After training, the head's synthetic validation (AnatPaste vs clean on the validation images, never real
  labels) is logged as ``stage1_synthetic_val`` (AUROC, accuracy).
- Stage 2 (only with an unlabeled pool): stage 1 pseudo-labels the pool; per predicted class the most confident
  ``keep_fraction`` is kept. Module A (MAE from the pre-trained weights) is adapted on healthy + pseudo-normal
  images, module B on pseudo-abnormal ones, each with ``n_masks_train`` random masks per image. At test time the
  map is |mean of A's reconstructions - mean of B's| over ``n_masks_test`` shared maskings, image score from the map
  by :mod:`medanomaly.evaluation.scoring` (``image_score``, default its foreground mean).
- Without a pool (the paper's protocol N) the image score is the stage-1 head probability and the map the
  pre-trained MAE's residual |x - reconstruction| (``residual.smooth``: the same optional min/average pooling as
  ``mae``'s ``score.smooth``, default off); the map's own score (``image_score``) is in
  ``extras["map_image_scores"]``.

The pool is passed as ``fit(train, val, unlabeled=dataset)`` or named by ``stage2.unlabeled_data`` (a dataset name
or manifest for :func:`medanomaly.data.load_dataset`). Its labels and masks are never read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.amae.anatomy import lung_masks
from medanomaly.methods.base import AnomalyResult, register
from medanomaly.methods.mae.common import (
    MAE_COMMON_DEFAULTS,
    MAE_COMMON_SCHEMA,
    SMOOTH_DEFAULTS,
    SMOOTH_SCHEMA,
    MAEFamilyDetector,
    apply_synth,
    check_smooth,
    dataset_tensors,
    residual_map,
    size_spec,
    synth_task,
)
from medanomaly.methods.params import (
    IMAGE_SCORE_SCHEMA,
    MAX_WIDTH,
    SEED,
    TRAIN_SPECS,
    Bool,
    Float,
    Int,
    Optional,
    Options,
    Str,
    pick,
)
from medanomaly.nets.mae import MAE, pretrain_mae, resize_to

__all__ = ["AMAE", "MLPHead", "pseudo_label", "synthetic_val_metrics"]


class MLPHead(nn.Module):
    """The 3-layer MLP projection head (two hidden layers, 2 logits) after a fixed feature standardisation.

    ``feature_mean``/``feature_std`` are buffers (saved with the head); they stay 0/1 (identity) unless
    :meth:`set_standardization` is called.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def set_standardization(self, features: torch.Tensor) -> None:
        """Standardise inputs with the per-dimension mean/std of ``features`` (N, D)."""
        if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] != self.feature_mean.numel():
            raise ValueError(f"MLPHead: need (N >= 2, {self.feature_mean.numel()}) features, got {tuple(features.shape)}")
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net((f - self.feature_mean) / self.feature_std)


def pseudo_label(p_abnormal: np.ndarray, keep_fraction: float = 0.5, min_abnormal: int = 4,
                 fallback_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray, bool]:
    """Indices (pseudo-normal, pseudo-abnormal) of a pool from stage-1 probabilities.

    Each image gets the class of the higher probability; within each class the ``keep_fraction`` most confident
    are kept (the paper's per-class top-K percentile, K = 50). When fewer than ``min_abnormal`` images survive as
    pseudo-abnormal, the ``fallback_fraction`` of the pool with the highest abnormal probability is used instead
    (third value True).
    """
    p = np.asarray(p_abnormal, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pseudo_label: need a non-empty 1-D array of probabilities, got shape {p.shape}")
    pred = p >= 0.5
    out = []
    for cls in (False, True):
        idx = np.flatnonzero(pred == cls)
        conf = p[idx] if cls else 1.0 - p[idx]
        k = int(math.ceil(keep_fraction * len(idx)))
        out.append(np.sort(idx[np.argsort(-conf, kind="stable")[:k]]))
    normal, abnormal = out
    fallback = False
    if len(abnormal) < min(min_abnormal, p.size):
        fallback = True
        k = max(1, int(round(fallback_fraction * p.size)))
        order = np.argsort(-p, kind="stable")
        abnormal = np.sort(order[:k])
        normal = np.sort(np.setdiff1d(normal, abnormal))
    return normal, abnormal, fallback


def synthetic_val_metrics(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUROC and accuracy (threshold 0.5) of the head on synthetic-validation features (0 clean, 1 AnatPaste)."""
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        p = torch.softmax(head(features), dim=1)[:, 1].cpu().numpy()
    y = labels.cpu().numpy()
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {"auroc": round(auc, 4), "acc": round(float(((p >= 0.5) == y).mean()), 4)}


@register
class AMAE(MAEFamilyDetector):
    name = "amae"
    defaults = {
        **MAE_COMMON_DEFAULTS,
        "stage1": {
            "task": "anatpaste",
            # AnatPaste's anatomical mask: brain (the foreground) | cxr (lungs, amae.anatomy) | auto (cxr when the
            # training set's preprocessing preset is ``cxr``, else brain)
            "anatomy": "auto",
            # the next three default to the published method; configs/cpu-small.yaml sets normal/standardize/True
            "patch": "random",  # AnatPaste patch: normal (boxes) | scar | random (half each, as CutPaste)
            "feature_norm": "none",  # none (the paper's head on raw features) | standardize
            "flip": False,  # left-right flips of the training pairs (clean and pasted alike)
            "hidden": 256,
            "steps": 1000,
            "batch_size": 64,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "warmup_steps": 50,
            "val_every": 100,
        },
        "stage2": {
            "enabled": True,  # run stage 2 when a pool is given
            "unlabeled_data": None,  # dataset name/manifest for the pool (alternative to fit(..., unlabeled=))
            "unlabeled_split": "train",
            "unlabeled_size": None,
            "keep_fraction": 0.5,
            "min_abnormal": 4,
            "fallback_fraction": 0.25,
            "mask_ratio": 0.75,
            "n_masks_train": 2,
            "n_masks_test": 4,
            "test_seed": 1234,
            "steps": 1000,
            "batch_size": 32,
            "lr": 5e-4,
            "weight_decay": 0.05,
            "warmup_steps": 50,
            "val_every": 200,
            "checkpoint_every": 500,
        },
        # the stage-1-only map (no pool): the MAE residual, smoothed as ``mae``'s ``score.smooth`` (default off)
        "residual": {"mask_ratio": 0.75, "n_masks": 4, "smooth": dict(SMOOTH_DEFAULTS)},
        "image_score": {"reduce": "mean", "fraction": 0.01},  # the map's image score (stage 2; protocol N: extras)
    }
    #: constraints of ``defaults`` (see :mod:`medanomaly.methods.params`)
    parameter_schema = {
        **MAE_COMMON_SCHEMA,
        "stage1": pick(
            TRAIN_SPECS, defaults["stage1"],
            task=Str(nonempty=True),  # a medanomaly.synth task name, resolved in fit
            anatomy=Options("auto", "brain", "cxr"),
            patch=Options("normal", "scar", "random"),
            feature_norm=Options("none", "standardize"),
            hidden=Int(1, MAX_WIDTH),
        ),
        "stage2": pick(
            TRAIN_SPECS, defaults["stage2"],
            enabled=Bool(),
            unlabeled_data=Optional(Str(nonempty=True)),  # a data set name or manifest
            unlabeled_split=Str(nonempty=True),
            unlabeled_size=Optional(size_spec(4096)),
            keep_fraction=Float(0, 1, closed="right"),
            min_abnormal=Int(0, 10**6),
            fallback_fraction=Float(0, 1),
            n_masks_train=Int(1, 1024),
            n_masks_test=Int(1, 1024),
            test_seed=SEED,
        ),
        "residual": {"mask_ratio": Float(0, 1, closed="neither"), "n_masks": Int(1, 1024), "smooth": SMOOTH_SCHEMA},
        "image_score": IMAGE_SCORE_SCHEMA,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_smooth(self.params["residual"]["smooth"], f"{self.name}: residual.smooth")
        self.head: MLPHead | None = None
        self.mae_a: MAE | None = None
        self.mae_b: MAE | None = None
        self.pool_info: dict[str, Any] = {}
        self.pseudo_labels: dict[str, np.ndarray] = {}
        self.stage1_info: dict[str, Any] = {}  # the head's synthetic validation (AUROC, acc) after stage 1

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def data_sources(cls, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Stage 2's unlabeled pool, when ``stage2.unlabeled_data`` names a data set (its labels are never read)."""
        s2 = params["stage2"]
        if not s2["enabled"] or not s2["unlabeled_data"]:
            return {}
        req: dict[str, Any] = {"data": str(s2["unlabeled_data"]), "split": str(s2["unlabeled_split"]), "normal_only": False}
        if s2["unlabeled_size"]:
            req["size"] = s2["unlabeled_size"]
        return {"unlabeled": req}

    def _fit(self, train: Any, val: Any | None = None, unlabeled: Any | None = None) -> None:
        self._anatomy_kind = str(self.params["stage1"]["anatomy"])
        if self._anatomy_kind == "auto":
            self._anatomy_kind = "cxr" if str(getattr(train, "preset", "")).startswith("cxr") else "brain"
        train, val = self._split(train, val)
        x, fg = dataset_tensors(train, self.model_size, "train")
        xv, fgv = dataset_tensors(val, self.model_size, "val") if val is not None else (None, None)
        self.mae = self._backbone(x, xv)
        self._fit_stage1(x, fg, xv, fgv)
        self.mae_a = self.mae_b = None
        self.pool_info = {}
        s2 = self.params["stage2"]
        if unlabeled is None and s2["enabled"] and s2["unlabeled_data"]:
            raise ValueError(f"amae: stage2.unlabeled_data={s2['unlabeled_data']!r} names a data set; pass its images as "
                             "fit(..., unlabeled=dataset) (the pipeline does this)")
        if unlabeled is not None and s2["enabled"]:
            xu, _ = dataset_tensors(unlabeled, self.model_size, "unlabeled pool")
            self._fit_stage2(x, xv, xu)

    def adapt(self, train: Any, val: Any | None, unlabeled: Any) -> AMAE:
        """Stage 2 alone on a fitted detector: pseudo-label ``unlabeled`` with the stage-1 head and train modules A
        and B (replacing earlier ones). ``train``/``val`` must be the healthy sets ``fit`` was given (module A
        trains on them too); the pre-trained encoder and the head are kept. Lets one stage 1 serve several pools."""
        from medanomaly.data.healthy import HealthyView

        self._check_fitted()
        train, unlabeled = HealthyView(train), HealthyView(unlabeled, where="unlabeled pool")
        val = HealthyView(val, where="validation data") if val is not None else None
        train, val = self._split(train, val)
        x, _ = dataset_tensors(train, self.model_size, "train")
        xv = dataset_tensors(val, self.model_size, "val")[0] if val is not None else None
        xu, _ = dataset_tensors(unlabeled, self.model_size, "unlabeled pool")
        self._fit_stage2(x, xv, xu)
        return self

    def _check_fitted(self) -> None:
        if not self.is_fitted or self.head is None or self.mae is None:
            raise RuntimeError(f"{self.name}: call fit() before adapt()")

    def _features(self, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.mae.features(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)])

    def _anatomy(self, x: torch.Tensor, fg: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """(AnatPaste parameters, the mask to paste into) for images (N, C, *S) and their foreground."""
        s = self.params["stage1"]
        anat = getattr(self, "_anatomy_kind", str(s["anatomy"]))
        params: dict[str, Any] = {"patch": s["patch"]} if s["task"] == "anatpaste" else {}
        if s["task"] != "anatpaste":
            return params, fg
        if anat == "cxr":  # own lung mask, handed to AnatPaste as its anatomy (``brain`` mode uses the given mask)
            return {**params, "anatomy": "brain"}, torch.as_tensor(lung_masks(x))
        if anat != "brain":
            raise ValueError(f"amae: stage1.anatomy must be 'auto', 'brain' or 'cxr', got {anat!r}")
        return {**params, "anatomy": "brain"}, fg

    def _fit_stage1(self, x: torch.Tensor, fg: torch.Tensor, xv: torch.Tensor | None, fgv: torch.Tensor | None) -> None:
        from medanomaly.training.loop import TrainConfig, train_model

        s = self.params["stage1"]
        norm = str(s["feature_norm"])
        if norm not in ("standardize", "none"):
            raise ValueError(f"amae: stage1.feature_norm must be 'standardize' or 'none', got {norm!r}")
        seed = int(self.params["seed"])
        task_params, paste_in = self._anatomy(x, fg)
        aug = synth_task(s["task"], task_params)
        self.head = MLPHead(self.mae.net.cls_token.shape[-1], int(s["hidden"])).to(self.device)
        f_clean = self._features(x)
        if norm == "standardize" and len(x) >= 2:
            self.head.set_standardization(f_clean)
        half = max(1, int(s["batch_size"]) // 2)
        n = x.shape[0]

        flip = bool(s["flip"])

        def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            # pairs: each drawn image clean (0) and with AnatPaste (1), so the only difference is the paste and the
            # head cannot succeed by memorising which images are the clean training ones
            rng = np.random.default_rng([seed, 1, step])
            idx = torch.as_tensor(rng.integers(0, n, size=half))
            xn, pn = x[idx], paste_in[idx]
            if flip:  # left-right flips of the pair (clean and pasted alike)
                f = torch.as_tensor(rng.random(half) < 0.5).view(-1, *[1] * (x.ndim - 1))
                xn, pn = torch.where(f, xn.flip(-1), xn), torch.where(f, pn.flip(-1), pn)
            xa = apply_synth(aug, xn, pn, rng)
            return self._features(torch.cat([xn, xa])), torch.cat([torch.zeros(half), torch.ones(half)]).long()

        ce = nn.CrossEntropyLoss()

        def loss_fn(head: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            fb, yb = batch
            logits = head(fb.to(self.device))
            yb = yb.to(logits.device)
            return ce(logits, yb), {"acc": float((logits.argmax(1) == yb).float().mean())}

        val_fn = None
        fv = yv = None
        if xv is not None and len(xv):
            rng = np.random.default_rng([seed, 2])
            _, paste_v = self._anatomy(xv, fgv)
            fv = torch.cat([self._features(xv), self._features(apply_synth(aug, xv, paste_v, rng))])
            yv = torch.cat([torch.zeros(len(xv)), torch.ones(len(xv))]).long().to(self.device)
            # synthetic validation only; AUROC (maximised) rather than CE: on PneumoniaMNIST the CE of a small
            # validation set rose while its AUROC still improved, so CE kept an undertrained head
            val_fn = lambda head: synthetic_val_metrics(head, fv, yv)["auroc"]  # noqa: E731
        cfg = TrainConfig(
            steps=int(s["steps"]), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]),
            warmup_steps=int(s["warmup_steps"]), val_every=int(s["val_every"]) if val_fn else 0, val_mode="max",
            seed=seed, device=self.params["device"], quiet=self.quiet, desc="AMAE stage 1",
        )
        res = train_model(self.head, loss_fn, batch_fn, cfg, run_dir=self._stage_dir("stage1"), val_fn=val_fn,
                          name="head", resume=self.resume)
        self._log(res.history, "stage1")
        self.head.eval()
        if fv is not None and yv is not None:
            self.stage1_info = synthetic_val_metrics(self.head, fv, yv)
            self.train_log.append({"stage": "stage1_synthetic_val", **self.stage1_info})

    def stage1_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 probability of 'synthetic anomaly' for images already at the model size."""
        with torch.no_grad():
            return torch.softmax(self.head(self._features(x)), dim=1)[:, 1]

    def _fit_stage2(self, x: torch.Tensor, xv: torch.Tensor | None, xu: torch.Tensor) -> None:
        s = self.params["stage2"]
        seed = int(self.params["seed"])
        p = self.stage1_scores(xu).cpu().numpy()
        normal, abnormal, fallback = pseudo_label(p, float(s["keep_fraction"]), int(s["min_abnormal"]),
                                                  float(s["fallback_fraction"]))
        self.pseudo_labels = {"normal": normal, "abnormal": abnormal}  # pool indices (not saved; for evaluation)
        self.pool_info = {"pool_size": int(len(xu)), "pseudo_normal": int(len(normal)),
                          "pseudo_abnormal": int(len(abnormal)), "fallback": bool(fallback)}
        self.train_log.append({"stage": "pseudo-label", **self.pool_info})
        settings = {k: s[k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "mask_ratio",
                                      "val_every", "checkpoint_every")}
        settings["flip"] = bool(self.params["pretrain"]["flip"])
        xa_train = torch.cat([x, xu[torch.as_tensor(normal, dtype=torch.long)]]) if len(normal) else x
        self.mae_a = self.clone_trainable(self.mae)
        ra = pretrain_mae(self.mae_a, xa_train, settings, val_images=xv, seed=seed + 11, device=self.params["device"],
                          run_dir=self._stage_dir("stage2"), name="module_a", resume=self.resume, quiet=self.quiet,
                          n_masks=int(s["n_masks_train"]), desc="AMAE module A")
        self._log(ra.history, "stage2-A")
        self.mae_b = self.clone_trainable(self.mae)
        rb = pretrain_mae(self.mae_b, xu[torch.as_tensor(abnormal, dtype=torch.long)], {**settings, "val_every": 0},
                          seed=seed + 22, device=self.params["device"], run_dir=self._stage_dir("stage2"),
                          name="module_b", resume=self.resume, quiet=self.quiet, n_masks=int(s["n_masks_train"]),
                          desc="AMAE module B")
        self._log(rb.history, "stage2-B")
        for m in (self.mae_a, self.mae_b):
            m.eval()
            for prm in m.parameters():
                prm.requires_grad_(False)

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        x, fg = self._prepare(images, foreground)
        bs = int(self.params["batch_size"])
        p1 = self.stage1_scores(x)
        extras: dict[str, Any] = {"stage1_scores": p1.cpu()}
        if self.mae_a is not None and self.mae_b is not None:
            s = self.params["stage2"]
            ratio, n_masks, tseed = float(s["mask_ratio"]), int(s["n_masks_test"]), int(s["test_seed"])
            ra = self.mae_a.reconstruct(x, ratio, n_masks, torch.Generator().manual_seed(tseed), bs)
            rb = self.mae_b.reconstruct(x, ratio, n_masks, torch.Generator().manual_seed(tseed), bs)
            maps = (ra - rb).abs().mean(1)
            if fg is not None:
                maps = maps * fg[:, 0]
            scores = image_scores(maps, fg, **self.params["image_score"])
            extras.update(reconstructions_a=ra.cpu(), reconstructions_b=rb.cpu())
            extras["restoration"] = resize_to(ra, tuple(images.shape[2:])).cpu()  # module A's mean reconstruction
        else:
            r = self.params["residual"]
            maps, rec = residual_map(self.mae, x, fg, float(r["mask_ratio"]), int(r["n_masks"]),
                                     int(self.params["stage2"]["test_seed"]), bs, r["smooth"])
            scores = p1
            extras["map_image_scores"] = image_scores(maps, fg, **self.params["image_score"]).cpu()
            extras["reconstructions"] = rec.cpu()
            extras["restoration"] = resize_to(rec, tuple(images.shape[2:])).cpu()  # the pre-trained MAE's
        out = self._to_input_size(maps, tuple(images.shape[2:]))
        return AnomalyResult(out.cpu(), scores.float().cpu(), extras)

    # -- state --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = self._mae_state("mae.")
        t.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        if self.mae_a is not None and self.mae_b is not None:
            t.update({f"mae_a.{k}": v for k, v in self.mae_a.state_dict().items()})
            t.update({f"mae_b.{k}": v for k, v in self.mae_b.state_dict().items()})
        return t

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mae = self._load_mae(tensors, "mae.")
        self.head = MLPHead(self.mae.net.cls_token.shape[-1], int(self.params["stage1"]["hidden"]))
        head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        missing, unexpected = self.head.load_state_dict(head_state, strict=False)
        if unexpected or set(missing) - {"feature_mean", "feature_std"}:  # runs saved before the buffers existed
            raise ValueError(f"amae: head weights do not fit (missing {missing}, unexpected {unexpected})")
        self.head.to(self.device).eval()
        has2 = any(k.startswith("mae_a.") for k in tensors)
        self.mae_a = self._load_mae(tensors, "mae_a.") if has2 else None
        self.mae_b = self._load_mae(tensors, "mae_b.") if has2 else None

    def extra_state(self) -> dict[str, Any]:
        return {"pool": self.pool_info, "stage1": self.stage1_info}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool_info = dict(state.get("pool") or {})
        self.stage1_info = dict(state.get("stage1") or {})
