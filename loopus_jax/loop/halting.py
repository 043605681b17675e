"""Per-sample halting rules for the depth loop (method section 5).

A rule is a pure function of the step's facts and its carried statistics, returning which samples
halt now and the new statistics, so the same rules serve forward, decoding and evaluation.
`threshold`: q > q_threshold. `cdf`: q is a hazard, survival *= (1 - q), halt when 1 - survival >
q_threshold. `convergence`: the L2 change of the watched position's state < epsilon (every step).
q-based rules decide only every `q_eval_interval` steps and at the last step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopus_jax.errors import LoopusError

STRATEGIES = ("none", "threshold", "cdf", "convergence")


class StepFacts(NamedTuple):
    step: jax.Array  # 0-based depth index of the step just taken
    n: int  # the depth bound N
    q: jax.Array  # [B] sigmoid of the q logit at this step
    delta_norm: jax.Array  # [B] ||h_t - h_{t-1}|| at the watched position


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise LoopusError(f"unknown halting strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return name


def init_stats(batch: int) -> jax.Array:
    """Carried statistic: log-survival for `cdf` (unused by the others)."""
    return jnp.zeros((batch,), jnp.float32)


def decide(
    strategy: str,
    facts: StepFacts,
    active: jax.Array,
    stats: jax.Array,
    *,
    q_threshold: jax.Array,
    q_eval_interval: int,
    convergence_epsilon: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(halt now [B] bool, new stats) for the samples still `active`."""
    evaluate = ((facts.step + 1) % q_eval_interval == 0) | (facts.step == facts.n - 1)
    if strategy == "threshold":
        return active & evaluate & (facts.q > q_threshold), stats
    if strategy == "cdf":
        upd = active & evaluate
        stats = jnp.where(upd, stats + jnp.log1p(-jnp.minimum(facts.q, 1.0 - 1e-7)), stats)
        return upd & (1.0 - jnp.exp(stats) > q_threshold), stats
    if strategy == "convergence":
        return active & (facts.delta_norm < convergence_epsilon), stats
    return jnp.zeros_like(active), stats


def advance(
    strategy: str,
    step: jax.Array,
    n: int,
    q: jax.Array,
    h_old: jax.Array,
    gated: jax.Array,
    active: jax.Array,
    watch: jax.Array,
    stats: jax.Array,
    *,
    q_threshold: jax.Array,
    q_eval_interval: int,
    convergence_epsilon: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One depth step of a per-sample halting loop: (next state [B,T,D], halt now [B], new stats).

    Rows still active take the gated state, halted rows keep theirs; the rule then judges the change
    at each row's watched position. Forward and decoding share this, so they halt identically.
    """
    rows = jnp.arange(h_old.shape[0])
    h_next = jnp.where(active[:, None, None], gated, h_old)
    delta = jnp.linalg.norm((h_next[rows, watch] - h_old[rows, watch]).astype(jnp.float32), axis=-1)
    halt, stats = decide(
        strategy,
        StepFacts(step, n, q, delta),
        active,
        stats,
        q_threshold=q_threshold,
        q_eval_interval=q_eval_interval,
        convergence_epsilon=convergence_epsilon,
    )
    return h_next, halt, stats
