"""The looped model: block split, selective gate, q head, depth loop and halting."""

from loopus_jax.loop.model import LoopConfig, LoopedLM, loop_model
from loopus_jax.loop.spec import LayerSplit, parse_layer_spec, split_layers

__all__ = ["LayerSplit", "LoopConfig", "LoopedLM", "loop_model", "parse_layer_spec", "split_layers"]
