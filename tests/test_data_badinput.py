"""The bad-input corpus: every case raises the expected error, naming the file and the problem (or, for inputs that
must be accepted, returns the expected shape); and the limits, manifest and YAML checks behind it."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "badinput" / "make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
sys.modules["make_corpus"] = corpus
_spec.loader.exec_module(corpus)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {c.name: c for c in corpus.build_corpus(tmp_path_factory.mktemp("badinput"))}


NAMES = [
    "truncated nifti", "garbage nifti", "unknown format", "missing file", "NaN/Inf", "empty (all zero)", "4D where 3D expected",
    "non-binary mask", "truncated png", "zero-byte png", "DICOM without pixel data", "garbage DICOM",
    "series without position/instance", "npz without mask", "mask shape mismatch", "mask affine mismatch",
    "manifest with a missing file", "manifest without image column", "2D where 3D expected",
    # silent successes of the independent corpus
    "LGG .npz through read_image", "complex NIfTI", "zero pixdim", "negative pixdim", "NaN pixdim",
    "series with irregular spacing", "irregular series, resampling allowed", "series with a duplicate position",
    "manifest with duplicate case ids", "manifest, one case as 2D slices", "manifest listing one image twice",
    # size bombs
    "nii.gz claiming 2000x2000x400", "huge header dims (.nii)", "huge header dims (.nii.gz)", "PNG claiming 9000x9000",
    "PNG over Pillow's bomb limit", "spacing that resamples to 3200^3", "DICOM header claiming 60000x60000",
    "series over a lowered budget", "LGG .npz claiming 84 G voxels",
    # geometry and messages
    "zero affine", "singular affine", "NaN affine", "directory named x.nii", "1-voxel image", "4D with one volume (squeezed)",
    "binary uint8 mask", "unreadable file (permissions)", "output folder is a file",
    # manifests and YAML
    "manifest with three missing files", "manifest: one case id, two images", "manifest with paths outside its folder",
    "slice column on a 3D volume", "YAML with aliases", "YAML over the size limit", "YAML syntax error", "YAML python tag",
]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(cases, name):
    case = cases[name]
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions (test_unreadable_file_is_named covers it)")
    if case.error is None:
        assert corpus.result_shape(case.call()) == case.shape
        return
    with pytest.raises(case.error) as info:
        case.call()
    msg = str(info.value)
    assert "\n" not in msg, f"{name}: message is not one line: {msg!r}"
    assert case.path.name in msg, f"{name}: message does not name the file: {msg}"
    for frag in case.fragments:
        assert frag.lower() in msg.lower(), f"{name}: {frag!r} not in {msg!r}"
    # a clear message, not a chained deep traceback
    assert info.value.__cause__ is None


def test_corpus_is_complete(cases):
    assert set(cases) == set(NAMES)


def test_missing_data_root_message(monkeypatch, tmp_path):
    from medanomaly.data import data_root, load_dataset

    monkeypatch.setenv("MEDANOMALY_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MEDANOMALY_DATA"):
        data_root()
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("lgg-flair-2d")
    assert data_root(required=False) is None


def test_unknown_names():
    from medanomaly.data import get_preset, load_dataset

    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-set")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown parameters"):
        get_preset("brain-mri-2d", sise=3)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    """PermissionError while reading becomes a DataError naming the file (simulated: the tests may run as root)."""
    import nibabel as nib
    import numpy as np

    import medanomaly.data.io as io_mod
    from medanomaly.data import read_image
    from medanomaly.data.io import DataError

    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4)), str(p))

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied", str(a[0]))

    monkeypatch.setattr(io_mod, "open", deny, raising=False)
    with pytest.raises(DataError, match=r"x\.nii\.gz: permission denied"):
        read_image(p)


def test_voxel_budget_env(monkeypatch):
    from medanomaly.data.limits import DEFAULT_MAX_VOXELS, VoxelBudgetError, check_voxel_budget, max_pixels, max_voxels

    monkeypatch.delenv("MEDANOMALY_MAX_VOXELS", raising=False)
    monkeypatch.delenv("MEDANOMALY_MAX_PIXELS", raising=False)
    assert max_voxels() == DEFAULT_MAX_VOXELS == 512**3 and max_pixels() == 8192**2
    assert check_voxel_budget((512, 512, 512), "f") == 512**3
    with pytest.raises(VoxelBudgetError, match=r"f: image of shape \(513, 512, 512\) is 134,479,872 voxels \(0.50 GiB"):
        check_voxel_budget((513, 512, 512), "f")
    monkeypatch.setenv("MEDANOMALY_MAX_VOXELS", "1e9")
    assert check_voxel_budget((513, 512, 512), "f") > 0
    monkeypatch.setenv("MEDANOMALY_MAX_PIXELS", "100")
    with pytest.raises(VoxelBudgetError, match="MEDANOMALY_MAX_PIXELS=121"):
        check_voxel_budget((11, 11), "f")
    monkeypatch.setenv("MEDANOMALY_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="MEDANOMALY_MAX_VOXELS='lots'"):
        max_voxels()
    monkeypatch.delenv("MEDANOMALY_MAX_VOXELS")
    with pytest.raises(ValueError, match="invalid size"):
        check_voxel_budget((4, float("inf")), "f")


def test_pillow_limit_does_not_decide(tmp_path, monkeypatch):
    """An image Pillow calls a decompression bomb is read when the budget allows it; Pillow's limit is restored."""
    import numpy as np
    from PIL import Image

    from medanomaly.data import read_image

    p = tmp_path / "ok.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint32).reshape(32, 32).astype(np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 px > 2 x 100: Image.open raises DecompressionBombError
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)
    assert read_image(p).shape == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_irregular_series_is_interpolated(tmp_path, caplog):
    import numpy as np

    from medanomaly.data import read_image

    folder = tmp_path / "s"
    folder.mkdir()
    for k, z in enumerate([0.0, 1.0, 2.0, 4.0]):
        corpus.make_dicom(folder / f"{k}.dcm", np.full((4, 4), 100 * (k + 1)), position=(0.0, 0.0, z), instance=k + 1)
    with caplog.at_level(logging.WARNING, logger="medanomaly.data"):
        ld = read_image(folder, allow_irregular_spacing=True)
    assert "resampled 4 slices onto 5 at 1.000 mm" in caplog.text  # the median step
    # slices at z = 0, 1, 2, 3, 4: 100, 200, 300, 350 (halfway between 300 and 400), 400
    np.testing.assert_allclose(ld.array[0, 0, :], [100, 200, 300, 350, 400])
    assert ld.meta["resampled_slices"] and abs(ld.affine[2, 2] - 1.0) < 1e-9


def test_manifest_slices_share_a_case_and_outside_paths_log_once(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from medanomaly.data import load_dataset

    (tmp_path / "img").mkdir()
    (tmp_path / "man").mkdir()
    rows = []
    for j in range(3):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * (j + 1)).save(tmp_path / "img" / f"{j}.png")
        rows.append(f"caseA,../img/{j}.png,0,test,{j}\n")
    man = tmp_path / "man" / "m.csv"
    man.write_text("case_id,image,label,split,slice\n" + "".join(rows))
    with caplog.at_level(logging.INFO, logger="medanomaly.data"):
        ds = load_dataset(man, "test")
    assert len(ds) == 3
    assert caplog.text.count("lead outside the manifest's folder") == 1 and "3 path(s)" in caplog.text
    assert ds.case_ids == ["caseA"] * 3


def test_manifest_lists_every_problem(tmp_path):
    from medanomaly.data import read_manifest
    from medanomaly.data.io import DataError

    rows = "".join(f"c{j},missing_{j}.png,,train\n" for j in range(12)) + "d,missing_d.png,7,train\n"
    man = tmp_path / "m.csv"
    man.write_text("case_id,image,label,split\n" + rows)
    with pytest.raises(DataError) as info:
        read_manifest(man)
    msg = str(info.value)
    assert "14 problems" in msg and "missing_0.png" in msg and "and 4 more" in msg


def test_safe_yaml(tmp_path):
    from medanomaly.data.samples import parse_data_spec
    from medanomaly.yamlsafe import YamlError, load_yaml

    assert load_yaml("a: 1\nb: [1, 2]") == {"a": 1, "b": [1, 2]}
    assert load_yaml("x: &anchor 1") == {"x": 1}  # anchors alone are harmless
    assert load_yaml("") is None
    p = tmp_path / "c.yaml"
    p.write_text("k: v\n")
    assert load_yaml(p, where="run config") == {"k": "v"}
    assert load_yaml(str(p)) == str(p)  # a str is YAML text, never a file name
    bomb = "a: &a [x, x]\n" + "".join(f"{c}: &{c} [*{p_}, *{p_}]\n" for p_, c in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(YamlError, match="line 2: YAML aliases are not allowed"):
        load_yaml(bomb, where="cfg")
    with pytest.raises(YamlError, match="cfg: YAML text is 11 bytes, over the limit of 10 bytes"):
        load_yaml("a: 12345678", where="cfg", max_bytes=10)
    with pytest.raises(YamlError, match="nested too deeply"):
        load_yaml("[" * 50_000)
    with pytest.raises(YamlError, match=r"run config \(.*nope.yaml\): cannot read"):
        load_yaml(tmp_path / "nope.yaml", where="run config")
    assert isinstance(YamlError("x"), ValueError)
    with pytest.raises(ValueError, match="aliases are not allowed"):
        parse_data_spec("brats2018-3d:modality=*x")
