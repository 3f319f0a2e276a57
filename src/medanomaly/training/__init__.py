"""Training infrastructure shared by every method: device, seeds, schedules, loop, checkpoints."""

from medanomaly.training.loop import (
    TrainConfig,
    TrainResult,
    autocast,
    config_from_dict,
    get_device,
    seed_everything,
    train_model,
)

__all__ = ["config_from_dict", "TrainConfig", "TrainResult", "autocast", "get_device", "seed_everything", "train_model"]
