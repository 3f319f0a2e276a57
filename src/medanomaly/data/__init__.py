"""Data: readers/writers, preprocessing presets, datasets and the shared real data by name."""

from medanomaly.data.dataset import ArrayDataset, ImageDataset, collate_samples, stack_dataset
from medanomaly.data.toy import make_toy_dataset

__all__ = ["ArrayDataset", "ImageDataset", "collate_samples", "make_toy_dataset", "stack_dataset"]
