"""Poisson blending: exact against a direct sparse solve of the same discrete system, 2D and 3D, numpy and torch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch

from medanomaly.synth.poisson import blend_box, poisson_blend, poisson_blend_torch

torch.set_num_threads(1)


def sparse_reference(t: np.ndarray, s: np.ndarray, m: np.ndarray, mix: bool = False, box_mode: str = "fast") -> np.ndarray:
    """Assemble the system voxel by voxel (independent of the DST code) and solve it with spsolve."""
    box = blend_box(m, box_mode)
    pts = list(itertools.product(*[range(b.start, b.stop) for b in box]))
    index = {p: k for k, p in enumerate(pts)}
    a = sp.lil_matrix((len(pts), len(pts)))
    rhs = np.zeros(len(pts))
    for k, p in enumerate(pts):
        for d in range(t.ndim):
            for step in (-1, 1):
                q = list(p)
                q[d] += step
                q = tuple(q)
                a[k, k] += 1
                vs, vt = s[p] - s[q], t[p] - t[q]
                if m[p] or m[q]:
                    rhs[k] += vs if (not mix or abs(vs) > abs(vt)) else vt
                else:
                    rhs[k] += vt
                if q in index:
                    a[k, index[q]] -= 1
                else:
                    rhs[k] += t[q]
    x = spl.spsolve(a.tocsr(), rhs)
    out = t.copy()
    for k, p in enumerate(pts):
        out[p] = x[k]
    return out


CASES = [((13, 11), 0), ((9, 16), 1), ((7, 8, 9), 2), ((6, 7, 6), 3), ((30, 28), 4)]


@pytest.mark.parametrize("shape,seed", CASES)
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("at_border", [False, True])
@pytest.mark.parametrize("box_mode", ["fast", "tight"])
def test_dst_equals_sparse_solve(shape: tuple[int, ...], seed: int, mix: bool, at_border: bool, box_mode: str) -> None:
    rng = np.random.default_rng(seed)
    t, s = rng.random(shape), rng.random(shape) * 2 - 0.5
    m = np.zeros(shape, bool)
    start = [0 if at_border else 2 for _ in shape]
    sl = tuple(slice(a, a + 4) for a in start)
    m[sl] = rng.random((4,) * len(shape)) > 0.3
    m[tuple(a + 1 for a in start)] = True
    t0, s0, m0 = t.copy(), s.copy(), m.copy()
    ref = sparse_reference(t, s, m, mix, box_mode)
    got = poisson_blend(t, s, m, mix_gradients=mix, box=box_mode)
    assert np.abs(got - ref).max() < 1e-5
    tt = poisson_blend_torch(torch.tensor(t)[None, None], torch.tensor(s)[None, None], torch.tensor(m)[None, None], mix,
                             box=box_mode)
    assert np.abs(tt[0, 0].numpy() - ref).max() < 1e-5
    assert np.array_equal(t, t0) and np.array_equal(s, s0) and np.array_equal(m, m0)  # inputs untouched
    box = blend_box(m, box_mode)
    assert box is not None and all(b.start >= 1 and b.stop <= n - 1 for b, n in zip(box, shape, strict=True))
    outside = np.ones(shape, bool)
    outside[box] = False
    assert np.array_equal(got[outside], t[outside])  # nothing changes outside the solved box (no wrap-around)


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 9)])
def test_source_into_itself_is_identity(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(5)
    img = rng.random(shape).astype(np.float32)
    m = rng.random(shape) > 0.5
    out = poisson_blend(img, img, m)
    assert out.dtype == np.float32
    assert np.abs(out - img).max() < 1e-5


def test_whole_image_mask_and_empty_mask() -> None:
    rng = np.random.default_rng(0)
    t, s = rng.random((8, 8)), rng.random((8, 8))
    np.testing.assert_array_equal(poisson_blend(t, s, np.zeros((8, 8), bool)), t)
    full = poisson_blend(t, s, np.ones((8, 8), bool))
    assert np.abs(full - sparse_reference(t, s, np.ones((8, 8), bool))).max() < 1e-5
    assert np.array_equal(full[0], t[0]) and np.array_equal(full[:, -1], t[:, -1])  # the border ring is Dirichlet


def test_channels_and_torch_batch_match_numpy() -> None:
    rng = np.random.default_rng(1)
    b, c, shape = 4, 2, (16, 18)
    t, s = rng.random((b, c, *shape)), rng.random((b, c, *shape))
    m = np.zeros((b, 1, *shape), bool)
    for i in range(b):
        a0, a1 = rng.integers(0, 10, 2)
        m[i, 0, a0:a0 + 5, a1:a1 + (5 if i % 2 else 7)] = True
    got = poisson_blend_torch(torch.tensor(t), torch.tensor(s), torch.tensor(m)).numpy()
    for i in range(b):
        ref = poisson_blend(t[i], s[i], m[i])
        assert np.abs(got[i] - ref).max() < 1e-9
        for ch in range(c):
            assert np.abs(ref[ch] - poisson_blend(t[i, ch], s[i, ch], m[i, 0])).max() < 1e-12


def test_bad_inputs_raise_clearly() -> None:
    t = np.zeros((8, 8))
    with pytest.raises(ValueError, match="shape"):
        poisson_blend(t, np.zeros((8, 9)), np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="mask shape"):
        poisson_blend(t, t, np.zeros((7, 8), bool))
    bad = t.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        poisson_blend(bad, t, np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="box"):
        poisson_blend(t, t, np.ones((8, 8), bool), box="loose")


def test_fast_box_sizes() -> None:
    m = np.zeros((100, 100), bool)
    m[10:70, 20:65] = True  # 60 x 45: awkward DST sizes
    tight, fast = blend_box(m, "tight"), blend_box(m, "fast")
    assert [b.stop - b.start for b in tight] == [60, 45]
    assert [b.stop - b.start + 1 for b in fast] == [64, 48]  # n + 1 is 5-smooth
    assert all(f.start <= t.start and f.stop >= t.stop for f, t in zip(fast, tight, strict=True))
    m2 = np.zeros((12, 12), bool)
    m2[0:10, 3:5] = True  # touching the border: the box stays inside [1, n-2]
    fb = blend_box(m2, "fast")
    assert fb[0].start >= 1 and fb[0].stop <= 11
