"""The shared MAE backbone (medanomaly.nets.mae): patch order, masks, masked loss, averaged reconstructions,
pre-training and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medanomaly.nets.mae import MAE, load_mae_weights, masked_val_loss, patchify, pretrain_mae, unpatchify

torch.set_num_threads(1)

TINY = {"img_size": 16, "patch_size": 4, "hidden_size": 24, "mlp_dim": 32, "num_layers": 1, "num_heads": 2,
        "decoder_hidden_size": 24, "decoder_mlp_dim": 32, "decoder_num_layers": 1, "decoder_num_heads": 2}


def _mae(**kw: object) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**TINY, **kw})


@pytest.mark.parametrize(("shape", "patch"), [((2, 3, 16, 12), (4, 3)), ((2, 2, 8, 8, 4), (2, 4, 2))])
def test_patchify_roundtrip(shape: tuple[int, ...], patch: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    tok = patchify(x, patch)
    n_tokens = int(np.prod([s // p for s, p in zip(shape[2:], patch, strict=True)]))
    assert tok.shape == (shape[0], n_tokens, shape[1] * int(np.prod(patch)))
    assert torch.equal(unpatchify(tok, patch, shape[2:], shape[1]), x)


def test_token_order_matches_monai_patch_embedding() -> None:
    m = _mae()
    emb = m.net.patch_embedding
    with torch.no_grad():  # the conv projection sums each patch into every feature; no position embedding
        emb.patch_embeddings.weight.fill_(1.0)
        emb.patch_embeddings.bias.zero_()
        emb.position_embeddings.zero_()
    x = torch.rand(2, 1, 16, 16)
    conv_tokens = emb(x)[..., 0]
    assert torch.allclose(conv_tokens, patchify(x, (4, 4)).sum(-1), atol=1e-5)


def test_masks_are_seeded_and_consistent() -> None:
    m = _mae()
    keep, mask = m.random_masks(3, 0.75, torch.Generator().manual_seed(1))
    keep2, mask2 = m.random_masks(3, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(keep, keep2) and torch.equal(mask, mask2)
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    assert (mask.sum(1) == 12).all()
    assert (mask.gather(1, keep) == 0).all()
    with pytest.raises(ValueError, match="mask ratio"):
        m.random_masks(1, 1.0)


def test_loss_counts_masked_patches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mae()
    x = torch.rand(2, 1, 16, 16)
    _, mask = m.random_masks(2, 0.5, torch.Generator().manual_seed(3))
    target = patchify(x, m.patch_size)
    # a decoder that is perfect on masked patches and wrong on visible ones gives zero loss
    monkeypatch.setattr(m, "decode", lambda latent, keep: target + 5.0 * (1 - mask).unsqueeze(-1))
    assert float(m.loss(x, 0.5, torch.Generator().manual_seed(3))) == pytest.approx(0.0, abs=1e-7)
    monkeypatch.setattr(m, "decode", lambda latent, keep: target + 1.0 * mask.unsqueeze(-1))
    assert float(m.loss(x, 0.5, torch.Generator().manual_seed(3))) == pytest.approx(1.0)


def test_reconstruct_averages_masked_predictions(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _mae()
    x = torch.rand(2, 1, 16, 16)
    first, second = torch.arange(8).view(1, 8), torch.arange(8, 16).view(1, 8)
    draws = iter([(first, torch.zeros(1, 16).index_fill_(1, second[0], 1.0)),  # draw 1 masks tokens 8-15
                  (second, torch.zeros(1, 16).index_fill_(1, first[0], 1.0))])  # draw 2 masks tokens 0-7
    monkeypatch.setattr(m, "random_masks", lambda *a, **k: next(draws))
    calls = {"n": 0}

    def fake_decode(latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full((latent.shape[0], 16, 16), float(calls["n"]))  # prediction value = draw number

    monkeypatch.setattr(m, "decode", fake_decode)
    tok = patchify(m.reconstruct(x, 0.5, n_masks=2), m.patch_size)
    assert torch.all(tok[:, :8] == 2.0) and torch.all(tok[:, 8:] == 1.0)


def test_reconstruct_is_deterministic_with_seed() -> None:
    m = _mae().eval()
    x = torch.rand(3, 1, 16, 16)
    a = m.reconstruct(x, 0.85, 4, torch.Generator().manual_seed(5), batch_size=2)
    b = m.reconstruct(x, 0.85, 4, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="expected images of shape"):
        m.reconstruct(torch.rand(1, 1, 8, 8))


def test_3d_backbone() -> None:
    m = MAE(**{**TINY, "img_size": 8, "patch_size": 4, "spatial_dims": 3, "hidden_size": 24, "decoder_hidden_size": 24})
    x = torch.rand(2, 1, 8, 8, 8)
    assert torch.isfinite(m.loss(x)) and m.reconstruct(x, 0.5, 2).shape == x.shape
    assert m.features(x).shape == (2, 24)


def test_pretraining_lowers_loss_and_checkpoints(tmp_path: Path) -> None:
    from medanomaly.data import make_toy_dataset, stack_dataset

    x = stack_dataset(make_toy_dataset(16, 16, seed=0))["image"]
    m = _mae()
    before = masked_val_loss(m, x, 0.5)
    res = pretrain_mae(m, x, {"steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "mask_ratio": 0.5,
                              "val_every": 20, "checkpoint_every": 30},
                       val_images=x[:4], run_dir=tmp_path, quiet=True)
    assert masked_val_loss(m, x, 0.5) < 0.5 * before
    assert res.steps_done == 60 and (tmp_path / "checkpoints" / "mae.json").exists()
    with pytest.raises(ValueError, match="NaN"):
        pretrain_mae(m, x * float("nan"), {"steps": 1})


def test_load_weights_from_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = _mae()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    dst = _mae()
    # prefixed (run-folder style) file and bare MONAI state dict
    save_file({f"mae.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(tmp_path / "b.safetensors"))
    for f in ("a.safetensors", "b.safetensors"):
        load_mae_weights(dst, tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="does not exist"):
        load_mae_weights(dst, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_mae_weights(dst, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_mae_weights(MAE(**{**TINY, "hidden_size": 32}), tmp_path / "a.safetensors")
