"""Faster restoration paths give the results of the slow ones: the key/value-cached AR loop vs the naive loop, and
MIM-OOD's batched restoration (all R restorations of all images in one forward per iteration) vs one image at a time."""

from __future__ import annotations

import pytest
import torch

from medanomaly.nets.tokens import (
    TokenTransformer,
    ar_restore,
    ar_token_nll,
    keyed_gumbel_sample,
    mim_restore,
    mix_key,
    row_keys,
)


def _ar(seq: int = 24, k: int = 32) -> TokenTransformer:
    torch.manual_seed(0)
    return TokenTransformer(k, seq, k, dim=32, depth=2, heads=4, drop_path=0.0, causal=True).eval()


def test_forward_cached_matches_full_forward() -> None:
    ar = _ar()
    ids = torch.randint(0, 33, (3, 24))
    full = ar(ids)
    cache = ar.new_cache(3, "cpu")
    parts = [ar.forward_cached(ids[:, :5], cache)] + [ar.forward_cached(ids[:, i : i + 1], cache) for i in range(5, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        ar.forward_cached(ids[:, :1], cache)
    with pytest.raises(RuntimeError, match="causal"):
        ar.train().forward_cached(ids[:, :1], ar.new_cache(3, "cpu"))


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9])
def test_cached_ar_gives_the_naive_loop_tokens(quantile: float) -> None:
    ar = _ar()
    tokens = torch.randint(0, 32, (4, 24))
    thr = float(ar_token_nll(ar, tokens).quantile(quantile)) if quantile else -1.0
    bias = torch.zeros(32)
    bias[-3:] = float("-inf")
    naive = ar_restore(tokens, ar, thr, restorations=3, seed=7, logit_bias=bias, kv_cache=False)
    cached = ar_restore(tokens, ar, thr, restorations=3, seed=7, logit_bias=bias, kv_cache=True)
    assert naive[1].any()  # something was resampled, so the comparison means something
    assert torch.equal(naive[0], cached[0]) and torch.equal(naive[1], cached[1])


def test_batched_mim_restoration_equals_per_image() -> None:
    torch.manual_seed(0)
    mvtm = TokenTransformer(32, 20, 32, dim=32, depth=2, heads=4, drop_path=0.0).eval()
    det = TokenTransformer(32, 20, 1, dim=32, depth=1, heads=4, drop_path=0.0).eval()

    def score(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(det(t).squeeze(-1))

    tokens = torch.randint(0, 32, (5, 20))
    with torch.no_grad():
        thr = float(score(tokens).median())
    batched = mim_restore(tokens, score, mvtm, thr, steps=4, restorations=3, seed=1)
    single = [mim_restore(tokens[i : i + 1], score, mvtm, thr, steps=4, restorations=3, seed=1) for i in range(5)]
    assert batched[1].any()
    assert torch.equal(batched[0], torch.cat([s[0] for s in single]))
    assert torch.equal(batched[1], torch.cat([s[1] for s in single]))


def _mim_restore_all_rows(tokens, score_fn, mvtm, threshold, steps, restorations, seed, logit_bias=None):
    """The restoration loop before the first-iteration shortcut: every forward on all B*R rows."""
    b, n = tokens.shape
    y = tokens.repeat_interleave(restorations, 0)
    union = torch.zeros_like(y, dtype=torch.bool)
    rows = row_keys(tokens, restorations, seed)
    for step in range(steps):
        m = score_fn(y) > threshold
        if not m.any():
            break
        logits = mvtm(torch.where(m, torch.full_like(y, mvtm.special_id), y))
        ri, pi = m.nonzero(as_tuple=True)
        sel = logits[ri, pi].float()
        if logit_bias is not None:
            sel = sel + logit_bias
        y = y.clone()
        y[ri, pi] = keyed_gumbel_sample(sel, mix_key(mix_key(rows[ri], step), pi), 1.0)
        union |= m
    return y.view(b, restorations, n), union.view(b, restorations, n)


@pytest.mark.parametrize("steps", [1, 4])
def test_first_iteration_on_the_images_gives_the_all_rows_tokens(steps: int) -> None:
    """MIM-OOD's first iteration runs detector and MVTM on the B images instead of the B*R equal rows: same tokens."""
    torch.manual_seed(0)
    mvtm = TokenTransformer(32, 20, 32, dim=32, depth=2, heads=4, drop_path=0.0).eval()
    det = TokenTransformer(32, 20, 1, dim=32, depth=1, heads=4, drop_path=0.0).eval()

    def score(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(det(t).squeeze(-1))

    tokens = torch.randint(0, 32, (5, 20))
    bias = torch.zeros(32)
    bias[-4:] = float("-inf")
    with torch.no_grad():
        thr = float(score(tokens).quantile(0.7))
        ref = _mim_restore_all_rows(tokens, score, mvtm, thr, steps, 3, 2, bias)
    new = mim_restore(tokens, score, mvtm, thr, steps=steps, restorations=3, seed=2, logit_bias=bias)
    assert ref[1].any()
    assert torch.equal(ref[0], new[0]) and torch.equal(ref[1], new[1])


def test_decoding_in_chunks_of_rows_gives_the_whole_batch_decoding() -> None:
    from medanomaly.methods.mim_ood.common import decode_rows
    from medanomaly.nets.tokens import VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(spatial_dims=3, in_channels=1, num_embeddings=16, embedding_dim=8, channels=(4, 8)).eval()
    ids = torch.randint(0, 16, (5, 2, 3, 2))
    with torch.no_grad():
        whole = tok.decode(ids).float()
        assert torch.equal(decode_rows(tok, ids), whole)  # fits the budget: one call, unchanged
        # one or two rows at a time: the convolutions' rounding may differ with the batch (oneDNN), values do not
        torch.testing.assert_close(decode_rows(tok, ids, max_voxels=1), whole, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(decode_rows(tok, ids, max_voxels=2 * 96), whole, atol=1e-6, rtol=1e-6)
