"""MIM-OOD, AR restoration and MVTM + Token Critic: token nets, restoration procedures and the three detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset, stack_dataset
from medanomaly.methods import get_method_class, load_detector
from medanomaly.methods.base import RunContext
from medanomaly.methods.mim_ood.common import random_token_corruption, train_token_classifier
from medanomaly.nets.tokens import (
    MaskBank,
    TokenTransformer,
    VQTokenizer,
    ar_restore,
    ar_token_nll,
    brush_masks,
    keyed_gumbel_sample,
    mim_restore,
    mvtm_token_nll,
    token_keys,
)

torch.set_num_threads(1)
METHODS = ["mim-ood", "ar-restoration", "token-critic"]


def _tiny(method: str, **over: object) -> object:
    cls = get_method_class(method)
    return cls(**{**cls.config_set("test"), **over})


@pytest.fixture(scope="module")
def toy() -> dict:
    return {
        "train": make_toy_dataset(16, 32, seed=0),
        "val": make_toy_dataset(8, 32, seed=1),
        "test": stack_dataset(make_toy_dataset(6, 32, abnormal_fraction=0.5, seed=2)),
    }


@pytest.fixture(scope="module")
def fitted(toy: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for m in METHODS:
        det = _tiny(m)
        ctx = RunContext(work_dir=tmp_path_factory.mktemp(m.replace("-", "_")), quiet=True)
        out[m] = det.fit(toy["train"], toy["val"], context=ctx)
    return out


# -- nets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_tokenizer_shapes(dims: int) -> None:
    tok = VQTokenizer(dims, 1, num_embeddings=16, embedding_dim=8, channels=(4, 8), num_res_layers=1)
    x = torch.rand(2, 1, *([16] * dims))
    assert tok.factor == 4
    idx = tok.encode(x)
    assert idx.shape == (2, *([4] * dims)) and idx.dtype == torch.long
    assert tok.decode(idx).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.rand(1, 1, *([18] * dims)))


def test_dead_codes_are_restarted() -> None:
    torch.manual_seed(0)
    tok = VQTokenizer(2, 1, num_embeddings=32, embedding_dim=8, channels=(4, 8), num_res_layers=1).train()
    x = torch.rand(8, 1, 16, 16)
    tok(x)  # one EMA update: every entry not picked is "dead" and gets restarted on an encoder output
    emb = tok.vqvae.quantizer.quantizer.embedding.weight
    assert torch.isfinite(emb).all() and emb.abs().max() < 100
    tok.eval()
    assert tok.encode(x).unique().numel() > 1


def test_causal_transformer_ignores_future_tokens() -> None:
    torch.manual_seed(0)
    causal = TokenTransformer(16, 12, 16, dim=16, depth=2, heads=2, drop_path=0.0, causal=True).eval()
    bidir = TokenTransformer(16, 12, 16, dim=16, depth=2, heads=2, drop_path=0.0, causal=False).eval()
    a = torch.randint(0, 16, (2, 12))
    b = a.clone()
    b[:, 8:] = (b[:, 8:] + 1) % 16
    with torch.no_grad():
        assert torch.allclose(causal(a)[:, :8], causal(b)[:, :8], atol=1e-5)
        assert not torch.allclose(bidir(a)[:, :8], bidir(b)[:, :8], atol=1e-5)


def test_brush_masks_coverage_and_determinism() -> None:
    rng = np.random.default_rng(0)
    m = brush_masks((10, 10), 20, rng, np.full(20, 0.3))
    cov = m.reshape(20, -1).mean(1)
    assert (cov >= 0.3).all() and (cov < 0.75).all()
    bank = MaskBank((8, 8), 64, np.random.default_rng(1), "uniform", 0.05, 0.4)
    d1 = bank.draw(5, np.random.default_rng(3))
    d2 = bank.draw(5, np.random.default_rng(3))
    assert d1.shape == (5, 64) and d1.dtype == torch.bool and torch.equal(d1, d2)
    assert MaskBank((4, 4, 4), 8, np.random.default_rng(0)).draw(2, np.random.default_rng(0)).shape == (2, 64)


# -- restoration procedures ------------------------------------------------------------------------------


def _mvtm(k: int = 16, n: int = 16) -> TokenTransformer:
    torch.manual_seed(0)
    return TokenTransformer(k, n, k, dim=16, depth=1, heads=2, drop_path=0.0).eval()


def test_mim_restore_changes_only_selected_tokens_and_batches_r() -> None:
    mvtm = _mvtm()
    tokens = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(0))
    sel = torch.zeros(16, dtype=torch.bool)
    sel[[1, 5, 6, 12]] = True
    calls = []

    def score_fn(y: torch.Tensor) -> torch.Tensor:
        calls.append(y.shape)
        return sel.float().expand(y.shape[0], -1)

    out, changed = mim_restore(tokens, score_fn, mvtm, 0.5, steps=3, restorations=4,
                               seed=1)
    assert out.shape == (3, 4, 16) and changed.shape == (3, 4, 16)
    # the first iteration scores the 3 images (their R rows are still equal), then one batched call per iteration
    assert calls[0] == (3, 16) and all(c == (12, 16) for c in calls[1:]) and len(calls) == 3
    keep = ~sel
    assert torch.equal(out[:, :, keep], tokens[:, None, keep].expand(3, 4, -1))
    assert changed[:, :, sel].all() and not changed[:, :, keep].any()
    assert not torch.equal(out[:, 0], out[:, 1])  # the R restorations are different samples
    again, _ = mim_restore(tokens, score_fn, mvtm, 0.5, steps=3, restorations=4, seed=1)
    assert torch.equal(out, again)
    bias = torch.full((16,), float("-inf"))
    bias[[2, 3]] = 0
    limited, _ = mim_restore(tokens, score_fn, mvtm, 0.5, steps=1, restorations=2, logit_bias=bias)
    assert set(limited[:, :, sel].unique().tolist()) <= {2, 3}


def test_ar_restore_threshold_and_nll() -> None:
    torch.manual_seed(0)
    ar = TokenTransformer(16, 10, 16, dim=16, depth=1, heads=2, drop_path=0.0, causal=True).eval()
    tokens = torch.randint(0, 16, (2, 10))
    nll = ar_token_nll(ar, tokens)
    assert nll.shape == (2, 10) and (nll > 0).all()
    same, res = ar_restore(tokens, ar, float("inf"), restorations=3)
    assert torch.equal(same, tokens[:, None].expand(2, 3, 10)) and not res.any()
    out, res = ar_restore(tokens, ar, -1.0, restorations=3, seed=0)
    assert res.all() and out.shape == (2, 3, 10)
    # a position is changed only where it was flagged
    thr = float(nll.median())
    out, res = ar_restore(tokens, ar, thr, restorations=2, seed=0)
    assert ((out != tokens[:, None]) <= res).all()
    first = nll > thr  # the first flagged position is decided on the original prefix
    i0 = int(first.any(0).nonzero()[0])
    assert torch.equal(res[:, 0, i0], first[:, i0]) and not res[:, :, :i0].any()


def test_keyed_gumbel_sample_follows_softmax_and_is_keyed() -> None:
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0, float("-inf")])
    keys = token_keys(torch.arange(40000).view(-1, 1), seed=3)
    assert len(keys.unique()) > 39000  # distinct inputs, (almost) distinct keys
    draws = keyed_gumbel_sample(logits.expand(len(keys), -1), keys)
    freq = torch.bincount(draws, minlength=5).double() / len(keys)
    expected = logits.softmax(-1).double()
    assert torch.allclose(freq, expected, atol=0.01) and freq[4] == 0  # never a -inf entry
    # equal keys give equal draws, wherever they sit; temperature 0 is argmax
    assert torch.equal(keyed_gumbel_sample(logits.expand(3, -1), keys[[7, 7, 7]]), draws[[7, 7, 7]])
    assert (keyed_gumbel_sample(logits.expand(4, -1), keys[:4], 0.0) == 0).all()
    # the key depends on the seed and on every (position, token)
    t = torch.randint(0, 9, (5, 12), generator=torch.Generator().manual_seed(0))
    t2 = t.clone()
    t2[:, -1] = (t2[:, -1] + 1) % 9
    assert torch.equal(token_keys(t, 0), token_keys(t.clone(), 0))
    assert (token_keys(t, 0) != token_keys(t, 1)).all() and (token_keys(t, 0) != token_keys(t2, 0)).all()
    with pytest.raises(ValueError, match="integer tensor"):
        token_keys(t.float())
    with pytest.raises(ValueError, match="non-negative"):
        token_keys(t - 1)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        keyed_gumbel_sample(logits.expand(3, -1), keys[:2])
    with pytest.raises(ValueError, match="integers"):
        keyed_gumbel_sample(logits.expand(2, -1), torch.tensor([-1, 3]))


def test_mvtm_token_nll_masks_each_token_once() -> None:
    mvtm = _mvtm(n=16)
    tokens = torch.randint(0, 16, (2, 16))
    nll = mvtm_token_nll(mvtm, tokens, (4, 4), stride=2)
    # token (0, 0) is in the group of (0, 0), (0, 2), (2, 0), (2, 2): check it against a manual forward
    m = torch.zeros(16, dtype=torch.bool)
    m[[0, 2, 8, 10]] = True
    with torch.no_grad():
        logp = mvtm(torch.where(m, torch.full_like(tokens, 16), tokens)).log_softmax(-1)
    assert torch.allclose(nll[:, 0], -logp[:, 0].gather(-1, tokens[:, :1]).squeeze(-1), atol=1e-5)
    assert (nll > 0).all()


def test_atd_learns_to_find_corrupted_tokens() -> None:
    """Structured token grids: after a short training the ATD ranks corrupted tokens above clean ones."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    k, side = 16, 6
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    base = torch.from_numpy((ii + jj) % 8).flatten()
    tokens = torch.stack([(base + s) % 8 for s in range(8)]).long()  # 8 "healthy" images using tokens 0..7 only
    used = torch.arange(k)
    bank = MaskBank((side, side), 64, np.random.default_rng(0), "uniform", 0.05, 0.3)
    corrupt = random_token_corruption(bank, used)
    inp, lab = corrupt(tokens, np.random.default_rng(0))
    assert torch.equal(inp != tokens, lab)  # exactly the masked tokens change
    atd = TokenTransformer(k, side * side, 1, dim=32, depth=2, heads=4, drop_path=0.0)
    x, y = corrupt(tokens, np.random.default_rng(123))

    def auroc() -> float:
        with torch.no_grad():
            return roc_auc_score(y.flatten().numpy(), torch.sigmoid(atd(x).squeeze(-1)).flatten().numpy())

    before = auroc()
    train_token_classifier(atd, tokens, None, corrupt, {"steps": 40, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0,
                                                        "warmup_steps": 0, "grad_clip": 1.0, "val_every": 0,
                                                        "checkpoint_every": 0},
                           seed=0, device="cpu", amp=False, run_dir=None, quiet=True, resume=False, name="atd")
    after = auroc()
    assert after > 0.7 and after > before + 0.15


# -- detectors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_detector_fit_predict_save_load(method: str, fitted: dict, toy: dict, tmp_path) -> None:
    det = fitted[method]
    b = toy["test"]
    res = det.predict(b["image"], b["foreground"])
    assert res.pixel_scores.shape == (6, 32, 32) and res.image_scores.shape == (6,)
    assert torch.isfinite(res.pixel_scores).all() and (res.pixel_scores >= 0).all()
    assert (res.pixel_scores[~b["foreground"][:, 0]] == 0).all()  # restricted to the foreground
    assert res.extras["token_scores"].shape == (6, 8, 8) and res.extras["token_factor"] == 4
    assert res.extras["restoration"].shape == (6, 1, 32, 32)
    assert np.isfinite(det.threshold)
    assert any(r.get("stage") == "calibration" for r in det.train_log)
    again = det.predict(b["image"], b["foreground"])
    assert torch.equal(res.pixel_scores, again.pixel_scores)  # seeded sampling: deterministic
    det.save(tmp_path / "run")
    loaded = load_detector(tmp_path / "run")
    assert loaded.threshold == det.threshold
    assert torch.equal(loaded.predict(b["image"], b["foreground"]).pixel_scores, res.pixel_scores)
    with pytest.raises(ValueError, match="shape"):
        det.predict(torch.rand(2, 1, 24, 24))
    with pytest.raises(ValueError, match="NaN"):
        det.predict(torch.full((1, 1, 32, 32), float("nan")))


@pytest.mark.parametrize("method", METHODS)
def test_prediction_does_not_depend_on_the_batch(method: str, fitted: dict, toy: dict) -> None:
    det = fitted[method]
    b = toy["test"]
    rp = det.params["restoration"]
    old = (rp["batch_size"], det.threshold)
    with torch.no_grad():
        det.threshold = min(old[1], float(det._score_batch(det.tokenizer.encode(b["image"]).flatten(1)).median()))
    try:
        rp["batch_size"] = 6
        whole = det.predict(b["image"], b["foreground"])
        assert whole.extras["token_resampled"].sum() > 0  # restorations do resample
        rp["batch_size"] = 2
        pairs = det.predict(b["image"], b["foreground"])
        alone = det.predict(b["image"][[4]], b["foreground"][[4]])
    finally:
        rp["batch_size"], det.threshold = old
    for other in (pairs, alone):
        i = slice(None) if other is pairs else [4]
        assert torch.equal(whole.extras["token_resampled"][i], other.extras["token_resampled"])
        assert torch.allclose(whole.pixel_scores[i], other.pixel_scores, atol=1e-5)


def test_token_scores_extra_and_threshold_rule(fitted: dict, toy: dict) -> None:
    det = fitted["mim-ood"]
    b = toy["test"]
    det.params["restoration"]["extra_token_scores"] = True
    try:
        res = det.predict(b["image"][:2])
    finally:
        det.params["restoration"]["extra_token_scores"] = False
    assert res.extras["token_scores_mvtm"].shape == (2, 8, 8) and (res.extras["token_scores_mvtm"] > 0).all()
    # the quantile rule: about 2% of healthy validation foreground tokens exceed the threshold
    val = stack_dataset(toy["val"])
    tok = det.tokenizer.encode(val["image"]).flatten(1)
    with torch.no_grad():
        s = det._token_scores(tok)
    frac = float((s[det._token_fg(val["foreground"])] > det.threshold).float().mean())
    assert frac <= 0.05


def test_reuse_modules_and_fixed_threshold(fitted: dict, toy: dict, tmp_path) -> None:
    src = fitted["mim-ood"]
    src.save(tmp_path / "mim")
    det = _tiny("token-critic", **{"reuse": {"run_dir": str(tmp_path / "mim"), "modules": ["tokenizer", "mvtm"]},
                                   "restoration.threshold.mode": "fixed", "restoration.threshold.value": 0.3})
    det.fit(toy["train"])
    for a, b in zip(det.tokenizer.state_dict().values(), src.tokenizer.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    assert det.threshold == 0.3
    assert not any(r.get("stage") in ("tokenizer", "mvtm") for r in det.train_log)
    with pytest.raises(ValueError, match=r"reuse.modules\[0\] = 'atd': expected one of"):  # refused when built
        _tiny("token-critic", **{"reuse": {"run_dir": str(tmp_path / "mim"), "modules": ["atd"]}})


def test_mim_ood_and_token_critic_share_one_restoration(fitted: dict, toy: dict) -> None:
    from medanomaly.methods.mim_ood.restoration import MVTMRestorationDetector

    mim_cls, critic_cls = get_method_class("mim-ood"), get_method_class("token-critic")
    for name in ("_build_latent", "_token_scores", "_restore", "_extra_token_scores", "_predict"):
        assert getattr(mim_cls, name) is getattr(critic_cls, name) is getattr(MVTMRestorationDetector, name), name
    # the critic given the ATD's weights (and the same tokenizer, MVTM, threshold) restores exactly as MIM-OOD
    mim, b = fitted["mim-ood"], toy["test"]
    critic = _tiny("token-critic", **{"restoration.extra_token_scores": True})
    critic.load_state_tensors({k.replace("atd.", "critic.", 1) if k.startswith("atd.") else k: v
                               for k, v in mim.state_tensors().items()})
    critic.is_fitted = True  # as load_detector does after load_state_tensors
    mim.params["restoration"]["extra_token_scores"] = True
    try:
        a = mim.predict(b["image"][:3], b["foreground"][:3])
    finally:
        mim.params["restoration"]["extra_token_scores"] = False
    c = critic.predict(b["image"][:3], b["foreground"][:3])
    assert torch.equal(a.pixel_scores, c.pixel_scores)
    for k in ("token_scores", "token_resampled", "restoration", "token_scores_mvtm"):
        assert torch.equal(a.extras[k], c.extras[k]), k


def test_3d_volumes() -> None:
    det = _tiny("mim-ood", **{"tokenizer.channels": [4, 8], "tokenizer_train.steps": 5, "transformer_train.steps": 5,
                              "restoration.avg_pool": 3})
    tr = make_toy_dataset(4, 16, spatial_dims=3, seed=0)
    det.fit(tr)
    b = stack_dataset(make_toy_dataset(2, 16, spatial_dims=3, abnormal_fraction=0.5, seed=1))
    res = det.predict(b["image"], b["foreground"])
    assert res.pixel_scores.shape == (2, 16, 16, 16) and res.extras["token_scores"].shape == (2, 4, 4, 4)


def test_bad_training_input() -> None:
    from medanomaly.data import ArrayDataset

    with pytest.raises(ValueError, match="empty"):
        _tiny("mim-ood").fit(make_toy_dataset(4, 32).subset([]))
    with pytest.raises(ValueError, match="divisible"):
        _tiny("mim-ood").fit(make_toy_dataset(4, 30))
    bad = np.zeros((2, 1, 32, 32), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _tiny("ar-restoration").fit(ArrayDataset(bad))
