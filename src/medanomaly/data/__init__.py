"""Data: readers/writers, preprocessing presets (and their inverse), datasets and the shared real data by name.

Modules: ``io`` (files), ``masks`` / ``intensity`` / ``geometry`` (the preset building blocks; each geometry step
beside its inverse), ``presets``, ``dataset`` / ``samples`` / ``manifest`` / ``volumes`` (datasets), ``roots``
(where the shared data is), ``toy``, ``arrays``.
"""

from medanomaly.data.dataset import ArrayDataset, ImageDataset, ItemDataset, SliceDataset, collate_samples, stack_dataset
from medanomaly.data.geometry import slices_to_volume, volume_to_slices
from medanomaly.data.io import (
    DataError,
    Loaded,
    read_image,
    read_mask,
    save_overlay_png,
    write_nifti_map,
    write_png_map,
)
from medanomaly.data.manifest import load_manifest_dataset, read_manifest, write_manifest
from medanomaly.data.presets import Preprocessed, Preset, SliceStack, get_preset, list_presets
from medanomaly.data.roots import find_data_root
from medanomaly.data.samples import data_root, list_datasets, load_dataset
from medanomaly.data.toy import make_toy_dataset

__all__ = [
    "ArrayDataset",
    "DataError",
    "ImageDataset",
    "ItemDataset",
    "Loaded",
    "Preprocessed",
    "Preset",
    "SliceDataset",
    "SliceStack",
    "collate_samples",
    "data_root",
    "find_data_root",
    "get_preset",
    "list_datasets",
    "list_presets",
    "load_dataset",
    "load_manifest_dataset",
    "make_toy_dataset",
    "read_image",
    "read_manifest",
    "read_mask",
    "save_overlay_png",
    "slices_to_volume",
    "stack_dataset",
    "volume_to_slices",
    "write_manifest",
    "write_nifti_map",
    "write_png_map",
]
