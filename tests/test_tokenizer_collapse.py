"""The VQ-VAE tokenizer's foreground-balanced L1 and its collapse check (MIM family).

Found on IXI T1 volumes at 6 mm: with the plain L1 the 3D tokenizer learnt a blank output (brain ~15 % of the
voxels), so every restoration map of MIM-OOD, AR and Token Critic was the image itself and the three maps were
bit-identical. The check makes that loud; the balanced loss is the option that trains there."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medanomaly.data import make_toy_dataset
from medanomaly.methods import get_method_class
from medanomaly.methods.mim_ood.common import COLLAPSE_RATIO, balanced_l1, tokenizer_check

torch.set_num_threads(1)


def test_balanced_l1_by_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    err = torch.rand(3, 2, 5, 6, 4, generator=g)
    fg = torch.rand(3, 1, 5, 6, 4, generator=g) > 0.8
    f = fg.expand_as(err)
    want = 0.5 * err[f].mean() + 0.5 * err[~f].mean()
    assert float(balanced_l1(err, fg)) == pytest.approx(float(want), rel=1e-6)
    # a part without voxels adds nothing; the other weighs half
    assert float(balanced_l1(err, torch.zeros_like(fg))) == pytest.approx(0.5 * float(err.mean()), rel=1e-6)
    # with foreground and background of equal size, it is the plain mean
    half = torch.zeros(3, 1, 5, 6, 4, dtype=torch.bool)
    half[..., :2] = True
    assert float(balanced_l1(err, half)) == pytest.approx(float(err.mean()), rel=1e-6)


class _Fake(nn.Module):
    """A stand-in tokenizer: returns ``scale * image`` (0: blank output, 1: perfect reconstruction)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w * x, torch.zeros(())


def test_tokenizer_check_flags_a_blank_output_only() -> None:
    x = torch.rand(10, 1, 8, 8, 8)
    for scale, collapsed in ((0.0, True), (0.05, True), (1.0, False), (0.5, False)):
        tok = _Fake(scale).train()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rec = tokenizer_check(tok, x, batch_size=3)  # type: ignore[arg-type]
        assert rec["collapsed"] is collapsed and rec["ratio"] == pytest.approx(1 - scale, abs=1e-6)
        assert rec["blank_l1"] == pytest.approx(float(x.abs().mean()), rel=1e-6)
        assert any("blank image" in str(m.message) for m in w) is collapsed
        assert tok.training  # the mode is restored
    assert 0 < COLLAPSE_RATIO < 1


def test_loss_option_is_checked_and_recorded_in_the_log() -> None:
    cls = get_method_class("mim-ood")
    with pytest.raises(ValueError, match="l1-balanced"):
        cls(**{**cls.config_set("test"), "tokenizer_train.loss": "l2"})
    logs = {}
    for loss in ("l1", "l1-balanced"):
        det = cls(**{**cls.config_set("test"), "tokenizer.channels": [4, 8], "tokenizer_train.steps": 4,
                     "tokenizer_train.loss": loss, "transformer_train.steps": 2, "restoration.avg_pool": 3})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 4 steps cannot train a tokenizer: the check warns, as it should
            det.fit(make_toy_dataset(4, 16, spatial_dims=3, seed=0), make_toy_dataset(2, 16, spatial_dims=3, seed=1))
        checks = [r for r in det.train_log if r.get("stage") == "tokenizer_check"]
        assert len(checks) == 1 and set(checks[0]) >= {"l1", "blank_l1", "ratio", "collapsed"}
        logs[loss] = [r["loss"] for r in det.train_log if r.get("stage") == "tokenizer" and "loss" in r]
    assert logs["l1"] != logs["l1-balanced"]  # the option changes the training loss
