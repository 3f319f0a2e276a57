"""Parts shared by ``mim-ood``, ``ar-restoration`` and ``token-critic``.

All three tokenise images with a VQ-VAE (:class:`medanomaly.nets.tokens.VQTokenizer`), model the healthy token
distribution with transformers, *restore* a test image by re-sampling suspicious tokens, decode, and score pixels
by the residual |restoration - input| averaged over R restorations, smoothed by min- then average-pooling and
restricted to the foreground.

Training (each stage through :func:`medanomaly.training.train_model`, checkpoints in ``work_dir``, resumable):

1. tokenizer: L1 reconstruction + commitment loss, random flips and broad intensity augmentations
   (gamma, contrast, brightness, applied inside the foreground only);
2. the latent models on the tokens of the training images and of their mirror images (the paper's flip
   augmentation; rotations would need re-encoding at every step and are left out):
   MVTM (:func:`train_mvtm`), ATD (:func:`train_token_classifier` with random-token corruption), Token Critic
   (the same classifier on MVTM samples), AR model (:func:`train_ar`).

Threshold rule (no lesion label): the threshold on token scores (ATD probability, critic probability, AR NLL) is
the ``restoration.threshold.quantile`` quantile (default 0.98) of the scores of foreground tokens of the
*validation* images (or of the training images when no validation set is given), i.e. about 2% of healthy
tokens get re-sampled. ``threshold.mode: fixed`` uses ``threshold.value`` instead (the paper's lambda = 0.005
for the ATD, NLL = 6 for the AR model). T and R are not tuned: the paper's values (T = 8, R = 4) are used.

Image score: from the smoothed map by :mod:`medanomaly.evaluation.scoring` (``image_score``; default the mean of
the top 1% of the foreground voxels).

Shared modules can be reused from another run folder of these methods (``reuse.run_dir``, ``reuse.modules``), so
that the three methods can be compared on one tokenizer (and one MVTM), as in the paper.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medanomaly.evaluation.postprocess import smooth_min_avg
from medanomaly.evaluation.scoring import check_image_score, image_scores
from medanomaly.methods.base import AnomalyResult, Detector
from medanomaly.methods.params import (
    DEVICE,
    IMAGE_SCORE_SCHEMA,
    MAX_WIDTH,
    SEED,
    TRAIN_SPECS,
    Bool,
    Float,
    Int,
    ListOf,
    Options,
    pick,
    with_changes,
)
from medanomaly.methods.params import Path as PathSpec
from medanomaly.nets.tokens import MaskBank, TokenTransformer, VQTokenizer, gumbel_sample
from medanomaly.training import TrainConfig, autocast, get_device, train_model

__all__ = [
    "COMMON_DEFAULTS",
    "TokenRestorationDetector",
    "augment_intensity",
    "train_tokenizer",
    "tokenizer_check",
    "balanced_l1",
    "encode_images",
    "train_mvtm",
    "train_token_classifier",
    "train_ar",
    "stack_images",
]

_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "batch_size": 32, "lr": 5e-5, "weight_decay": 1e-5, "warmup_steps": 0, "grad_clip": 1.0,
    "val_every": 0, "checkpoint_every": 1000,
}

COMMON_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "amp": True,
    "reuse": {"run_dir": "", "modules": ["tokenizer"]},
    "tokenizer": {
        "num_embeddings": 256, "embedding_dim": 256, "channels": [64, 128, 256], "num_res_layers": 2,
        "commitment_cost": 0.25, "decay": 0.99,
    },
    # loss "l1": mean |reconstruction - image| (the paper's); "l1-balanced": the foreground's and the background's
    # mean L1 weigh half each, so a small foreground (zero-background 3D volumes) cannot be traded for a blank output
    "tokenizer_train": dict(_TRAIN_DEFAULTS, steps=300000, loss="l1"),
    "augment": {"gamma": [0.6, 1.7], "contrast": [0.7, 1.3], "brightness": 0.1, "flip": True},
    "transformer": {"dim": 512, "depth": 12, "heads": 8, "mlp_ratio": 4.0, "drop_path": 0.1, "dropout": 0.0},
    "transformer_train": dict(_TRAIN_DEFAULTS, steps=200000),
    "masks": {"bank_size": 4096, "corrupt_low": 0.02, "corrupt_high": 0.4},
    "restoration": {
        "T": 8, "R": 4, "temperature": 1.0,
        "threshold": {"mode": "quantile", "quantile": 0.98, "value": 0.005},
        "residual_to": "input",  # "input" (paper) | "reconstruction" (VQ-VAE reconstruction of the input)
        "min_pool": 3, "avg_pool": 7, "batch_size": 32, "seed": 0,
        "extra_token_scores": False,
    },
    "image_score": {"reduce": "topk", "fraction": 0.01},  # from the smoothed map (medanomaly.evaluation.scoring)
}


#: constraints of :data:`COMMON_DEFAULTS` (see :mod:`medanomaly.methods.params`); each method narrows it with
#: :func:`derive_schema`
COMMON_SCHEMA: dict[str, Any] = {
    "seed": SEED,
    "device": DEVICE,
    "amp": Bool(),
    "reuse": {"run_dir": PathSpec(), "modules": ListOf(Options("tokenizer", "mvtm", "atd", "critic", "ar"))},
    "tokenizer": {
        "num_embeddings": Int(2, 65536), "embedding_dim": Int(1, MAX_WIDTH), "channels": ListOf(Int(1, MAX_WIDTH), 1, 8),
        "num_res_layers": Int(0, 16), "commitment_cost": Float(0, None), "decay": Float(0, 1, closed="left"),
    },
    "tokenizer_train": {**pick(TRAIN_SPECS, [k for k in COMMON_DEFAULTS["tokenizer_train"] if k != "loss"]),
                        "loss": Options("l1", "l1-balanced")},
    "augment": {"gamma": ListOf(Float(0, None, closed="neither"), 2, 2), "contrast": ListOf(Float(0, None), 2, 2),
                "brightness": Float(0, 1), "flip": Bool()},
    "transformer": {"dim": Int(1, MAX_WIDTH), "depth": Int(1, 128), "heads": Int(1, 256),
                    "mlp_ratio": Float(0, 64, closed="right"), "drop_path": Float(0, 1, closed="left"),
                    "dropout": Float(0, 1, closed="left")},
    "transformer_train": pick(TRAIN_SPECS, COMMON_DEFAULTS["transformer_train"]),
    "masks": {"bank_size": Int(1, 10**6), "corrupt_low": Float(0, 1), "corrupt_high": Float(0, 1)},
    "restoration": {
        "T": Int(1, 10_000), "R": Int(1, 10_000), "temperature": Float(0, None, closed="neither"),
        # value: a token-score threshold (a probability for the ATD / critic, an NLL for the AR model)
        "threshold": {"mode": Options("quantile", "fixed"), "quantile": Float(0, 1), "value": Float(0, None)},
        "residual_to": Options("input", "reconstruction"),
        "min_pool": Int(1, 99), "avg_pool": Int(1, 99), "batch_size": Int(1, 65536), "seed": SEED,
        "extra_token_scores": Bool(),
    },
    "image_score": IMAGE_SCORE_SCHEMA,
}


def stack_images(ds: Any, what: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, *S) float32 and foregrounds (N, 1, *S) bool of a dataset; reads no mask or label."""
    if ds is None or len(ds) == 0:
        raise ValueError(f"the {what} set is empty")
    imgs, fgs = [], []
    for i in range(len(ds)):
        s = ds[i]
        imgs.append(torch.as_tensor(s["image"], dtype=torch.float32))
        fg = s.get("foreground")
        fgs.append(torch.ones_like(imgs[-1][:1], dtype=torch.bool) if fg is None else torch.as_tensor(fg).bool())
    try:
        x, fg = torch.stack(imgs), torch.stack(fgs)
    except RuntimeError as e:
        raise ValueError(f"the {what} images do not all have the same shape ({e})") from e
    if not torch.isfinite(x).all():
        raise ValueError(f"the {what} images contain NaN or Inf values")
    return x, fg


def augment_intensity(x: torch.Tensor, fg: torch.Tensor, rng: np.random.Generator, aug: dict[str, Any],
                      lo: float, hi: float) -> torch.Tensor:
    """Random gamma, contrast and brightness per image inside the foreground (background untouched), then a
    random mirror flip along the last axis. ``lo``/``hi``: the intensity range of the data."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    span = max(hi - lo, 1e-6)
    z = ((x - lo) / span).clamp(0, 1)
    g = torch.from_numpy(np.exp(rng.uniform(np.log(aug["gamma"][0]), np.log(aug["gamma"][1]), b))).float().view(shape)
    z = z.pow(g)
    fgf = fg.float()
    mean = (z * fgf).flatten(1).sum(1) / fgf.flatten(1).sum(1).clamp_min(1)
    c = torch.from_numpy(rng.uniform(aug["contrast"][0], aug["contrast"][1], b)).float().view(shape)
    br = torch.from_numpy(rng.uniform(-aug["brightness"], aug["brightness"], b)).float().view(shape)
    z = (mean.view(shape) + c * (z - mean.view(shape)) + br).clamp(0, 1)
    out = torch.where(fg, lo + z * span, x)
    if aug.get("flip", False):
        flip = torch.from_numpy(rng.uniform(size=b) < 0.5).view(shape)
        out = torch.where(flip, out.flip(-1), out)
    return out


def _cfg(d: dict[str, Any], seed: int, device: str, amp: bool, quiet: bool, desc: str) -> TrainConfig:
    return TrainConfig(steps=int(d["steps"]), lr=float(d["lr"]), weight_decay=float(d["weight_decay"]),
                       warmup_steps=int(d["warmup_steps"]), grad_clip=d["grad_clip"], val_every=int(d["val_every"]),
                       checkpoint_every=int(d["checkpoint_every"]), seed=seed, device=device, amp=amp, quiet=quiet,
                       desc=desc)


def _dev(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_tokenizer(tok: VQTokenizer, x: torch.Tensor, fg: torch.Tensor, xv: torch.Tensor | None, train: dict[str, Any],
                    aug: dict[str, Any], *, seed: int, device: str, amp: bool, run_dir: Path | None, quiet: bool,
                    resume: bool) -> list[dict[str, Any]]:
    """Train the VQ-VAE with L1 (``train["loss"]``: plain or foreground-balanced) + commitment loss on augmented
    images; validation: plain L1 on ``xv`` (healthy). Ends with :func:`tokenizer_check` (a record in the log, and a
    warning when the tokenizer reconstructs no better than a blank image)."""
    lo, hi = float(x.min()), float(x.max())
    bs = int(train["batch_size"])
    balanced = train.get("loss", "l1") == "l1-balanced"

    def batch_fn(step: int) -> Any:
        rng = np.random.default_rng([seed, 1, step])
        idx = torch.from_numpy(rng.integers(0, len(x), bs))
        imgs = augment_intensity(x[idx], fg[idx], rng, aug, lo, hi)
        return {"image": imgs, "foreground": fg[idx]} if balanced else imgs

    def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if balanced:
            batch, f = batch["image"].to(_dev(model)), batch["foreground"].to(_dev(model))
        else:
            batch = batch.to(_dev(model))
        rec, qloss = model(batch)
        err = (rec.float() - batch).abs()
        l1 = err.mean()
        rec_loss = balanced_l1(err, f) if balanced else l1
        return rec_loss + qloss.float(), {"l1": float(l1.detach())}

    val_fn = None
    if xv is not None:
        xval = xv[: 4 * bs]

        def val_fn(model: nn.Module) -> float:
            out = [(model(xval[i : i + bs].to(_dev(model)))[0].float().cpu() - xval[i : i + bs]).abs().mean()
                   for i in range(0, len(xval), bs)]
            return float(torch.stack(out).mean())

    res = train_model(tok, loss_fn, batch_fn, _cfg(train, seed, device, amp, quiet, "tokenizer"), run_dir=run_dir,
                      val_fn=val_fn, name="tokenizer", resume=resume)
    check = tokenizer_check(tok, xv if xv is not None else x, batch_size=bs)
    return [dict(r, stage="tokenizer") for r in res.history] + [check]


def balanced_l1(err: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Half the mean of ``err`` (B, C, *S) over the foreground (B, 1, *S) plus half its mean over the background
    (a part without voxels adds 0, the other part then weighs half)."""
    f = fg.to(err.dtype).expand_as(err)
    n_fg, n_bg = f.sum(), (1 - f).sum()
    part_fg = (err * f).sum() / n_fg.clamp_min(1)
    part_bg = (err * (1 - f)).sum() / n_bg.clamp_min(1)
    return 0.5 * part_fg + 0.5 * part_bg


#: a tokenizer whose reconstruction L1 is above this fraction of a blank image's L1 counts as collapsed
COLLAPSE_RATIO = 0.8


@torch.no_grad()
def tokenizer_check(tok: VQTokenizer, x: torch.Tensor, batch_size: int = 16, max_images: int = 64) -> dict[str, Any]:
    """Reconstruction L1 of up to ``max_images`` healthy images against a blank (all-zero) output's L1.

    A ratio near 1 means the VQ-VAE learnt to output (nearly) nothing, so every restoration map is the image itself
    whatever the transformers do; that is warned about (:data:`COLLAPSE_RATIO`)."""
    import warnings

    was = tok.training
    tok.eval()
    xs = x[:max_images]
    dev = _dev(tok)
    l1, blank = 0.0, 0.0
    for i in range(0, len(xs), batch_size):
        b = xs[i : i + batch_size].to(dev).float()
        rec = tok(b)[0].float()
        l1 += float((rec - b).abs().sum())
        blank += float(b.abs().sum())
    tok.train(was)
    ratio = l1 / blank if blank > 0 else float("nan")
    collapsed = bool(ratio > COLLAPSE_RATIO)
    if collapsed:
        warnings.warn(f"the VQ-VAE tokenizer reconstructs its healthy images no better than a blank image (L1 "
                      f"{ratio:.2f} x a blank output's): its restorations carry no anatomy and the anomaly map is the "
                      "image itself; train longer or set tokenizer_train.loss=l1-balanced", stacklevel=2)
    return {"stage": "tokenizer_check", "l1": l1 / max(xs.numel(), 1), "blank_l1": blank / max(xs.numel(), 1),
            "ratio": ratio, "collapsed": collapsed}


@torch.no_grad()
def encode_images(tok: VQTokenizer, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Token grids (N, *t) long of images (N, C, *S), on the CPU."""
    tok.eval()
    dev = _dev(tok)
    return torch.cat([tok.encode(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


#: voxels decoded at once at predict time (rows x voxels per image): bounds the decoder's activations (a full
#: 240x240x160 volume decodes one restoration at a time, 64 px slices all at once)
DECODE_VOXELS = 2**22


def decode_rows(tok: VQTokenizer, tokens: torch.Tensor, max_voxels: int = DECODE_VOXELS) -> torch.Tensor:
    """``tok.decode(tokens).float()`` in chunks of rows of at most ``max_voxels`` output voxels (at least one row),
    so that memory stays bounded. A batch within the budget is decoded in one call (unchanged results); chunked
    decoding gives the same values up to the convolutions' float rounding (~1e-7, oneDNN picks kernels by batch)."""
    per_row = int(np.prod(tokens.shape[1:])) * tok.factor ** (tokens.ndim - 1)
    step = max(1, max_voxels // max(per_row, 1))
    if step >= tokens.shape[0]:
        return tok.decode(tokens).float()
    return torch.cat([tok.decode(tokens[i : i + step]).float() for i in range(0, tokens.shape[0], step)])


def _draw(tokens: torch.Tensor, rng: np.random.Generator, bs: int) -> torch.Tensor:
    return tokens[torch.from_numpy(rng.integers(0, len(tokens), bs))]


def train_mvtm(mvtm: TokenTransformer, tokens: torch.Tensor, val_tokens: torch.Tensor | None, bank: MaskBank,
               train: dict[str, Any], *, seed: int, device: str, amp: bool, run_dir: Path | None, quiet: bool,
               resume: bool, name: str = "mvtm") -> list[dict[str, Any]]:
    """Masked visual token modelling (eq. 1): brush masks with MaskGIT's cosine coverage schedule replaced by
    ``[MASK]``; cross-entropy on the masked tokens. ``tokens``: (M, N) flattened."""
    bs = int(train["batch_size"])

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, 2, step])
        return _draw(tokens, rng, bs), bank.draw(bs, rng)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        y, m = (t.to(_dev(model)) for t in batch)
        logits = model(torch.where(m, torch.full_like(y, mvtm.special_id), y))
        loss = F.cross_entropy(logits[m].float(), y[m])
        return loss, {}

    val_fn = None
    if val_tokens is not None:
        vrng = np.random.default_rng([seed, 99])
        vy = val_tokens[: 4 * bs]
        vm = bank.draw(len(vy), vrng)

        def val_fn(model: nn.Module) -> float:
            return float(loss_fn(model, (vy, vm))[0])

    res = train_model(mvtm, loss_fn, batch_fn, _cfg(train, seed, device, amp, quiet, name), run_dir=run_dir,
                      val_fn=val_fn, name=name, resume=resume)
    return [dict(r, stage=name) for r in res.history]


def train_token_classifier(net: TokenTransformer, tokens: torch.Tensor, val_tokens: torch.Tensor | None,
                           corrupt: Any, train: dict[str, Any], *, seed: int, device: str, amp: bool,
                           run_dir: Path | None, quiet: bool, resume: bool, name: str) -> list[dict[str, Any]]:
    """Per-token binary classifier (eq. 2): ``corrupt(y, rng) -> (input tokens, labels)`` makes the training pairs;
    BCE over all tokens. Used for the ATD (random-token corruption) and the Token Critic (MVTM samples)."""
    bs = int(train["batch_size"])

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, 3, step])
        return corrupt(_draw(tokens, rng, bs), rng)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inp, lab = (t.to(_dev(model)) for t in batch)
        logit = model(inp).squeeze(-1).float()
        return F.binary_cross_entropy_with_logits(logit, lab.float()), {}

    val_fn = None
    if val_tokens is not None:
        vbatch = corrupt(val_tokens[: 4 * bs], np.random.default_rng([seed, 98]))

        def val_fn(model: nn.Module) -> float:
            return float(loss_fn(model, vbatch)[0])

    res = train_model(net, loss_fn, batch_fn, _cfg(train, seed, device, amp, quiet, name), run_dir=run_dir,
                      val_fn=val_fn, name=name, resume=resume)
    return [dict(r, stage=name) for r in res.history]


def train_ar(ar: TokenTransformer, tokens: torch.Tensor, val_tokens: torch.Tensor | None, train: dict[str, Any], *,
             seed: int, device: str, amp: bool, run_dir: Path | None, quiet: bool, resume: bool,
             name: str = "ar") -> list[dict[str, Any]]:
    """Causal next-token cross-entropy over the raster order (``[BOS]`` first)."""
    bs = int(train["batch_size"])

    def batch_fn(step: int) -> torch.Tensor:
        return _draw(tokens, np.random.default_rng([seed, 4, step]), bs)

    def loss_fn(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        y = y.to(_dev(model))
        bos = torch.full_like(y[:, :1], ar.special_id)
        logits = model(torch.cat([bos, y[:, :-1]], 1))
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    val_fn = None
    if val_tokens is not None:
        vy = val_tokens[: 4 * bs]

        def val_fn(model: nn.Module) -> float:
            return float(loss_fn(model, vy))

    res = train_model(ar, loss_fn, batch_fn, _cfg(train, seed, device, amp, quiet, name), run_dir=run_dir,
                      val_fn=val_fn, name=name, resume=resume)
    return [dict(r, stage=name) for r in res.history]


def random_token_corruption(bank: MaskBank, used: torch.Tensor) -> Any:
    """ATD corruption: tokens inside a brush mask replaced by random *different* tokens drawn uniformly from the
    codebook entries ``used`` (sorted ids seen in training; unused entries would be trivially detectable and decode
    to garbage); label = the mask."""
    u = len(used)
    if u < 2:
        raise ValueError("the tokenizer uses fewer than 2 codebook entries; cannot corrupt tokens (train it longer)")

    def corrupt(y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        m = bank.draw(len(y), rng)
        pos = torch.searchsorted(used, y)
        shift = torch.from_numpy(rng.integers(1, u, y.shape))
        return torch.where(m, used[(pos + shift) % u], y), m

    return corrupt


class TokenRestorationDetector(Detector):
    """Base of the three token-restoration methods: fitting, calibration, the restoration loop of :meth:`_predict`
    and the state. Subclasses set ``latent_modules`` and implement ``_build_latent``, ``_fit_latent``,
    ``_token_scores`` and ``_restore`` (``mim-ood`` and ``token-critic`` share theirs:
    :class:`medanomaly.methods.mim_ood.restoration.MVTMRestorationDetector`)."""

    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2, 3)
    defaults: ClassVar[dict[str, Any]] = COMMON_DEFAULTS
    parameter_schema: ClassVar[dict[str, Any]] = COMMON_SCHEMA
    latent_modules: ClassVar[tuple[str, ...]] = ()

    #: what determines each shareable module (see :meth:`shared_parts`)
    _TOKENIZER_KEYS: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_train", "augment", "seed")
    _MVTM_KEYS: ClassVar[tuple[str, ...]] = ("transformer", "transformer_train", "masks")
    #: inference-time settings: never part of what a module learned
    _INFERENCE_KEYS: ClassVar[tuple[str, ...]] = ("restoration", "reuse", "image_score")

    @classmethod
    def shared_parts(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The VQ-VAE tokenizer (same tokenizer settings), the MVTM (same tokenizer and transformer settings: the
        paper's MVTM + Token Critic baseline reuses MIM-OOD's) and this method's other modules (all training
        settings equal: e.g. a variant that differs only in ``restoration.*``)."""
        tok = {k: params[k] for k in cls._TOKENIZER_KEYS}
        out: dict[str, Any] = {"mim.tokenizer": tok}
        train = {k: v for k, v in params.items() if k not in cls._INFERENCE_KEYS}
        for m in cls.latent_modules:
            out[f"mim.{m}"] = {**tok, **{k: params[k] for k in cls._MVTM_KEYS}} if m == "mvtm" else {"method": cls.name, **train}
        return out

    @classmethod
    def reuse_parts(cls, parts: list[str], run_dir: str) -> dict[str, Any]:
        mods = [p.removeprefix("mim.") for p in parts]
        order = ["tokenizer", *cls.latent_modules]
        return {"reuse.run_dir": run_dir, "reuse.modules": [m for m in order if m in mods]}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_image_score(self.params["image_score"], self.name)
        self.tokenizer: VQTokenizer | None = None
        self.nets: dict[str, TokenTransformer] = {}
        self.image_shape: tuple[int, ...] = ()
        self.threshold: float = float("nan")
        #: (K,) bool, codebook entries seen in the training tokens; only these are sampled in restorations
        self.token_used: torch.Tensor = torch.zeros(0, dtype=torch.bool)

    # -- building --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return get_device(self.params["device"])

    @property
    def token_shape(self) -> tuple[int, ...]:
        assert self.tokenizer is not None
        return self.tokenizer.token_shape(self.image_shape[1:])

    def _transformer(self, out_dim: int, causal: bool = False) -> TokenTransformer:
        t = self.params["transformer"]
        return TokenTransformer(
            num_tokens=int(self.params["tokenizer"]["num_embeddings"]), seq_len=int(np.prod(self.token_shape)),
            out_dim=out_dim, dim=int(t["dim"]), depth=int(t["depth"]), heads=int(t["heads"]),
            mlp_ratio=float(t["mlp_ratio"]), drop_path=float(t["drop_path"]), dropout=float(t["dropout"]), causal=causal,
        )

    def _build(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)
        tp = self.params["tokenizer"]
        self.tokenizer = VQTokenizer(
            spatial_dims=len(self.image_shape) - 1, in_channels=self.image_shape[0],
            num_embeddings=int(tp["num_embeddings"]), embedding_dim=int(tp["embedding_dim"]),
            channels=tuple(tp["channels"]), num_res_layers=int(tp["num_res_layers"]),
            commitment_cost=float(tp["commitment_cost"]), decay=float(tp["decay"]),
        )
        self.token_shape  # noqa: B018 - validates divisibility early
        self.nets = self._build_latent()

    def _build_latent(self) -> dict[str, TokenTransformer]:
        raise NotImplementedError

    def _modules(self) -> dict[str, nn.Module]:
        assert self.tokenizer is not None
        return {"tokenizer": self.tokenizer, **self.nets}

    # -- fitting ---------------------------------------------------------------------------------------
    def _train_kw(self) -> dict[str, Any]:
        return {"seed": int(self.params["seed"]), "device": str(self.params["device"]), "amp": bool(self.params["amp"]),
                "run_dir": self.work_dir, "quiet": self.quiet, "resume": self.resume}

    def _reused(self) -> set[str]:
        """Load modules named in ``reuse.modules`` from ``reuse.run_dir``; returns the names loaded."""
        run_dir = self.params["reuse"]["run_dir"]
        if not run_dir:
            return set()
        from safetensors.torch import load_file

        path = Path(run_dir) / "weights.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: reuse.run_dir {run_dir} has no weights.safetensors")
        tensors = load_file(str(path))
        done = set()
        mods = self._modules()
        for name in self.params["reuse"]["modules"]:
            if name not in mods:
                raise KeyError(f"{self.name}: cannot reuse '{name}'; this method has {sorted(mods)}")
            sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            if not sd:
                raise KeyError(f"{self.name}: {path} has no '{name}' weights")
            try:
                mods[name].load_state_dict(sd)
            except RuntimeError as e:
                raise ValueError(f"{self.name}: '{name}' in {path} does not match this configuration ({e})") from e
            done.add(name)
        return done

    def _fit(self, train: Any, val: Any | None = None) -> None:
        x, fg = stack_images(train, "train")
        if x.ndim - 2 not in self.spatial_dims_supported:
            raise ValueError(f"{self.name}: images must have 2 or 3 spatial dims, got shape {tuple(x.shape[1:])}")
        xv, fgv = stack_images(val, "validation") if val is not None and len(val) else (None, None)
        self._build(tuple(x.shape[1:]))
        assert self.tokenizer is not None
        self.train_log = []
        reused = self._reused()
        kw = self._train_kw()
        if "tokenizer" not in reused:
            self.train_log += train_tokenizer(self.tokenizer, x, fg, xv, self.params["tokenizer_train"],
                                              self.params["augment"], **kw)
        self.tokenizer.to(self.device).eval()
        n = int(np.prod(self.token_shape))
        tokens = encode_images(self.tokenizer, torch.cat([x, x.flip(-1)])).view(-1, n)
        vtokens = encode_images(self.tokenizer, xv).view(-1, n) if xv is not None else None
        k = int(self.params["tokenizer"]["num_embeddings"])
        self.token_used = torch.bincount(tokens.flatten(), minlength=k) > 0
        self.train_log.append({"stage": "tokens", "codebook_used": int(self.token_used.sum()), "codebook_size": k})
        self._fit_latent(tokens, vtokens, reused)
        for m in self.nets.values():
            m.to(self.device).eval()
        # threshold on healthy (validation) foreground tokens
        calib_x, calib_fg = (xv, fgv) if xv is not None else (x, fg)
        self.threshold = self._calibrate(calib_x, calib_fg)
        self.train_log.append({"stage": "calibration", "threshold": self.threshold,
                               "on": "validation" if xv is not None else "train"})

    def _fit_latent(self, tokens: torch.Tensor, val_tokens: torch.Tensor | None, reused: set[str]) -> None:
        raise NotImplementedError

    def _token_fg(self, fg: torch.Tensor) -> torch.Tensor:
        """Foreground of the token grid: a token is foreground when its patch touches the foreground."""
        assert self.tokenizer is not None
        pool = F.max_pool2d if fg.ndim == 4 else F.max_pool3d
        return pool(fg.float(), self.tokenizer.factor).flatten(1) > 0

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor, fg: torch.Tensor) -> float:
        th = self.params["restoration"]["threshold"]
        if th["mode"] == "fixed":
            return float(th["value"])
        if th["mode"] != "quantile":
            raise ValueError(f"{self.name}: restoration.threshold.mode must be 'quantile' or 'fixed', got {th['mode']}")
        assert self.tokenizer is not None
        n = int(np.prod(self.token_shape))
        tokens = encode_images(self.tokenizer, x).view(-1, n)
        bs = int(self.params["restoration"]["batch_size"])
        scores = torch.cat([self._score_batch(tokens[i : i + bs]) for i in range(0, len(tokens), bs)])
        tfg = self._token_fg(fg)
        vals = scores[tfg] if tfg.any() else scores.flatten()
        return float(torch.quantile(vals.double(), float(th["quantile"])))

    def _score_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, bool(self.params["amp"])):
            return self._token_scores(tokens.to(self.device)).float().cpu()

    # -- inference -------------------------------------------------------------------------------------
    def _token_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _restore(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _extra_token_scores(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @property
    def used_ids(self) -> torch.Tensor:
        """Sorted ids of the codebook entries seen in training."""
        return self.token_used.nonzero().flatten()

    def logit_bias(self, device: torch.device) -> torch.Tensor:
        """(K,) 0 for codebook entries seen in training, -inf for the others."""
        bias = torch.zeros(len(self.token_used), device=device)
        return bias.masked_fill(~self.token_used.to(device), float("-inf"))

    @torch.no_grad()
    def _predict(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> AnomalyResult:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.name}: images must have shape (B, {', '.join(map(str, self.image_shape))}) as in "
                             f"training, got {tuple(images.shape)}")
        assert self.tokenizer is not None
        rp = self.params["restoration"]
        dev = self.device
        for m in self._modules().values():
            m.to(dev).eval()
        bs, tshape = int(rp["batch_size"]), self.token_shape
        r = int(rp["R"])
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, images.shape[0], bs):
            x = images[i : i + bs].to(dev).float()
            b = x.shape[0]
            with autocast(dev, bool(self.params["amp"])):
                tok = self.tokenizer.encode(x).view(b, -1)
                scores = self._token_scores(tok).float()
                extra = self._extra_token_scores(tok) if rp["extra_token_scores"] else {}
                restored, changed = self._restore(tok, int(rp["seed"]))
                dec = decode_rows(self.tokenizer, restored.reshape(b * r, *tshape))
                ref = x if rp["residual_to"] == "input" else self.tokenizer.decode(tok.view(b, *tshape)).float()
            dec = dec.view(b, r, *x.shape[1:])
            res = (dec - ref.unsqueeze(1)).abs().mean(dim=(1, 2))
            maps = smooth_min_avg(res, int(rp["min_pool"]), int(rp["avg_pool"]))
            if foreground is not None:
                fgb = foreground[i : i + bs].to(dev).bool()[:, 0]
            else:
                fgb = torch.ones_like(maps, dtype=torch.bool)
            maps = maps * fgb
            img_score = image_scores(maps, fgb, **self.params["image_score"])
            parts = {
                "pixel": maps, "image": img_score, "token_scores": scores.view(b, *tshape),
                "restoration": dec.mean(1), "token_resampled": changed.float().mean(1).view(b, *tshape),
                "tokens": tok.view(b, *tshape),
            }
            parts.update({k2: v.float().view(b, *tshape) for k2, v in extra.items()})
            for k2, v in parts.items():
                out.setdefault(k2, []).append(v.cpu())
        cat = {k2: torch.cat(v) for k2, v in out.items()}
        pixel, image = cat.pop("pixel"), cat.pop("image")
        cat["threshold"] = self.threshold
        cat["token_factor"] = self.tokenizer.factor
        return AnomalyResult(pixel_scores=pixel, image_scores=image, extras=cat)

    # -- state -----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"meta.image_shape": torch.tensor(self.image_shape, dtype=torch.int64),
               "meta.threshold": torch.tensor([self.threshold], dtype=torch.float64),
               "meta.token_used": self.token_used.to(torch.uint8)}
        for name, mod in self._modules().items():
            out.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "meta.image_shape" not in tensors:
            raise ValueError(f"{self.name}: weights lack 'meta.image_shape'; not a {self.name} run")
        self._build(tuple(int(v) for v in tensors["meta.image_shape"].tolist()))
        self.threshold = float(tensors["meta.threshold"][0])
        self.token_used = tensors["meta.token_used"].bool() if "meta.token_used" in tensors else torch.ones(
            int(self.params["tokenizer"]["num_embeddings"]), dtype=torch.bool)
        for name, mod in self._modules().items():
            sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            mod.load_state_dict(sd)
            mod.eval()


def derive_defaults(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`COMMON_DEFAULTS` with dotted-key changes, e.g. ``{"restoration.threshold.value": 6}``."""
    out = copy.deepcopy(COMMON_DEFAULTS)
    for key, value in changes.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return out


def derive_schema(latent_modules: tuple[str, ...], **changes: Any) -> dict[str, Any]:
    """:data:`COMMON_SCHEMA` for a method with ``latent_modules`` (the modules ``reuse.modules`` may name), with
    dotted-key changes, e.g. ``{"restoration.threshold.value": Float(0, 1)}``."""
    return with_changes(COMMON_SCHEMA, **{"reuse.modules": ListOf(Options("tokenizer", *latent_modules))}, **changes)


def critic_corruption(bank: MaskBank, mvtm: TokenTransformer, temperature: float = 1.0,
                      logit_bias: torch.Tensor | None = None) -> Any:
    """Token-Critic corruption: brush-masked tokens replaced by MVTM samples; label = the mask."""

    @torch.no_grad()
    def corrupt(y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        m = bank.draw(len(y), rng)
        dev = _dev(mvtm)
        gen = torch.Generator(device=dev).manual_seed(int(rng.integers(0, 2**62)))
        was = mvtm.training
        mvtm.eval()
        logits = mvtm(torch.where(m, torch.full_like(y, mvtm.special_id), y).to(dev)).float()
        mvtm.train(was)
        if logit_bias is not None:
            logits = logits + logit_bias.to(dev)
        s = gumbel_sample(logits, temperature, gen).cpu()
        return torch.where(m, s, y), m

    return corrupt
