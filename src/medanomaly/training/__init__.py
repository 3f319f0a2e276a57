"""Training infrastructure shared by every method: device, seeds, schedules, loop, checkpoints, DDP, progress."""

from medanomaly.training.loop import (
    TrainConfig,
    TrainResult,
    autocast,
    config_from_dict,
    get_device,
    load_checkpoint,
    lr_factor,
    seed_everything,
    train_model,
)
from medanomaly.training.progress import progress_bar, track
from medanomaly.training.sampling import BatchSampler

__all__ = [
    "BatchSampler",
    "TrainConfig",
    "TrainResult",
    "autocast",
    "config_from_dict",
    "get_device",
    "load_checkpoint",
    "lr_factor",
    "progress_bar",
    "seed_everything",
    "track",
    "train_model",
]
