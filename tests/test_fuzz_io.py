"""Fuzzing the readers: NIfTI (.nii/.nii.gz), PNG and DICOM files with odd dtypes, shapes, affines, spacings and
values, read with ``read_image`` and preprocessed by a preset. Each must either raise a :class:`DataError` with a
message, or give a finite float image of the promised shape; never another exception, never more than 200 MB
(tracemalloc peak, with the voxel budget at 2**20), never more than a few seconds (hypothesis ``deadline``).

CI runs ``MEDANOMALY_FUZZ_EXAMPLES`` (default 300) examples per format, 900 in all, derandomized; set the variable
for longer local runs (e.g. ``MEDANOMALY_FUZZ_EXAMPLES=5000``), which then also draw fresh random examples.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, reject, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medanomaly.data.io import DataError, Loaded, read_image  # noqa: E402
from medanomaly.data.presets import get_preset  # noqa: E402

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "badinput" / "make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_corpus", corpus)
_spec.loader.exec_module(corpus)

EXAMPLES = int(os.environ.get("MEDANOMALY_FUZZ_EXAMPLES", "300"))
MEMORY_LIMIT = 200 * 2**20
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize="MEDANOMALY_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
# The memory bound comes from the voxel budget: the presets need up to ~60 bytes per (resampled) voxel, so a budget of
# 2**20 voxels/pixels keeps every example under 200 MB, whatever its header or affine asks for.
FUZZ_BUDGET = str(2**20)


@pytest.fixture(autouse=True, scope="module")
def _small_budget():
    old = {k: os.environ.get(k) for k in ("MEDANOMALY_MAX_VOXELS", "MEDANOMALY_MAX_PIXELS")}
    os.environ.update({k: FUZZ_BUDGET for k in old})
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


PRESET_2D = get_preset("brain-mri-2d", size=32)
PRESET_3D = get_preset("brain-mri-3d", size=(16, 16, 16))

VALUES = ("random", "random", "random", "constant", "nan", "inf", "huge", "tiny", "negative", "sparse")  # random: 3x as likely


def _values(kind: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """An array of ``shape``/``dtype`` filled by pattern ``kind`` (NaN/Inf only where the dtype can hold them)."""
    info = np.finfo(dtype) if dtype.kind in "fc" else np.iinfo(dtype)
    a = rng.uniform(0, 1, shape)
    if kind == "constant":
        a = np.full(shape, 7.0)
    elif kind == "huge":
        a = a * float(info.max)
    elif kind == "tiny":
        a = a * (float(info.tiny) if dtype.kind in "fc" else 1.0)
    elif kind == "negative":
        a = -a * (1000.0 if dtype.kind in "fc" or info.min < 0 else 0.0)
    elif kind == "sparse":
        a = (a > 0.97) * 100.0
    else:
        a = a * (100.0 if dtype.kind in "fc" else min(float(info.max), 1000.0))
    a = a.astype(dtype)
    if kind in ("nan", "inf") and dtype.kind in "fc" and a.size:
        a.flat[rng.integers(0, a.size, max(1, a.size // 10))] = np.nan if kind == "nan" else np.inf
    return a


def _check(path: Path) -> None:
    """read_image + preset: a DataError with a message, or a finite float image of the promised shape; 200 MB peak."""
    tracemalloc.start()
    try:
        try:
            ld = read_image(path)
            if ld.ndim == 2:
                out, shape = PRESET_2D(ld), (1, 32, 32)
            else:
                out, shape = PRESET_3D(ld), (1, 16, 16, 16)
        except DataError as e:
            assert str(e).strip(), f"{path.name}: DataError without a message"
            return
        img = np.asarray(out.image)
        assert img.dtype.kind == "f", f"{path.name}: preset gave dtype {img.dtype}"
        assert img.shape == shape, f"{path.name}: preset gave shape {img.shape}, promised {shape}"
        assert np.isfinite(img).all(), f"{path.name}: preset output has NaN/Inf"
        assert isinstance(ld, Loaded)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"{path.name}: peak memory {peak / 2**20:.0f} MB"


AFFINES = ("eye", "eye", "scaled", "rotated", "flipped", "zero", "singular", "nan", "inf", "tiny", "coarse")


def _affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    if kind == "scaled":
        a[:3, :3] = np.diag([0.8, 1.2, 3.0])
    elif kind == "rotated":
        c, s = np.cos(0.4), np.sin(0.4)
        a[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1.5]]
    elif kind == "flipped":
        a[:3, :3] = np.diag([-1.0, -1.0, 2.0])
    elif kind == "zero":
        a[:3, :3] = 0.0
    elif kind == "singular":
        a[:3, :3] = [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    elif kind == "nan":
        a[0, 0] = np.nan
    elif kind == "inf":
        a[1, 3] = np.inf
    elif kind == "tiny":
        a[:3, :3] = np.diag([1e-3, 1e-3, 1e-3])
    elif kind == "coarse":
        a[:3, :3] = np.diag([50.0, 50.0, 50.0])
    return a


@FUZZ
@given(ndim=st.integers(2, 4), dims=st.lists(st.sampled_from([0, 1, 2, 3, 5, 12, 12, 20, 20]), min_size=4, max_size=4),
       dtype=st.sampled_from(["uint8", "int16", "int32", "float32", "float64", "complex64"]),
       affine=st.sampled_from(AFFINES), values=st.sampled_from(VALUES), gz=st.booleans(),
       pixdim=st.sampled_from(["ok", "ok", "ok", "ok", "zero", "negative", "nan"]),
       huge=st.sampled_from([None, None, None, None, (3, 4000, 4000, 4000), (4, 64, 64, 64, 500), (7, 1, 1, 1, 1, 1, 1, 2)]),
       seed=st.integers(0, 2**16))
def test_fuzz_nifti(ndim, dims, dtype, affine, values, gz, pixdim, huge, seed):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shape = tuple(dims[:ndim])
    arr = _values(values, shape, np.dtype(dtype), rng)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.nii"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(base))
        aff = _affine(affine)
        fields: dict = {"sform_code": 1, "qform_code": 0, "srow_x": aff[0], "srow_y": aff[1], "srow_z": aff[2]}
        pd = {"ok": 1.0, "zero": 0.0, "negative": -1.0, "nan": np.nan}[pixdim]
        fields["pixdim"] = [1.0, 1.0, pd, 1.0, 1.0, 1.0, 1.0, 1.0]
        if huge is not None:
            fields["dim"] = [huge[0], *huge[1:], *([1] * (7 - len(huge[1:])))]
        path = corpus.patch_nifti(base, Path(tmp) / ("x.nii.gz" if gz else "x.nii"), **fields)
        _check(path)


@FUZZ
@given(h=st.integers(1, 40), w=st.integers(1, 40), mode=st.sampled_from(["L", "I;16", "RGB", "RGBA", "1", "LA", "P"]),
       values=st.sampled_from(VALUES), huge=st.sampled_from([None, None, None, (9000, 9000), (1, 10**6), (70000, 70000)]),
       seed=st.integers(0, 2**16))
def test_fuzz_png(h, w, mode, values, huge, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.png"
        if huge is not None:
            corpus.png_header_only(path, *huge)
        else:
            base = _values(values, (h, w), np.dtype("uint16" if mode == "I;16" else "uint8"), rng)
            if mode in ("L", "I;16"):
                im = Image.fromarray(base)
            elif mode == "1":
                im = Image.fromarray(base > base.mean())
            else:
                im = Image.fromarray(base.astype(np.uint8)).convert(mode)
            im.save(path)
        _check(path)


@FUZZ
@given(h=st.integers(1, 24), w=st.integers(1, 24), values=st.sampled_from(VALUES),
       slope=st.sampled_from([None, 1.0, 0.0, -2.0, 1e30, 1e-30]), intercept=st.sampled_from([None, 0.0, -1024.0, 1e30]),
       spacing=st.sampled_from([None, (0.5, 0.7), (0.5, 0.7), (0.0, 1.0), (-1.0, 1.0), (1e-9, 1e-9), (1e6, 1.0)]),
       photometric=st.sampled_from(["MONOCHROME2", "MONOCHROME1"]),
       window=st.sampled_from([None, (40.0, 400.0), (0.0, 0.0), (0.0, -5.0)]),
       huge=st.sampled_from([None, None, None, (60000, 60000), (65535, 1)]), seed=st.integers(0, 2**16))
def test_fuzz_dicom(h, w, values, slope, intercept, spacing, photometric, window, huge, seed):
    import pydicom

    rng = np.random.default_rng(seed)
    px = _values(values, (h, w), np.dtype("uint16"), rng) % 4096
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dcm"
        try:
            corpus.make_dicom(path, px, slope=slope, intercept=intercept, spacing=spacing, photometric=photometric,
                              window=window)
        except (ValueError, OverflowError):
            reject()  # a value pydicom refuses to write
        if huge is not None:
            ds = pydicom.dcmread(str(path))
            ds.Rows, ds.Columns = huge
            ds.save_as(str(path))
        _check(path)


def test_fuzz_budget_is_reported():
    """The number of fuzz examples CI runs (per format), visible in the test log."""
    assert EXAMPLES >= 1
    print(f"fuzz: {EXAMPLES} examples per format, 3 formats")
