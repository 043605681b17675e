"""Jitted token log-probabilities: the one primitive perplexity and task scoring build on."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopus_jax.api import check_batch, place_batch


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_logprobs(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(ids[:, t+1] | ids[:, :t+1]) and whether it is the argmax, for t in [0, T-1)."""
    logits = nnx.merge(graphdef, state)(ids, mask)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = ids[:, 1:]
    lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == target
    return lp, greedy


def next_token_logprobs(model: nnx.Module, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """[B, T-1] float32 log-probs of each next token, and [B, T-1] bool greedy flags (host arrays).

    Entries whose target or context position is padding are meaningless; callers mask them.
    """
    ids, mask = place_batch(model, *check_batch(model, input_ids, attention_mask))
    graphdef, state = nnx.split(model)
    lp, greedy = _next_token_logprobs(graphdef, state, ids, mask)
    return np.asarray(lp), np.asarray(greedy)
