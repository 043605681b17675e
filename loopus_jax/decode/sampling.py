"""Next-token choice from float32 logits: greedy, or temperature + top-k + top-p sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static sampling options (each distinct value compiles once); temperature and top_p are traced."""

    greedy: bool
    top_k: int | None = None
    top_p: bool = False


def sample(logits: jax.Array, key: jax.Array, s: Sampler, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 tokens: the argmax when greedy (temperature 0), else one
    categorical draw per row with `key` from `distribution_logits`."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, distribution_logits(logits, s, temperature, top_p), axis=-1).astype(jnp.int32)


def distribution_logits(logits: jax.Array, s: Sampler, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """[..., V] logits of the distribution a sampler draws from (-inf outside its support): logits /
    temperature, restricted to the `top_k` largest and then to the smallest set of tokens whose
    probability reaches `top_p` (the most likely token always stays). Not for greedy samplers."""
    x = logits / temperature
    if s.top_k is not None:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p:
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = jnp.concatenate([jnp.ones_like(before[..., :1], bool), before[..., 1:] < top_p], axis=-1)
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x
