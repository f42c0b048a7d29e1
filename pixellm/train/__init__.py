"""Distributed PixelLM training: Ray Train V2 + DeepSpeed, resumable checkpoints, MLflow."""

from pixellm.train.driver import TrainResult, train, validate_for_training
from pixellm.train.ds_config import derive_deepspeed_config

__all__ = ["TrainResult", "derive_deepspeed_config", "train", "validate_for_training"]
