"""The bad-input corpus: every case raises the expected error, naming the file and the problem."""

from __future__ import annotations

import importlib.util
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
]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(cases, name):
    case = cases[name]
    with pytest.raises(case.error) as info:
        case.call()
    msg = str(info.value)
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
