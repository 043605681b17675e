"""Random-deep-supervision training."""

from loopus_jax.train.losses import StepLosses, deep_supervision_losses

__all__ = ["StepLosses", "deep_supervision_losses"]
