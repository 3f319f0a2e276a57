"""dataset_fingerprint: equal for equal content, different for any change of pixels, foreground, ids, shape, dtype, order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medanomaly.data import make_toy_dataset
from medanomaly.data.dataset import ArrayDataset
from medanomaly.data.fingerprint import Fingerprinter, dataset_fingerprint
from medanomaly.data.healthy import HealthyView


def _ds(images: np.ndarray, fg: np.ndarray | None = None, ids: list[str] | None = None) -> ArrayDataset:
    return ArrayDataset(images, foreground=fg, case_ids=ids)


def test_fingerprint_tracks_content() -> None:
    rng = np.random.default_rng(0)
    im = rng.random((5, 1, 8, 8), dtype=np.float32)
    fg = im > 0.3
    ids = [f"c{i}" for i in range(5)]
    base = dataset_fingerprint(_ds(im, fg, ids))
    assert len(base) == 64 and base == dataset_fingerprint(_ds(im.copy(), fg.copy(), list(ids)))
    im2 = im.copy()
    im2[3, 0, 4, 4] = np.nextafter(im2[3, 0, 4, 4], 2)  # one ulp of one pixel
    fg2 = fg.copy()
    fg2[1, 0, 0, 0] ^= True
    variants = {
        "pixel": _ds(im2, fg, ids),
        "foreground": _ds(im, fg2, ids),
        "no foreground": _ds(im, None, ids),
        "case id": _ds(im, fg, ["c0", "c1", "c2", "c3", "x4"]),
        "order": _ds(im[::-1].copy(), fg[::-1].copy(), ids[::-1]),
        "fewer": _ds(im[:4], fg[:4], ids[:4]),
        "shape": _ds(im.reshape(5, 1, 4, 16), fg.reshape(5, 1, 4, 16), ids),
    }
    prints = {k: dataset_fingerprint(v) for k, v in variants.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints)


def test_fingerprint_of_items_dtype_and_views() -> None:
    a = Fingerprinter()
    a.add("x", np.zeros((1, 2, 2), np.float32))
    b = Fingerprinter()
    b.add("x", np.zeros((1, 2, 2), np.float64))
    c = Fingerprinter()
    c.add("x", torch.zeros((1, 2, 2)))  # a tensor hashes like the equal numpy array
    assert a.hexdigest() != b.hexdigest() and a.hexdigest() == c.hexdigest()
    ds = make_toy_dataset(6, 16, abnormal_fraction=0.5, seed=3)
    assert dataset_fingerprint(HealthyView(ds)) == dataset_fingerprint(ds)  # labels/masks are not part of it
    with pytest.raises(KeyError, match="no 'image'"):
        Fingerprinter().add_item({"case_id": "a"})


def test_multitask_pool_fingerprint_equals_dataset_fingerprint() -> None:
    from medanomaly.methods.multitask.pool import HealthyPool

    ds = make_toy_dataset(6, 16, seed=1)
    assert HealthyPool.from_dataset(HealthyView(ds)).fingerprint == dataset_fingerprint(ds)
