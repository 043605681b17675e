"""Jitted token log-probabilities: the one primitive perplexity and task scoring build on.

Works for base and looped models: looped models take the same options as `loopus_jax.forward`
(`n_recursion`, `halting`, `q_threshold`, ...) and report each row's exit depth.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopus_jax.api import check_batch, place_batch
from loopus_jax.errors import LoopusError
from loopus_jax.models.transformer import Columns
from loopus_jax.sharding import model_mesh


@dataclasses.dataclass
class TokenScores:
    """Host arrays. `logprobs[:, j]` / `greedy[:, j]` score the token at column `T - W + j` given the
    columns before it (W = `tail`, or T - 1), or with `targets`, `targets[:, j]` given the columns up to
    `T - W + j`; `exit_depth` [B] and `q` [B, N] (the q head's confidence at
    each depth, NaN after a row's exit, as `forward` gives it) are None for base models; `last_logprobs`
    [B, V] is the full log-softmax at the last scored column (T - 2 without `targets`, T - 1 with) when asked for."""

    logprobs: np.ndarray
    greedy: np.ndarray
    exit_depth: np.ndarray | None = None
    last_logprobs: np.ndarray | None = None
    q: np.ndarray | None = None


def _logits(
    graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, opts: Any, q_thr, eps, columns: Columns | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(logits, exit depth, q) of a base (opts None: depth 0, q None) or looped model, inside a jitted function;
    logits of the `columns` positions only when given (see `LMEnds.logits`)."""
    model = nnx.merge(graphdef, state)
    if opts is None:
        return model(ids, mask, columns=columns), jnp.zeros((ids.shape[0],), jnp.int32), None
    return model(ids, mask, opts, q_thr, eps, columns=columns)


def _split_options(model: nnx.Module, options: dict) -> tuple[Any, Any, Any]:
    """Static looped-run options and the traced thresholds; base models accept only None values."""
    from loopus_jax.loop.model import LoopedLM

    if isinstance(model, LoopedLM):
        opts, q_thr, eps = model.options(**options)
        return opts, jnp.float32(q_thr), jnp.float32(eps)
    extra = sorted(k for k, v in options.items() if v is not None)
    if extra:
        raise LoopusError(f"option(s) {extra} apply to looped models only; this is a base {model.config.architecture}")
    return None, jnp.float32(0), jnp.float32(0)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "tail", "want_last"))
def _score(graphdef: Any, state: Any, ids, mask, targets, where, opts: Any, q_thr, eps, tail: int, want_last: bool):
    t = ids.shape[1]
    if targets is None:  # each column predicts the next: the last column is a target only
        w = tail or t - 1
        columns, target = (t - w - 1, t - 1), ids[:, -w:]
    elif where is None:  # each of the last W columns predicts its own target (packed rows)
        w = targets.shape[1]
        columns, target = (t - w, t), targets
    else:  # only the P positions `where` (rows, columns), as one row
        columns, target = where, targets[None]
    logits, depth, q = _logits(graphdef, state, ids, mask, opts, q_thr, eps, columns)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == target
    return lp, greedy, depth, (logp[:, -1] if want_last else None), q


def quarter_octave(n: int) -> int:
    """`n` rounded up on the grid 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four steps per octave): at
    most 1.25x the work, in few distinct (compiled) shapes."""
    if n <= 8:
        return 8
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def score_tokens(
    model: nnx.Module,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    tail: int | None = None,
    targets: Any = None,
    want_last: bool = False,
    **options,
) -> TokenScores:
    """Log-probs of the last `tail` tokens of each row (all but the first when None) in one jitted call.

    With `targets` [B, W], column `T - W + j` is scored against `targets[:, j]` instead (rows whose
    tokens are not one sequence: packed continuations, see `make_context`); entries < 0 are not scored
    (their results are 0 / False) and on one device the LM head runs on the scored positions only, so
    rows with fewer targets than W cost no vocabulary-wide work for the rest.
    Each distinct (shape, tail, options) compiles once. Entries whose target or context is padding are
    meaningless; callers mask them.
    """
    ids, mask = check_batch(model, input_ids, attention_mask)
    where = None
    if targets is not None:
        targets = np.asarray(targets, np.int32)
        b, t = ids.shape
        if targets.ndim != 2 or targets.shape[0] != b or not 1 <= targets.shape[1] <= t:
            raise LoopusError(f"targets must be [batch, W] with 1 <= W <= {t}, got {list(targets.shape)}")
        if want_last or model_mesh(model) is not None:  # (a gather across a sharded batch would move it)
            flat = None
            targets = np.maximum(targets, 0)
        else:
            flat = np.nonzero(targets >= 0)
            n = min(quarter_octave(len(flat[0])), targets.size)
            rows, cols, tg = (np.zeros(n, np.int32) for _ in range(3))
            rows[: len(flat[0])], cols[: len(flat[0])] = flat[0], flat[1] + t - targets.shape[1]
            tg[: len(flat[0])] = targets[flat]
            where, shape, targets = (jnp.asarray(rows), jnp.asarray(cols)), targets.shape, jnp.asarray(tg)
    ids, mask = place_batch(model, ids, mask)
    if targets is not None and where is None:
        (targets,) = place_batch(model, targets)
    graphdef, state = nnx.split(model)
    opts, q_thr, eps = _split_options(model, options)
    lp, greedy, depth, last, q = _score(graphdef, state, ids, mask, targets, where, opts, q_thr, eps, tail or 0, want_last)
    lp, greedy = np.asarray(lp), np.asarray(greedy)
    if where is not None:  # back to [B, W]
        k = len(flat[0])
        lp_full, greedy_full = np.zeros(shape, lp.dtype), np.zeros(shape, bool)
        lp_full[flat], greedy_full[flat] = lp[0, :k], greedy[0, :k]
        lp, greedy = lp_full, greedy_full
    return TokenScores(
        lp,
        greedy,
        None if opts is None else np.asarray(depth),
        None if last is None else np.asarray(last),
        None if q is None else np.asarray(q),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _greedy(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, at: jax.Array, opts: Any, q_thr, eps):
    logits = _logits(graphdef, state, ids, mask, opts, q_thr, eps)[0]
    return jnp.argmax(logits[jnp.arange(ids.shape[0]), at], axis=-1).astype(jnp.int32)


def greedy_next_tokens(model: nnx.Module, input_ids: Any, attention_mask: Any, at: Any, **options: Any) -> np.ndarray:
    """[B] argmax token after column `at[b]` of each row (a full forward pass: no KV cache)."""
    ids, mask = place_batch(model, *check_batch(model, input_ids, attention_mask))
    (at,) = place_batch(model, np.asarray(at, np.int32))
    graphdef, state = nnx.split(model)
    opts, q_thr, eps = _split_options(model, options)
    return np.asarray(_greedy(graphdef, state, ids, mask, at, opts, q_thr, eps))
