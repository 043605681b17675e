"""loopus-jax: LoopUS (looped latent refinement of pretrained LLMs) in JAX/Flax NNX."""

from loopus_jax.api import default_model_path, forward, load, save
from loopus_jax.decode import generate
from loopus_jax.errors import LoopusError

__all__ = ["LoopusError", "default_model_path", "forward", "generate", "load", "save"]
__version__ = "0.1.0"
