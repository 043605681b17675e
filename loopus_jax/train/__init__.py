"""Random-deep-supervision training."""

from loopus_jax.train.config import TrainConfig, load_config
from loopus_jax.train.losses import StepLosses, deep_supervision_losses
from loopus_jax.train.trainer import TrainResult, run

__all__ = ["StepLosses", "TrainConfig", "TrainResult", "deep_supervision_losses", "load_config", "run"]
