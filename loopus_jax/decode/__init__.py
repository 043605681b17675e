"""Decoding: jitted prefill and `lax.while_loop` generation with per-depth KV caches and early exit."""

from loopus_jax.decode.generation import GenerateOutput, generate

__all__ = ["GenerateOutput", "generate"]
