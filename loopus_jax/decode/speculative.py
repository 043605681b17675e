"""Self-speculative decoding of a looped model: draft at a shallow depth, verify at full depth.

The looped model is its own draft model: the same encoder, the first d depths of the reasoning block and
the decoder make a cheaper model whose caches are the full model's (depths 1..d of the reasoning cache
hold exactly what the full model computes there). One round of the generation loop, with t tokens
produced and token t - 1 not yet fed (its slot s = P + t - 1):

1. Draft: token t - 1, then each drafted token, through encoder -> depths 1..d -> decoder, k times (one
   decoding step each, `halting="none"` at N = d): tokens y_1..y_k and their draft distributions
   q_0..q_{k-1}. The drafts write the encoder cache, depth caches 1..d and the decoder cache at their
   slots (the decoder cache holds shallow states there until the verification overwrites them).
2. Verify: token t - 1, y_1..y_k at full depth N in one pass over slots s..s + k: target distributions
   p_0..p_k, every cache rewritten at those slots with full-depth keys and values.
3. Accept (Leviathan et al. 2023; Chen et al. 2023): greedy keeps y_j while it is the argmax of p_{j-1};
   sampling accepts y_j with probability min(1, p_{j-1}(y_j) / q_{j-1}(y_j)), and at the first rejected
   position draws from max(0, p - q) renormalised, after k acceptances from p_k. Each emitted token is
   then distributed as plain sampling's would be, and greedy emits exactly the argmax tokens.
   The batch shares one slot pointer, so a round keeps m = the fewest acceptances of any unfinished row:
   every row emits y_1..y_m and its own standard choice at position m (its y_{m+1} if accepted there).
   Emitting a prefix of a correct speculative output, cut where other rows' independent draws say,
   keeps the distribution exact; it only lowers the yield of a batch.
4. Clean up: slots past the kept tokens are zeroed and unmarked in every cache, so the caches are those
   of plain decoding of the kept tokens (up to float rounding of the batched verification).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loopus_jax.decode import cache as C
from loopus_jax.decode import engine as E
from loopus_jax.decode.sampling import distribution_logits, sample


def draft_plan(plan: E.Plan) -> E.Plan:
    """The plan of a draft step: depth d, no halting (same caches, same static options otherwise)."""
    depth, _ = plan.speculative
    return dataclasses.replace(plan, run=dataclasses.replace(plan.run, n_recursion=depth, halting="none"))


def _clear_rejected(state: E.CacheState, slot: jax.Array, count: int, keep: jax.Array) -> E.CacheState:
    """Slots [slot + keep, slot + count) back to empty in every cache, the key mask and the per-depth validity."""
    clear = lambda c: C.clear_after(c, slot, count, keep, axis=c.ndim - 3)  # K/V [..., B, S, Hkv, hd]
    blocks = {name: C.KV(clear(kv.k), clear(kv.v)) for name, kv in state.blocks.items()}
    keys = state.keys.replace(mask=C.clear_after(state.keys.mask, slot, count, keep, axis=1))
    valid = None if state.valid is None else C.clear_after(state.valid, slot, count, keep, axis=2)
    return E.CacheState(keys, blocks, valid)


def _accept(plan: E.Plan, drafts, q_logits, p_logits, key, temperature, top_p):
    """(accepted [B, k] bool, the token each row emits at every position if the round stops there [B, k + 1])."""
    k = drafts.shape[1]
    if plan.sampler.greedy:
        target = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
        return drafts == target[:, :k], target
    k_u, k_fix = jax.random.split(key)
    p = jax.nn.softmax(distribution_logits(p_logits, plan.sampler, temperature, top_p), axis=-1)  # [B, k + 1, V]
    q = jax.nn.softmax(distribution_logits(q_logits, plan.sampler, temperature, top_p), axis=-1)  # [B, k, V]
    take = lambda x: jnp.take_along_axis(x, drafts[..., None], axis=-1)[..., 0]
    accepted = jax.random.uniform(k_u, drafts.shape) * take(q) < take(p[:, :k])
    # Where a draft is rejected: a draw from max(0, p - q) renormalised (p itself if that is all zero,
    # which happens only where p == q and rejection has probability 0); after the last draft: from p_k.
    residual = jnp.maximum(p[:, :k] - q, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[:, :k])
    fix = jnp.concatenate([residual, p[:, k:]], axis=1)
    fixed = jax.random.categorical(k_fix, jnp.log(fix), axis=-1).astype(jnp.int32)  # [B, k + 1]
    padded = jnp.concatenate([drafts, fixed[:, k:]], axis=1)
    return accepted, jnp.where(jnp.concatenate([accepted, jnp.zeros_like(accepted[:, :1])], 1), padded, fixed)


def run_round(model, plan: E.Plan, weights: dict, dstate: E.CacheState, buf, dyn):
    """One draft-verify-accept round: (new decoding state, new buffers with up to k + 1 more tokens)."""
    depth_n, k = plan.run.n_recursion, plan.speculative[1]
    dplan = draft_plan(plan)
    t, done = buf.t, buf.done
    active = ~done
    rkey = jax.random.fold_in(dyn.key, t)
    prev = jax.lax.dynamic_index_in_dim(buf.tokens, t - 1, 1, keepdims=False)

    def draft(carry, j):
        state, tok = carry
        state, logits, _ = E.step_cached(model, dplan, weights, state, tok, t + j, active, dyn.thr)
        key = jax.random.fold_in(jax.random.fold_in(rkey, 1), j)
        nxt = sample(logits, key, plan.sampler, dyn.temperature, dyn.top_p)
        return (state, nxt), (nxt, logits)

    (dstate, _), (drafts, q_logits) = jax.lax.scan(draft, (dstate, prev), jnp.arange(k))
    drafts, q_logits = drafts.T, jnp.swapaxes(q_logits, 0, 1)  # [B, k], [B, k, V]
    fed = jnp.concatenate([prev[:, None], drafts], axis=1)
    dstate, p_logits, _ = E.feed_cached(model, plan, weights, dstate, fed, t, active, dyn.thr, every_position=True)
    accepted, choice = _accept(plan, drafts, q_logits, p_logits, jax.random.fold_in(rkey, 2), dyn.temperature, dyn.top_p)

    n_acc = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)  # [B] leading acceptances
    m = jnp.min(jnp.where(active, n_acc, k))
    pos = jnp.arange(k + 1)
    emitted = jnp.where(pos[None] < m, jnp.concatenate([drafts, choice[:, k:]], axis=1), choice)
    count = jnp.minimum(m + 1, plan.max_new - t)
    valid = pos[None] < count
    stop = valid & jnp.any(emitted[..., None] == dyn.stop[None, None], axis=-1)
    first_stop = jnp.min(jnp.where(stop, pos[None], k + 1), axis=1)
    keep = valid & (pos[None] <= first_stop[:, None]) & active[:, None]

    cols = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, t, axis=1)
    new = buf.replace(
        tokens=cols(buf.tokens, jnp.where(keep, emitted, dyn.pad)),
        exit_depth=cols(buf.exit_depth, jnp.where(keep, depth_n, 0)),
        logits=None if buf.logits is None else cols(buf.logits, jnp.where(keep[..., None], p_logits, 0.0)),
        done=done | jnp.any(stop & keep, axis=1),
        lengths=buf.lengths + jnp.sum(keep, axis=1, dtype=jnp.int32),
        t=t + count,
        speculation=buf.speculation + jnp.stack([jnp.int32(1), jnp.int32(k), m.astype(jnp.int32)]),
    )
    slot = E.prompt_width(plan, dstate) + t - 1
    return _clear_rejected(dstate, slot, k + 1, count), new
