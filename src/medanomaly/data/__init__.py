"""Data: readers/writers, preprocessing presets, datasets and the shared real data by name."""

from medanomaly.data.dataset import ArrayDataset, ImageDataset, ItemDataset, SliceDataset, collate_samples, stack_dataset
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
from medanomaly.data.preprocess import Preprocessed, Preset, get_preset, list_presets
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
    "collate_samples",
    "data_root",
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
    "stack_dataset",
    "write_manifest",
    "write_nifti_map",
    "write_png_map",
]
