"""Post-processing: min-then-average pooling (hand-computed), Gaussian smoothing, foreground masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.evaluation.postprocess import gaussian_smooth, mask_foreground, smooth_min_avg


def test_min_pool_removes_thin_structures_hand_computed() -> None:
    x = np.zeros((1, 5, 5), np.float32)
    x[0, 2, :] = 1.0  # a one-pixel line: removed by a 3x3 minimum
    x[0, 0:3, 0:3] += 2.0  # a 3x3 block: only its centre survives the minimum (border uses valid voxels only)
    out = smooth_min_avg(x, min_size=3, avg_size=1)
    expect = np.zeros((5, 5), np.float32)
    expect[0, 0] = expect[0, 1] = expect[1, 0] = 2.0  # corner windows lie inside the block
    expect[1, 1] = 2.0
    np.testing.assert_array_equal(out[0], expect)
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)


def test_average_pool_border_counts_only_valid_voxels() -> None:
    x = np.zeros((1, 4, 4))
    x[0, 0, 0] = 9.0
    out = smooth_min_avg(x, min_size=1, avg_size=3)
    assert out[0, 0, 0] == pytest.approx(9 / 4)  # 2x2 valid voxels in the corner window
    assert out[0, 1, 1] == pytest.approx(1.0)  # full 3x3 window
    assert out[0, 0, 2] == 0.0
    np.testing.assert_allclose(smooth_min_avg(np.full((2, 6, 6), 0.7), 5, 3), 0.7)  # constants stay constant


@pytest.mark.parametrize(
    "shape,sd",
    [((2, 8, 8), None), ((2, 1, 8, 8), None), ((2, 6, 7, 8), None), ((2, 1, 6, 7, 8), None), ((2, 1, 8), 2)],
)
def test_shapes_and_types_preserved(shape: tuple, sd: int | None) -> None:
    x = torch.rand(shape)
    out = smooth_min_avg(x, 3, 5, spatial_dims=sd)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
    g = gaussian_smooth(x.numpy(), 1.0, spatial_dims=sd)
    assert isinstance(g, np.ndarray) and g.shape == shape


def test_3d_matches_scipy_filters() -> None:
    from scipy.ndimage import minimum_filter, uniform_filter

    rng = np.random.default_rng(0)
    x = rng.random((1, 7, 8, 9))
    out = smooth_min_avg(x, 3, 3)
    ref = minimum_filter(x[0], size=3, mode="nearest")  # "nearest" = min over valid voxels for a min filter
    inner = uniform_filter(ref, size=3)[1:-1, 1:-1, 1:-1]
    np.testing.assert_allclose(out[0][1:-1, 1:-1, 1:-1], inner, rtol=1e-6)


def test_gaussian_smooth_properties() -> None:
    x = np.zeros((1, 21, 21))
    x[0, 10, 10] = 1.0
    g = gaussian_smooth(x, 2.0)
    assert g.sum() == pytest.approx(1.0, rel=1e-3) and g[0, 10, 10] == g.max()
    np.testing.assert_allclose(g[0], g[0].T, atol=1e-7)
    np.testing.assert_allclose(gaussian_smooth(np.full((1, 5, 5, 5), 3.0), 1.5), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(gaussian_smooth(x, 0.0), x)


def test_mask_foreground() -> None:
    maps = torch.arange(8.0).reshape(2, 4)[:, None].expand(2, 3, 4).clone()
    fg = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    fg[0, 0, 0, 0] = True
    out = mask_foreground(maps, fg, fill=-1.0)
    assert out.shape == maps.shape and out[0, 0, 0] == 0.0 and (out[1] == -1).all()
    assert isinstance(mask_foreground(maps.numpy(), fg.numpy().astype(np.uint8)), np.ndarray)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: smooth_min_avg(np.zeros((1, 8, 8)), 2, 3), "odd"),
        (lambda: smooth_min_avg(np.zeros((1, 8, 8)), 3, -1), "odd"),
        (lambda: smooth_min_avg(np.zeros((8,)), 3, 3), "maps must be"),
        (lambda: smooth_min_avg(np.full((1, 4, 4), np.nan), 3, 3), "NaN"),
        (lambda: smooth_min_avg(np.zeros((1, 4, 4), bool), 3, 3), "numeric"),
        (lambda: gaussian_smooth(np.zeros((1, 4, 4)), -1.0), "sigma"),
        (lambda: mask_foreground(np.zeros((1, 4, 4)), np.ones((1, 4, 5))), "does not match"),
        (lambda: mask_foreground(np.zeros((1, 4, 4)), np.full((1, 4, 4), 2)), "binary"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
