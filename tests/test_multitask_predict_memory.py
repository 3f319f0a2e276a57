"""Lean whole-volume prediction of ``multitask`` (issue 16): the same maps as the plain computation, a progress bar.

The reference below is the computation before the memory work, kept here on purpose: the positional channels from
``PositionalEncoding.forward`` (the full cached encoding concatenated to the image), replicate padding to the
stride, ``DynUNet.forward``, crop, sigmoid; an ensemble map is the members' maps summed in member order, divided by
the number of members, zeroed outside the foreground. The new path builds the padded input slab by slab, runs the
blocks while freeing what they consumed, and shares one input between the members; it must give the same numbers.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medanomaly.evaluation.scoring import image_scores
from medanomaly.methods.base import RunContext
from medanomaly.methods.multitask import MultiTaskDetector, MultiTaskUNet
from medanomaly.methods.multitask import model as mt_model

torch.set_num_threads(1)

POSENC = {"coords": True, "n_fourier": 3, "fourier_scale": 4.0, "seed": 42}
ATOL = 1e-6  # float rounding at most; a different computation is orders of magnitude off


# ----------------------------------------------------------------------------- the reference (old) computation
def reference_input(net: MultiTaskUNet, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    z = net.posenc(x)  # torch.cat([x, full cached encoding])
    pad: list[int] = []
    for s in reversed(x.shape[2:]):
        extra = (-s) % net.multiple
        pad += [extra // 2, extra - extra // 2]
    return (F.pad(z, pad, mode="replicate") if any(pad) else z), pad


def reference_logits(net: MultiTaskUNet, z: torch.Tensor) -> torch.Tensor:
    """Logits of an input with positional channels, any size: pad, DynUNet.forward, crop."""
    spatial = z.shape[2:]
    pad: list[int] = []
    for s in reversed(spatial):
        extra = (-s) % net.multiple
        pad += [extra // 2, extra - extra // 2]
    out = net.net(F.pad(z, pad, mode="replicate") if any(pad) else z)
    lows = [pad[2 * (len(spatial) - 1 - d)] for d in range(len(spatial))]
    return out[(slice(None), slice(None), *(slice(lo, lo + n) for lo, n in zip(lows, spatial, strict=True)))]


@torch.no_grad()
def reference_scores(net: MultiTaskUNet, x: torch.Tensor, roi: tuple[int, ...] | None = None) -> torch.Tensor:
    z = net.posenc(x)
    if roi is None:
        return torch.sigmoid(reference_logits(net, z))
    return torch.sigmoid(sliding_window_inference(z, roi, 1, lambda w: reference_logits(net, w), overlap=0.25,
                                                  mode="gaussian"))


def reference_ensemble(det: MultiTaskDetector, images: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The old ``_predict``: member by member, each over the batches of ``predict.batch_size`` (the batch size
    changes the convolutions' rounding, so the reference uses the same batches)."""
    bs = det.params["predict"]["batch_size"]
    maps = [torch.cat([reference_scores(net.eval(), images[s:s + bs])[:, 0] for s in range(0, len(images), bs)])
            for net in det.models]
    total = torch.zeros(maps[0].shape)
    for mp in maps:
        total += mp
    pixel = (total / len(maps)) * fg[:, 0].bool()
    return pixel, image_scores(pixel, fg[:, 0].bool(), **det.params["image_score"]), torch.stack(maps)


# ----------------------------------------------------------------------------- helpers
def tiny_net(dims: int = 3, seed: int = 0, depth: int = 4) -> MultiTaskUNet:
    torch.manual_seed(seed)
    net = MultiTaskUNet(dims, 1, depth=depth, base_filters=4, max_filters=8, posenc=dict(POSENC)).eval()
    with torch.no_grad():  # a less flat output than the 0.02 start
        net.net.output_block.conv.conv.bias.fill_(0.0)
    return net


def tiny_detector(n_members: int = 3, dims: int = 3, **predict) -> MultiTaskDetector:
    det = MultiTaskDetector(model={"depth": 4, "base_filters": 4, "max_filters": 8, "act": "gelu", "posenc": dict(POSENC)},
                            predict={"batch_size": 1, "roi_size": None, "member_maps": True, **predict},
                            train={"device": "cpu"})  # the reference runs on the CPU
    det.spatial_dims_, det.in_channels_ = dims, 1
    det.models = [tiny_net(dims, seed=10 + i) for i in range(n_members)]
    det.is_fitted = True
    return det


def volumes(shape: tuple[int, ...], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, 1, *shape), generator=g)
    fg = torch.zeros((n, 1, *shape), dtype=torch.bool)
    fg[(slice(None), slice(None), *(slice(2, s - 2) for s in shape))] = True
    return x * fg, fg


@pytest.fixture(params=["cache", "slab"])
def encoding_mode(request, monkeypatch):
    """``cache``: small encodings from the module's cache; ``slab``: as for a whole BraTS volume (one row per slab)."""
    if request.param == "slab":
        monkeypatch.setattr(mt_model, "CACHE_ELEMENTS", 0)
        monkeypatch.setattr(mt_model, "SLAB_BYTES", 1)
    return request.param


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shape", [(40, 36, 28), (37, 33, 27), (30, 21)])
def test_network_input_equals_padded_positions(encoding_mode, shape):
    net = tiny_net(len(shape))
    x = torch.rand((2, 1, *shape))
    ref, pad = reference_input(net, x)
    z = net.network_input(x)
    assert z.shape == ref.shape and z.dtype == ref.dtype
    torch.testing.assert_close(z, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(net.network_input(x, padded=False), net.posenc(x), rtol=0, atol=ATOL)
    assert z[:, :1].equal(ref[:, :1])  # the image channels are copies
    if encoding_mode == "slab":
        assert list(net.posenc._cache) == [(shape, "cpu", torch.float32)]  # only the reference filled the cache


def test_forward_padded_is_dynunet_forward_and_frees_its_input():
    net = tiny_net()
    x = torch.rand((1, 1, 40, 36, 28))
    z = net.network_input(x)
    with torch.no_grad():
        ref = net.net(z)
    ref_z = weakref.ref(z)
    box = [z]
    del z
    alive_after_block = []

    def step() -> None:
        gc.collect()
        alive_after_block.append(ref_z() is not None)

    with torch.no_grad():
        out = net.forward_padded(box, step)
    assert box == []
    assert out.equal(ref)  # the same kernels on the same input: bit-identical
    assert len(alive_after_block) == net.block_count() == 8
    assert alive_after_block == [False] * 8  # the input was freed by the first block


@pytest.mark.parametrize("shape", [(40, 36, 28), (37, 33, 27), (30, 21)])
def test_predict_scores_matches_reference(encoding_mode, shape):
    net = tiny_net(len(shape))
    x = torch.rand((2, 1, *shape))
    ref = reference_scores(net, x)
    new = net.predict_scores(x)
    assert new.shape == ref.shape == (2, 1, *shape)
    torch.testing.assert_close(new, ref, rtol=0, atol=ATOL)
    assert float(ref.std()) > 1e-3  # a map that would show a wrong computation
    roi = tuple(max(8, s // 2) for s in shape)  # sliding window: the same windows on the same input
    torch.testing.assert_close(net.predict_scores(x, roi_size=roi), reference_scores(net, x, roi), rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_detector_ensemble_matches_member_mean(encoding_mode, batch_size):
    det = tiny_detector(3, batch_size=batch_size).set_context(RunContext(quiet=True))
    x, fg = volumes((40, 36, 28))
    pixel, image, member_maps = reference_ensemble(det, x, fg)
    for net in det.models:
        net.posenc._cache.clear()
    res = det.predict(x, fg)
    torch.testing.assert_close(res.pixel_scores, pixel, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.as_tensor(res.image_scores), torch.as_tensor(image), rtol=0, atol=ATOL)
    torch.testing.assert_close(res.extras["member_maps"], member_maps, rtol=0, atol=ATOL)
    assert res.extras["n_members"] == 3
    if encoding_mode == "slab":  # no member keeps a full-volume encoding after predicting
        assert all(not net.posenc._cache for net in det.models)
    one = det.predict(x, fg, member=1)
    torch.testing.assert_close(one.pixel_scores, member_maps[1] * fg[:, 0], rtol=0, atol=ATOL)


def test_detector_sliding_window_and_2d_match_reference():
    det = tiny_detector(2, roi_size=[24, 24, 16]).set_context(RunContext(quiet=True))
    x, fg = volumes((40, 36, 28), n=1)
    want = sum(reference_scores(net, x, (24, 24, 16))[:, 0] for net in det.models) / 2
    torch.testing.assert_close(det.predict(x, fg).pixel_scores, want * fg[:, 0], rtol=0, atol=ATOL)
    det2 = tiny_detector(2, dims=2, batch_size=3).set_context(RunContext(quiet=True))
    x2, fg2 = volumes((30, 21), n=5)
    pixel, _, _ = reference_ensemble(det2, x2, fg2)
    torch.testing.assert_close(det2.predict(x2, fg2).pixel_scores, pixel, rtol=0, atol=ATOL)


def test_progress_bar_for_3d_silent_when_quiet(capfd, monkeypatch):
    monkeypatch.delenv("MEDANOMALY_QUIET", raising=False)
    x, fg = volumes((40, 36, 28), n=1)
    det = tiny_detector(2)
    capfd.readouterr()
    det.set_context(RunContext(quiet=True)).predict(x, fg)
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    det.set_context(RunContext(quiet=False)).predict(x, fg)
    loud = capfd.readouterr().err
    assert "multitask predict" in loud and "block" in loud
    det2 = tiny_detector(2, dims=2).set_context(RunContext(quiet=False))  # 2D: quick, no bar
    det2.predict(*volumes((30, 21), n=2))
    assert capfd.readouterr().err == ""
