"""Token models for two-stage (tokenizer + latent transformer) anomaly detection (MIM-OOD and its baselines).

- :class:`VQTokenizer`: a thin wrapper around MONAI's ``VQVAE`` that turns images into integer token grids
  and back (2D or 3D), with the downsampling factor ``f`` derived from the number of encoder levels.
- :class:`TokenTransformer`: a bidirectional or causal transformer over a flattened token grid, built from
  MONAI ``TransformerBlock`` layers. MONAI's block has no stochastic depth, so it is added here at the level
  of whole blocks (a block is skipped per sample with probability ``p``, the residual update is rescaled by
  ``1/(1-p)`` otherwise), which is the original form of stochastic depth (Huang et al., 2016).
- :func:`brush_masks`: random-walk brush masks on the token grid with a target coverage, and
  :class:`MaskBank`, a pre-generated bank of them for fast, seed-deterministic training batches.
- Restoration procedures: :func:`mim_restore` (MIM-OOD: detector-selected tokens resampled by the MVTM, T
  iterations, R restorations as one batch), :func:`ar_restore` (raster-order AR resampling of tokens whose NLL
  exceeds a threshold), :func:`ar_token_nll` and :func:`mvtm_token_nll` (token-level scores).
- Keyed sampling (:func:`token_keys`, :func:`keyed_gumbel_sample`): restorations draw their random numbers from a
  counter-based hash of (seed, the image's tokens, restoration r, iteration, position, codebook entry) instead of
  a stateful generator, so an image gets the same restorations whatever batch it comes in, on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from medanomaly.training.progress import track

__all__ = [
    "VQTokenizer",
    "TokenTransformer",
    "MaskBank",
    "brush_masks",
    "gumbel_sample",
    "keyed_gumbel_sample",
    "token_keys",
    "mim_restore",
    "ar_restore",
    "ar_token_nll",
    "mvtm_token_nll",
]


class VQTokenizer(nn.Module):
    """Images (B, C, *S) <-> token grids (B, *S/f) through MONAI's ``VQVAE`` (EMA codebook).

    ``channels`` has one entry per downsampling level (stride 2 each), so ``factor = 2 ** len(channels)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_embeddings: int = 256,
        embedding_dim: int = 256,
        channels: Sequence[int] = (64, 128, 256),
        num_res_layers: int = 2,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
    ) -> None:
        super().__init__()
        from monai.networks.nets import VQVAE

        if spatial_dims not in (2, 3):
            raise ValueError(f"VQTokenizer: spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 1:
            raise ValueError("VQTokenizer: channels needs at least one level")
        n = len(channels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_embeddings = num_embeddings
        self.factor = 2**n
        self.vqvae = VQVAE(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            num_res_layers=num_res_layers,
            num_res_channels=tuple(channels),
            downsample_parameters=((2, 4, 1, 1),) * n,
            upsample_parameters=((2, 4, 1, 1, 0),) * n,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            ddp_sync=False,
        )

    def token_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        bad = [s for s in spatial if s % self.factor]
        if bad:
            raise ValueError(f"VQTokenizer: image size {tuple(spatial)} must be divisible by the factor f={self.factor}")
        return tuple(s // self.factor for s in spatial)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and quantisation (commitment) loss. In training mode, dead codebook entries are
        restarted (see :meth:`restart_dead_codes`)."""
        z = self.vqvae.encode(images)
        q, qloss = self.vqvae.quantize(z)
        if self.training:
            self.restart_dead_codes(z)
        return self.vqvae.decode(q), qloss

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, min_usage: float = 0.01) -> int:
        """Move codebook entries whose EMA usage fell below ``min_usage`` onto random encoder outputs of ``z``.

        MONAI's EMA quantiser divides the running sums by a Laplace-smoothed usage, so an entry never picked
        grows without bound after the first update and is never picked again (codebook collapse; decoding it
        gives garbage). Restarting such entries on current encoder outputs is the usual remedy."""
        quant = self.vqvae.quantizer.quantizer
        dead = (quant.ema_cluster_size < min_usage).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])
        pick = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
        quant.embedding.weight.data[dead] = pick
        quant.ema_w.data[dead] = pick
        quant.ema_cluster_size.data[dead] = 1.0
        return int(dead.numel())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, *S/f) long token indices."""
        self.token_shape(images.shape[2:])
        return self.vqvae.index_quantize(images).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *S/f) token indices -> (B, C, *S) images."""
        return self.vqvae.decode_samples(tokens.long())


class TokenTransformer(nn.Module):
    """Transformer over a flattened token sequence of length ``seq_len``.

    Input ids are in ``[0, num_tokens]``: the extra id ``num_tokens`` is ``[MASK]`` for bidirectional models and
    ``[BOS]`` for causal ones (see :attr:`special_id`). Output: (B, L, out_dim) logits.
    """

    def __init__(
        self,
        num_tokens: int,
        seq_len: int,
        out_dim: int,
        dim: int = 256,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        if dim % heads:
            raise ValueError(f"TokenTransformer: dim {dim} is not divisible by heads {heads}")
        self.num_tokens, self.seq_len, self.causal = num_tokens, seq_len, causal
        self.special_id = num_tokens
        self.embed = nn.Embedding(num_tokens + 1, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, int(dim * mlp_ratio), heads, dropout_rate=dropout, qkv_bias=True, causal=causal,
                             sequence_length=1 if causal else None, use_flash_attention=True)
            for _ in range(depth)
        )
        # MONAI wants a sequence length for causal blocks only to build a (1, 1, L, L) float mask that its fused
        # attention never reads (is_causal): 1.3 GB per block at 18,000 tokens (a full 3D volume), hence length 1 above;
        # the dummy buffer is dropped, and older checkpoints' masks are skipped on load
        for blk in self.blocks:
            if "causal_mask" in blk.attn._buffers:
                del blk.attn._buffers["causal_mask"]
                blk.attn.causal_mask = torch.Tensor()
        self.register_load_state_dict_pre_hook(_drop_causal_masks)
        self.drop_rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.seq_len:
            raise ValueError(f"TokenTransformer: ids must be (B, L<={self.seq_len}), got {tuple(ids.shape)}")
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for blk, p in zip(self.blocks, self.drop_rates, strict=True):
            if self.training and p > 0:
                keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= p).to(x.dtype) / (1 - p)
                x = x + (blk(x) - x) * keep
            else:
                x = blk(x)
        return self.head(self.norm(x))

    def new_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty key/value cache for :meth:`forward_cached` (causal models, eval mode)."""
        blk = self.blocks[0].attn
        shape = (len(self.blocks), 2, batch, blk.num_heads, self.seq_len, blk.dim_head)
        return KVCache(torch.empty(shape, device=device, dtype=dtype))

    def forward_cached(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, L, out_dim) of ``ids`` (B, L) at positions ``cache.length .. cache.length + L - 1`` given the
        cached keys/values of the earlier positions, which are extended by these L. Equals the last L rows of
        ``forward`` on the whole prefix (causal models in eval mode; up to floating-point rounding)."""
        if not self.causal or self.training:
            raise RuntimeError("TokenTransformer.forward_cached: only for causal models in eval mode")
        t0, n = cache.length, ids.shape[1]
        if t0 + n > self.seq_len:
            raise ValueError(f"TokenTransformer.forward_cached: {t0 + n} positions exceed seq_len {self.seq_len}")
        x = self.embed(ids) + self.pos[:, t0 : t0 + n]
        b = ids.shape[0]
        for li, blk in enumerate(self.blocks):
            att = blk.attn
            qkv = att.qkv(blk.norm1(x)).view(b, n, 3, att.num_heads, att.dim_head).permute(2, 0, 3, 1, 4)
            cache.kv[li, :, :, :, t0 : t0 + n] = qkv[1:]
            k, v = cache.kv[li, 0, :, :, : t0 + n], cache.kv[li, 1, :, :, : t0 + n]
            # a query at t0 + j sees keys 0 .. t0 + j: causal within the new block, everything cached before it. From an
            # empty cache (the prefill) that is plain causal attention: is_causal, as the full forward does, so that
            # no (n, n) mask is built and the fused kernel never materialises the (B, heads, n, n) scores
            if n == 1 or t0 == 0:
                mask, causal = None, n > 1
            else:
                mask, causal = torch.ones(n, t0 + n, dtype=torch.bool, device=x.device).tril(t0), False
            a = torch.nn.functional.scaled_dot_product_attention(qkv[0], k, v, attn_mask=mask, scale=att.scale,
                                                                 is_causal=causal)
            x = x + att.out_proj(a.transpose(1, 2).reshape(b, n, -1))
            x = x + blk.mlp(blk.norm2(x))
        cache.length = t0 + n
        return self.head(self.norm(x))


def _drop_causal_masks(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Load-time hook: older checkpoints hold MONAI's unused causal-mask buffers; they are skipped."""
    for k in [k for k in state_dict if k.startswith(prefix) and k.endswith(".attn.causal_mask")]:
        del state_dict[k]


class KVCache:
    """Keys and values (layers, 2, B, heads, seq_len, head_dim) of the positions ``0 .. length - 1``."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv, self.length = kv, 0


# -- brush masks on the token grid ------------------------------------------------------------------------


def _one_brush(shape: tuple[int, ...], rng: np.random.Generator, coverage: float, max_width: float) -> np.ndarray:
    """A random walk of a brush with randomly changing width until ``coverage`` of the grid is painted."""
    nd = len(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    out = np.zeros(shape, bool)
    target = max(1, int(round(coverage * out.size)))
    for _ in range(64):  # strokes
        pos = rng.uniform(0, np.array(shape) - 1)
        direction = rng.standard_normal(nd)
        width = rng.uniform(0.5, max_width)
        for _ in range(int(rng.integers(2, 4 * max(shape)))):
            d2 = ((grid - pos) ** 2).sum(-1)
            out |= d2 <= (width / 2) ** 2 + 0.25
            if out.sum() >= target:
                return out
            direction = direction + 0.6 * rng.standard_normal(nd)
            direction /= np.linalg.norm(direction) + 1e-8
            pos = np.clip(pos + direction, 0, np.array(shape) - 1)
            width = float(np.clip(width + rng.uniform(-0.5, 0.5), 0.5, max_width))
    return out


def brush_masks(shape: Sequence[int], n: int, rng: np.random.Generator, coverages: Sequence[float] | np.ndarray,
                max_width: float | None = None) -> np.ndarray:
    """``n`` brush random-walk masks (n, *shape) on a token grid, mask i painting about ``coverages[i]``.

    Written here rather than taken from ``medanomaly.synth`` because token grids are tiny (8-20 cells a side)
    and the training schedules need a controlled coverage per mask.
    """
    shape = tuple(int(s) for s in shape)
    max_width = max_width if max_width is not None else max(1.5, min(shape) / 3)
    return np.stack([_one_brush(shape, rng, float(c), max_width) for c in np.asarray(coverages)[:n]])


class MaskBank:
    """A pre-generated bank of brush masks; ``draw`` picks masks and random flips, deterministic in ``rng``."""

    def __init__(self, shape: Sequence[int], size: int, rng: np.random.Generator, schedule: str = "cosine",
                 low: float = 0.02, high: float = 0.5) -> None:
        u = rng.uniform(0, 1, size)
        if schedule == "cosine":  # MaskGIT: ratio = cos(pi/2 * u), u ~ U(0, 1)
            cov = np.clip(np.cos(0.5 * np.pi * u), 1.0 / np.prod(shape), 1.0)
        elif schedule == "uniform":
            cov = low + (high - low) * u
        else:
            raise ValueError(f"MaskBank: unknown schedule '{schedule}' (cosine | uniform)")
        self.shape = tuple(int(s) for s in shape)
        self.masks = brush_masks(self.shape, size, rng, cov)

    def draw(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """(n, prod(shape)) bool masks."""
        m = self.masks[rng.integers(0, len(self.masks), n)]
        for ax in range(1, m.ndim):
            flip = rng.uniform(size=n) < 0.5
            m = np.where(flip.reshape(-1, *([1] * (m.ndim - 1))), np.flip(m, ax), m)
        return torch.from_numpy(np.ascontiguousarray(m).reshape(n, -1))


# -- restoration ------------------------------------------------------------------------------------------


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample indices from ``softmax(logits / temperature)`` along the last dim (Gumbel-max trick)."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
    return (logits.float() / temperature + g).argmax(-1)


_M31 = 0x7FFFFFFF


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 values in [0, 2**31) (xor-shift-multiply rounds; products stay below 2**58)."""
    x = x ^ (x >> 16)  # a new tensor; the rest works in place on it
    x.mul_(0x45D9F3B).bitwise_and_(_M31)
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M31)
    return x.bitwise_xor_(x >> 16)


def _mix(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Combine a 31-bit key with a non-negative integer (tensor or int) into a new key."""
    return _hash31(key ^ _hash31(torch.as_tensor(value, device=key.device, dtype=torch.int64) & _M31))


mix_key = _mix  # public name (the restoration loops' draw keys: mix_key(mix_key(row key, iteration), position))


def token_keys(tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A 31-bit key (B,) for each row of ``tokens`` (B, N): a hash of the seed and of every (position, token)."""
    if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"token_keys: tokens must be an integer tensor (B, N), got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError("token_keys: token ids must be non-negative")
    t = tokens.long()
    pos = torch.arange(t.shape[1], device=t.device)
    per_token = _hash31((_hash31(pos * 2 + 1) ^ t) & _M31)
    return _mix(per_token.sum(1) & _M31, int(seed) & _M31)


def keyed_gumbel_sample(logits: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sample one index per row of ``logits`` (M, K) from ``softmax(logits / temperature)``; the Gumbel noise of
    row m is a fixed function of ``keys[m]`` (M,), so equal keys give equal draws on any device and in any batch."""
    if logits.ndim != 2 or keys.shape != logits.shape[:1]:
        raise ValueError(f"keyed_gumbel_sample: logits must be (M, K) and keys (M,), got {tuple(logits.shape)} and "
                         f"{tuple(keys.shape)}")
    if keys.is_floating_point() or (keys.numel() and (int(keys.min()) < 0 or int(keys.max()) > _M31)):
        raise ValueError("keyed_gumbel_sample: keys must be integers in [0, 2**31) (see token_keys)")
    if temperature <= 0:
        return logits.argmax(-1)
    k = torch.arange(logits.shape[-1], device=logits.device)
    h = _hash31(keys.unsqueeze(-1) ^ _hash31(k + 0x2545F49))
    u = (h >> 7).float().add_(0.5).div_(2.0**24)  # 24-bit uniform in (0, 1), exact in float32
    g = u.log_().neg_().log_().neg_()  # Gumbel noise
    return g.add_(logits.float() / temperature).argmax(-1)


def row_keys(tokens: torch.Tensor, restorations: int, seed: int) -> torch.Tensor:
    """Keys (B*R,) of the restoration rows: the image's token key mixed with r."""
    keys = token_keys(tokens, seed).repeat_interleave(restorations)
    return _mix(keys, torch.arange(restorations, device=tokens.device).repeat(tokens.shape[0]))


@torch.no_grad()
def mim_restore(
    tokens: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    mvtm: TokenTransformer,
    threshold: float,
    steps: int = 8,
    restorations: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    logit_bias: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MIM-OOD restoration of flattened tokens (B, N). ``progress``: a progress bar over the T iterations.

    The R restorations of every image run as one (B*R, N) batch; each of the T iterations is one forward of the
    detector (``score_fn``: tokens -> per-token anomaly probabilities) and one of the MVTM. In the first iteration the
    R rows of an image are still equal, so both forwards run on the B images only (same result: a row's output does
    not depend on the other rows of the batch). Tokens scoring above
    ``threshold`` are replaced by ``[MASK]`` and re-sampled from the MVTM; the others are kept. ``logit_bias`` (K,)
    is added to the logits before sampling (e.g. ``-inf`` for codebook entries never seen in training). Draws are
    keyed by (``seed``, the image's tokens, r, iteration, position): an image's restorations do not depend on the
    batch it is in (up to floating-point differences of batched matrix products).
    Returns restored tokens (B, R, N) and the union over iterations of the resampled positions (B, R, N).
    """
    b, n = tokens.shape
    y = tokens.repeat_interleave(restorations, 0)
    union = torch.zeros_like(y, dtype=torch.bool)
    rows = row_keys(tokens, restorations, seed)
    for step in track(range(steps), desc="MIM restoration", quiet=not progress, unit="iter"):
        if step == 0:
            # the R rows of an image are still equal: one detector and one MVTM forward per image, not per row
            m0 = score_fn(tokens) > threshold
            if not m0.any():
                break
            m = m0.repeat_interleave(restorations, 0)
            logits = mvtm(torch.where(m0, torch.full_like(tokens, mvtm.special_id), tokens))
            ri, pi = m.nonzero(as_tuple=True)
            sel = logits[ri // restorations, pi].float()
        else:
            m = score_fn(y) > threshold
            if not m.any():
                break
            logits = mvtm(torch.where(m, torch.full_like(y, mvtm.special_id), y))
            ri, pi = m.nonzero(as_tuple=True)
            sel = logits[ri, pi].float()
        if logit_bias is not None:
            sel = sel + logit_bias
        y = y.clone()
        y[ri, pi] = keyed_gumbel_sample(sel, _mix(_mix(rows[ri], step), pi), temperature)
        union |= m
    return y.view(b, restorations, n), union.view(b, restorations, n)


@torch.no_grad()
def ar_token_nll(ar: TokenTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, N) under a causal model in raster order (one forward)."""
    bos = torch.full_like(tokens[:, :1], ar.special_id)
    logp = ar(torch.cat([bos, tokens[:, :-1]], 1)).float().log_softmax(-1)
    return -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def ar_restore(
    tokens: torch.Tensor,
    ar: TokenTransformer,
    threshold: float,
    restorations: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    logit_bias: torch.Tensor | None = None,
    kv_cache: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AR restoration (Naval Marimont & Tarroni, 2021) of flattened tokens (B, N).

    Positions are visited in raster order; at position i the NLL of the current token given the (already
    restored) prefix is computed and, when above ``threshold``, the token is replaced by a sample from the model.
    The loop over positions is inherent to AR models; images and the R restorations are batched. Positions before
    the first flagged one (in the whole batch) keep their tokens and are skipped exactly. ``logit_bias`` as in
    :func:`mim_restore` (applied to sampling only, not to the NLL test); draws keyed as there. ``kv_cache``: each
    step feeds only the newest token and reuses the keys/values of the prefix (:meth:`TokenTransformer.forward_cached`,
    O(N) per step instead of a forward over the whole O(N) prefix); ``False`` runs the naive loop (same tokens up to
    floating-point rounding). ``progress``: a progress bar over the positions. Returns restored tokens (B, R, N) and
    the resampled positions (B, R, N).
    """
    b, n = tokens.shape
    y = tokens.repeat_interleave(restorations, 0).clone()
    resampled = torch.zeros_like(y, dtype=torch.bool)
    flagged = ar_token_nll(ar, tokens) > threshold
    if not flagged.any():
        return y.view(b, restorations, n), resampled.view(b, restorations, n)
    start = int(flagged.any(0).nonzero()[0])
    bos = torch.full_like(y[:, :1], ar.special_id)
    rows = row_keys(tokens, restorations, seed)
    cache = ar.new_cache(y.shape[0], y.device, ar.pos.dtype) if kv_cache else None
    for i in track(range(start, n), desc="AR restoration", quiet=not progress, unit="pos"):
        if cache is None:
            logits = ar(torch.cat([bos, y[:, :i]], 1))[:, -1].float()
        elif i == start:  # prefill: BOS and the kept prefix in one forward
            logits = ar.forward_cached(torch.cat([bos, y[:, :i]], 1), cache)[:, -1].float()
        else:
            logits = ar.forward_cached(y[:, i - 1 : i], cache)[:, -1].float()
        nll = -logits.log_softmax(-1).gather(-1, y[:, i : i + 1]).squeeze(-1)
        m = nll > threshold
        if m.any():
            ri = m.nonzero().squeeze(1)
            sel = logits[ri] if logit_bias is None else logits[ri] + logit_bias
            y[ri, i] = keyed_gumbel_sample(sel, _mix(_mix(rows[ri], 0), i), temperature)
            resampled[:, i] = m
    return y.view(b, restorations, n), resampled.view(b, restorations, n)


@torch.no_grad()
def mvtm_token_nll(mvtm: TokenTransformer, tokens: torch.Tensor, grid: Sequence[int], stride: int = 2) -> torch.Tensor:
    """Per-token NLL (B, N) under the MVTM: tokens are masked in ``stride**d`` interleaved groups (one forward per
    group, every token masked exactly once) and scored by ``-log p(y_i | visible tokens)``."""
    b, n = tokens.shape
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, device=tokens.device) for s in grid], indexing="ij"), -1)
    group = (coords % stride).reshape(n, -1)
    gid = sum(group[:, d] * stride**d for d in range(group.shape[1]))
    out = torch.zeros(b, n, device=tokens.device)
    for g in range(stride ** len(grid)):
        m = (gid == g).unsqueeze(0).expand(b, n)
        logp = mvtm(torch.where(m, torch.full_like(tokens, mvtm.special_id), tokens)).float().log_softmax(-1)
        nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        out = torch.where(m, nll, out)
    return out
