"""The shared real data by name, and ``load_dataset`` for names and manifests.

The data folder is found by :func:`medanomaly.data.roots.data_root` (the environment variable ``MEDANOMALY_DATA``;
without it, ``<repo>/../shared/data``, ``<cwd>/../shared/data`` and ``<cwd>/shared/data``). Built-in datasets (see
``list_datasets()``):

``lgg-flair-2d``
    TCGA-LGG FLAIR slices (80 patients, per-patient ``.npz``), patient split from ``splits.json`` (train 50, val 10,
    test 20; ``split="all"`` for all). Slice label = any tumour voxel in the original slice. Preset ``brain-mri-2d``
    (size 160 by default) with ``foreground="brain"`` by default: the slices are not skull-stripped, so the
    foreground is the unsupervised brain mask of :func:`medanomaly.data.masks.brain_mask` (computed per
    volume from the image only); the clip percentile, zeroed background and every method's pixel metrics use it.
    ``foreground="head"`` gives the former whole-head foreground. Slice filter (reads only the image): the head
    covers >= 10 % of the 160 x 160 output (``min_fg_fraction=0.10``: drops the near-empty end slices, 150 of 2847,
    none with tumour) and the brain mask covers >= 1 % (``min_brain_fraction=0.01``: drops 292 more slices below or
    above the brain -- face, neck, noise -- one of them with tumour: test TCGA_DU_8166, array index 30 of 36, a noisy top slice).
    Kept (brain): train 1436 slices (627 with tumour, 809 empty-mask), val 286 (100 / 186), test 683 (281 / 402);
    (head: train 1606 (627 / 979), val 314 (100 / 214), test 777 (282 / 495)). ``normal_only=True``: the
    empty-mask slices.
``brats2018-3d``
    10 BraTS 2018 cases, ``modality="flair"`` (default) or ``"t1"``, whole-tumour mask ``GT_W``. All 10 cases form
    the ``test`` split (``"all"`` is the same); there is no training split (every case has a tumour).
    ``view="volumes"`` (default; preset ``brain-mri-3d``: RAS, 2 mm, fixed size 96 x 128 x 128) or
    ``view="slices"`` (axial slices of the RAS volume at 1 mm, preset ``brain-mri-2d`` with ``min_fg_fraction=0.05``:
    the skull-stripped brain fills less of the 240 mm frame; 0.10 would drop tumour slices at the ends).
``ixi-t1-3d``
    40 healthy IXI T1 volumes (2 mm, PSR, not skull-stripped). Split by sorted subject id: ``train`` = first 32,
    ``val`` = last 8. Same views and presets as BraTS, so after the preset both are RAS, 2 mm, same size.
    Foreground: the head (default). ``foreground="brain"`` applies the unsupervised brain mask; on T1 it strips
    the skull well from the orbits up, but these volumes reach down to the neck and there the mask follows the
    brainstem into neck and face tissue, so it is not the default.
``pneumoniamnist``
    28 x 28 chest X-rays. ``train`` = the 1214 normal train images (aksufatih copy), ``train-pneumonia`` = the 3494
    pneumonia train images (varun19424 copy), ``val`` = varun19424 val (135 N + 389 P), ``test`` = varun19424 test
    (234 N + 390 P). Preset ``cxr`` at size 64. Image labels only.
``cxr-kermany-256``
    Real-resolution Kermany pediatric chest X-rays (PNG, shorter side 256 px, from ``manifest.csv``),
    patient-disjoint splits ``train`` (280 normal), ``val`` (50 normal), ``test`` (100 normal + 100 pneumonia),
    ``train-pneumonia`` (200 pneumonia: an unlabeled-pool candidate, never test data). Preset ``cxr`` at size 128 by
    default; the preset stretches the (wider than tall) radiograph to a square (``keep_aspect=False``, as for the
    training images, so train and test are distorted alike; ``keep_aspect=True`` pads instead). It shares source
    images with PneumoniaMNIST: never train on one and test on the other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.dataset import ImageDataset, ItemDataset, SliceDataset
from medanomaly.data.geometry import volume_to_slices
from medanomaly.data.io import read_lgg_npz
from medanomaly.data.manifest import load_manifest_dataset
from medanomaly.data.presets import Preset, get_preset
from medanomaly.data.roots import ENV, data_root
from medanomaly.data.volumes import read_volume_item, read_volume_slices

__all__ = ["data_root", "load_dataset", "parse_data_spec", "list_datasets", "volume_to_slices", "DATASETS"]

BASE_3D_SIZE = (96, 128, 128)  # at 2 mm: holds every IXI head and BraTS brain after RAS reorientation


def _sub(root: Path | None, folder: str) -> Path:
    base = Path(root) if root is not None else data_root()
    p = base / folder
    if not p.is_dir():
        raise FileNotFoundError(f"dataset folder {p} not found (data root {base}; set {ENV} to change it)")
    return p


def _make_preset(preset: str | Preset | None, default: str, **params: Any) -> Preset:
    params = {k: v for k, v in params.items() if v is not None}
    if preset is None:
        return get_preset(default, **params)
    return get_preset(preset, **params)


def _default_3d_size(spacing: Any, downsample: int) -> tuple[int, ...]:
    eff = np.broadcast_to(np.asarray(2.0 if spacing is None else spacing, float), (3,)) * float(downsample)
    return tuple(int(-(-round(b * 2.0 / e) // 16) * 16) for b, e in zip(BASE_3D_SIZE, eff, strict=True))


def _size_3d(size: Any, pp: dict[str, Any]) -> tuple[int, ...]:
    if size is None:
        return _default_3d_size(pp.get("spacing", 2.0), int(pp.get("downsample", 1)))
    return tuple(int(s) for s in np.broadcast_to(np.asarray(size, int), (3,)))


def _check_split(split: str, allowed: list[str], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has no split {split!r}; available: {allowed}")


# --------------------------------------------------------------------------------------------------------- LGG
def _load_lgg(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    ld = read_lgg_npz(path)
    return ld.array, ld.meta["mask"], ld.meta["slice_number"], -1


def _lgg(split: str, normal_only: bool, preset: Any, size: int | None, max_cases: int | None, root: Any,
         cache_size: int = 8, quiet: bool = True, **pp: Any) -> ImageDataset:
    folder = _sub(root, "brain_lgg_flair_2d")
    splits = json.loads((folder / "splits.json").read_text())
    splits["all"] = sorted(p for s in ("train", "val", "test") for p in splits.get(s, []))
    _check_split(split, sorted(splits), "lgg-flair-2d")
    patients = splits[split][:max_cases] if max_cases else splits[split]
    if preset is None or (isinstance(preset, str) and preset == "brain-mri-2d"):
        pp = {"foreground": "brain", **pp}  # not skull-stripped: score over the brain, not the scalp (issue 2)
    pre = _make_preset(preset, "brain-mri-2d", size=size, **pp)
    cases = [(pid, partial(_load_lgg, folder / "volumes" / f"{pid}.npz")) for pid in patients]
    return SliceDataset(cases, pre, normal_only=normal_only, name="lgg-flair-2d", cache_size=cache_size, quiet=quiet)


# ------------------------------------------------------------------------------------------------- 3D volumes
def _volumes(name: str, entries: list[tuple[str, Path, Path | None, int]], view: str, normal_only: bool, preset: Any,
             size: Any, cache_size: int, quiet: bool, pp: dict[str, Any]) -> ImageDataset:
    if view == "slices":
        pp = {"min_fg_fraction": 0.05, **pp} if preset is None else pp  # skull-stripped brains fill less of the frame
        pre = _make_preset(preset, "brain-mri-2d", size=size, **pp)
        cases = [(cid, partial(read_volume_slices, ip, mp, lab)) for cid, ip, mp, lab in entries]
        return SliceDataset(cases, pre, normal_only=normal_only, name=name, cache_size=cache_size, quiet=quiet)
    if view != "volumes":
        raise ValueError(f"view must be 'volumes' or 'slices', got {view!r}")
    if normal_only:
        entries = [e for e in entries if e[3] == 0]
        if not entries:
            raise ValueError(f"{name}: normal_only=True leaves no volumes (every case has a lesion); use view='slices'")
    if preset is None or (isinstance(preset, str) and preset == "brain-mri-3d"):
        pp = {**pp, "size": _size_3d(size, pp)}
    pre = _make_preset(preset, "brain-mri-3d", **pp)
    items = [(cid, partial(read_volume_item, ip, mp, pre), lab) for cid, ip, mp, lab in entries]
    return ItemDataset(items, spatial_dims=3, name=name, preset=pre.name, cache_size=cache_size, known_normal_mask=True)


def _brats(split: str, normal_only: bool, preset: Any, size: Any, max_cases: int | None, root: Any,
           modality: str = "flair", view: str = "volumes", cache_size: int = 4, quiet: bool = True, **pp: Any) -> ImageDataset:
    folder = _sub(root, "brain_brats2018_3d")
    _check_split(split, ["all", "test"], "brats2018-3d")
    mod = {"flair": "FLAIR", "t1": "T1"}.get(modality.lower())
    if mod is None:
        raise ValueError(f"brats2018-3d modality must be 'flair' or 't1', got {modality!r}")
    cases = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("case_")), key=lambda p: int(p.name[5:]))
    cases = cases[:max_cases] if max_cases else cases
    entries = [(c.name, c / f"{mod}.nii.gz", c / "GT_W.nii.gz", 1) for c in cases]
    return _volumes("brats2018-3d", entries, view, normal_only, preset, size, cache_size, quiet, pp)


def _ixi(split: str, normal_only: bool, preset: Any, size: Any, max_cases: int | None, root: Any,
         view: str = "volumes", n_val: int = 8, cache_size: int = 4, quiet: bool = True, **pp: Any) -> ImageDataset:
    folder = _sub(root, "brain_ixi_t1_3d")
    _check_split(split, ["all", "train", "val"], "ixi-t1-3d")
    files = sorted((folder / "t1").glob("*.nii.gz"))
    files = {"all": files, "train": files[:-n_val], "val": files[-n_val:]}[split]
    files = files[:max_cases] if max_cases else files
    entries = [(f.name.replace("_T1.nii.gz", ""), f, None, 0) for f in files]
    return _volumes("ixi-t1-3d", entries, view, normal_only, preset, size, cache_size, quiet, pp)


# ------------------------------------------------------------------------------------------------ PneumoniaMNIST
def _cxr_item(arr: np.ndarray, pre: Preset) -> Any:
    return pre(arr)


def _pneumonia(split: str, normal_only: bool, preset: Any, size: int | None, max_cases: int | None, root: Any,
               cache_size: int = 100_000, quiet: bool = True, **pp: Any) -> ImageDataset:
    folder = _sub(root, "cxr_pneumoniamnist")
    _check_split(split, ["train", "train-pneumonia", "val", "test"], "pneumoniamnist")
    src, key, keep = {"train": ("aksufatih", "train", 0), "train-pneumonia": ("varun19424", "train", 1),
                      "val": ("varun19424", "val", None), "test": ("varun19424", "test", None)}[split]
    with np.load(folder / f"pneumoniamnist_{src}.npz") as z:
        images, labels = z[f"{key}_images"], z[f"{key}_labels"].reshape(-1).astype(int)
    idx = np.arange(len(labels))
    if keep is not None:
        idx = idx[labels == keep]
    if normal_only:
        idx = idx[labels[idx] == 0]
    if max_cases:
        idx = idx[:max_cases]
    pre = _make_preset(preset, "cxr", size=size or 64, **pp)
    items = [(f"{src}-{key}-{i:05d}", partial(_cxr_item, images[i], pre), int(labels[i])) for i in idx]
    return ItemDataset(items, spatial_dims=2, name="pneumoniamnist", preset=pre.name, cache_size=cache_size)


# ------------------------------------------------------------------------------------------------ Kermany CXR
KERMANY_SPLITS = ["train", "val", "test", "train-pneumonia"]


def _kermany(split: str, normal_only: bool, preset: Any, size: int | None, max_cases: int | None, root: Any,
             cache_size: int = 8, quiet: bool = True, **pp: Any) -> ImageDataset:
    folder = _sub(root, "cxr_kermany_256")
    _check_split(split, KERMANY_SPLITS, "cxr-kermany-256")
    ds = load_manifest_dataset(folder / "manifest.csv", split, normal_only=normal_only, preset=preset or "cxr",
                               size=size or 128, max_cases=max_cases, cache_size=cache_size, quiet=quiet, **pp)
    ds.name = "cxr-kermany-256"
    return ds


DATASETS: dict[str, tuple[Callable[..., ImageDataset], str]] = {
    "lgg-flair-2d": (_lgg, "TCGA-LGG FLAIR 2D slices + tumour masks; 80 patients, splits train/val/test (50/10/20)"),
    "brats2018-3d": (_brats, "BraTS 2018, 10 cases, FLAIR or T1 + whole-tumour mask; split test; volumes or slices"),
    "ixi-t1-3d": (_ixi, "40 healthy IXI T1 volumes (2 mm); split train (32) / val (8); volumes or slices"),
    "cxr-kermany-256": (_kermany, "Kermany pediatric CXR, shorter side 256 px: train (280 N), val (50 N), test (100 N + "
                        "100 P), train-pneumonia (200 P, unlabeled-pool candidate); preset cxr at 128 (stretched)"),
    "pneumoniamnist": (_pneumonia, "PneumoniaMNIST 28x28 CXR: train (1214 normal), train-pneumonia, val, test (234 N + 390 P)"),
}


def list_datasets() -> dict[str, str]:
    """Built-in dataset names with short descriptions (manifests: pass a .csv/.json path to ``load_dataset``)."""
    return {k: v[1] for k, v in DATASETS.items()}


def parse_data_spec(spec: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, options) for built-in names and manifests (``x.csv:view=slices``);
    anything else -> (spec, {}).

    Values are read as YAML scalars (``6`` -> int, ``6.0`` -> float, ``t1`` -> str, ``[2,2,2]`` -> list), so the
    same options can be written on a command line (``--data brats2018-3d:modality=t1``) and in a config file.
    """
    text = str(spec)
    name, sep, rest = text.partition(":")
    manifest = re.match(r"^(.+\.(?:csv|json)):([^/\\]*=.*)$", text, re.IGNORECASE)
    if manifest and not Path(text).exists():  # a manifest with options: my.csv:view=slices,lesion_labels=">0"
        name, sep, rest = manifest.group(1), ":", manifest.group(2)
    elif not sep or name not in DATASETS:
        return text, {}
    from medanomaly.yamlsafe import load_yaml

    opts: dict[str, Any] = {}
    for part in _split_top_level(rest):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"data spec {text!r}: options must be key=value separated by commas, got {part!r}")
        opts[k.strip()] = load_yaml(v.strip(), where=f"data spec {text!r}: the value of {k.strip()!r}", max_bytes=10_000)
    return name, opts


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets (``spacing=[2,2,2],view=slices`` -> two parts)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def load_dataset(
    name_or_manifest: str | os.PathLike,
    split: str = "train",
    *,
    normal_only: bool = False,
    preset: str | Preset | None = None,
    size: Any = None,
    max_cases: int | None = None,
    root: str | os.PathLike | None = None,
    **kw: Any,
) -> ImageDataset:
    """A dataset by built-in name or from a manifest (.csv/.json).

    ``size``: output side (2D) or shape (3D) for the preset; ``max_cases``: first N patients/cases (for quick
    runs); ``root``: the data folder (default: located via ``MEDANOMALY_DATA``). Dataset options: ``view``
    ("volumes"/"slices"), ``modality`` (BraTS), ``cache_size``, ``quiet``; any other keyword is a preset parameter
    (e.g. ``min_fg_fraction=0.2``, ``spacing=1.0``, ``downsample=2``). A built-in name may carry options as text,
    ``"brats2018-3d:modality=t1,spacing=6"`` (see :func:`parse_data_spec`); keywords win over them.
    """
    key, opts = parse_data_spec(name_or_manifest)
    size = opts.pop("size", None) if size is None else size
    max_cases = opts.pop("max_cases", None) if max_cases is None else max_cases
    preset = opts.pop("preset", None) if preset is None else preset
    for k in ("size", "max_cases", "preset"):
        opts.pop(k, None)
    if key in DATASETS:
        return DATASETS[key][0](split, normal_only, preset, size, max_cases, root, **{**opts, **kw})
    p = Path(key)
    if p.suffix.lower() in (".csv", ".json"):
        return load_manifest_dataset(p, split, normal_only=normal_only, preset=preset, size=size, max_cases=max_cases,
                                     **{**opts, **kw})
    raise ValueError(f"unknown dataset {key!r}: not a built-in name ({', '.join(DATASETS)}) nor a .csv/.json manifest")
