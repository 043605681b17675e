"""Per-sample halting in the depth loop: one step (`advance`) shared by the looped forward and decoding.

The rules themselves are exit criteria (`loopus_jax.loop.criteria`): pure functions of the watched
position's state before and after a step, the decoder's logits there when they need them, q, and their
own carried statistics. `advance` freezes halted rows, runs the decoder on the watched positions only
for criteria that need logits (once per depth: the previous depth's logits are carried), and keeps a
halted row's statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopus_jax.loop import criteria as C

STRATEGIES = C.names()


def check_strategy(name: str) -> str:
    C.get(name)
    return name


class Carry(NamedTuple):
    """What a criterion carries across depths: its statistics and the previous depth's watched logits."""

    stats: Any
    logits: jax.Array | None  # [B, V] float32, zeros before the first step; None unless needs_logits


def init_carry(name: str, batch: int, vocab: int) -> Carry:
    c = C.get(name)
    return Carry(c.init(batch), jnp.zeros((batch, vocab), jnp.float32) if c.needs_logits else None)


def evaluate_now(step: jax.Array, n: int, q_eval_interval: int) -> jax.Array:
    return ((step + 1) % q_eval_interval == 0) | (step == n - 1)


def advance(
    name: str,
    params: tuple[jax.Array, jax.Array],
    step: jax.Array,
    n: int,
    q: jax.Array,
    h_old: jax.Array,
    gated: jax.Array,
    active: jax.Array,
    watch: jax.Array,
    carry: Carry,
    *,
    q_eval_interval: int,
    watched_logits: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, Carry]:
    """One depth step of a per-sample halting loop: (next state [B,T,D], halt now [B], new carry).

    Rows still active take the gated state, halted rows keep theirs; the criterion then judges the
    step at each row's watched position. `watched_logits(h [B,T,D]) -> [B,V]` gives the decoder's
    logits at the watched positions; it runs only for criteria that need them.
    """
    c = C.get(name)
    rows = jnp.arange(h_old.shape[0])
    h_next = jnp.where(active[:, None, None], gated, h_old)
    logits = watched_logits(h_next).astype(jnp.float32) if c.needs_logits else None
    depth = C.Depth(
        step, n, evaluate_now(step, n, q_eval_interval), h_old[rows, watch], h_next[rows, watch], carry.logits, logits, q
    )
    halt, stats = c.rule(depth, C.unpack(c, *params), carry.stats)
    keep = lambda old, new: jnp.where(active.reshape(-1, *([1] * (new.ndim - 1))), new, old)
    stats = jax.tree.map(keep, carry.stats, stats)
    return h_next, active & halt, Carry(stats, logits)
