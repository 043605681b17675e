"""Prefill and one decoding step, with per-depth KV caches or by recomputing the whole prefix.

Both paths expose the same two pure functions (`prefill`, `step`) over an explicit decoding state, so
the generation loop in `generation.py` does not care which one runs.

Cached looped model, per call (prefill: the whole left-padded prompt; step: one new token):
encoder (its cache) -> depth loop over the reasoning layers, depth i reading and writing the depth-i
cache, gate, q from the watched position (the prompt's last token, or the new token), per-sample
halting with `halting.advance` (criteria that need logits run the decoder on the watched position
at each depth: the prompt's last token in prefill, the new token against the decoder cache in a step);
a halted row keeps its state -> decoder (its cache) -> logits.
A row that exits at depth k has no keys/values of its own at depths k+1..N. Fill rule `latest`: the
K/V it had at depth k are written into every deeper depth's cache (also when the depth loop stops early
because all rows halted), so deeper depths of later tokens attend to its latest state. Fill rule `skip`:
those slots are marked invisible at the depths the row did not reach (a per-depth validity mask).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from loopus_jax.decode import cache as C
from loopus_jax.decode.sampling import Sampler
from loopus_jax.loop import halting as H
from loopus_jax.loop.gate import gate_apply
from loopus_jax.loop.model import RunOptions
from loopus_jax.models import layers as L

FILL_RULES = ("latest", "skip")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static options of one generation (each distinct plan compiles once per prompt bucket)."""

    run: RunOptions | None  # None: a base model
    cache: bool
    scan: bool  # cached path: layers as a lax.scan over the stack, or unrolled over per-layer weights
    fill: str
    cache_dtype: str
    max_new: int
    sampler: Sampler
    return_logits: bool
    speculative: tuple[int, int] | None = None  # (draft_depth, draft_tokens): see speculative.py

    @property
    def spare_slots(self) -> int:
        """Cache slots past P + max_new: a speculative round near the end feeds up to k tokens beyond."""
        return 0 if self.speculative is None else self.speculative[1]


@struct.dataclass
class CacheState:
    keys: C.Keys
    blocks: dict  # name -> C.KV: "layers" (base) or "encoder", "reasoning" (depth axis), "decoder"
    valid: jax.Array | None  # fill "skip": [N, B, S] bool, slot visible at that depth


@struct.dataclass
class WindowState:
    """No cache: the left-padded sequence so far, newest token last."""

    ids: jax.Array
    mask: jax.Array


@struct.dataclass
class Thresholds:
    """The halting criterion's two traced parameters, as `LoopedLM.options()` returns them."""

    param0: jax.Array
    param1: jax.Array


# --- cached --------------------------------------------------------------------------------------


def block_weights(model, plan: Plan) -> dict:
    """Each block's layer weights, stacked (scan) or one dict per layer (unrolled). Computed outside
    the generation loop, so unrolled layers read their own buffers at every step."""
    if plan.run is None:
        blocks = {"layers": model.layers.arrays()}
    else:
        blocks = {"encoder": model.encoder.arrays(), "reasoning": model.reasoning.arrays(), "decoder": model.decoder.arrays()}
    return blocks if plan.scan else {k: C.unstack(v) for k, v in blocks.items()}


def _num_layers(layers: dict | list) -> int:
    return len(layers) if isinstance(layers, list) else jax.tree.leaves(layers)[0].shape[0]


def _run_block(model, name, layers, h, ctx, state_blocks, slot, prefill, plan, depth=None):
    """One block through `cache.run_stack`; returns (h, new K/V); a block with no layers is the identity."""
    if _num_layers(layers) == 0:
        return h, None
    cache = None if prefill else state_blocks[name]
    return C.run_stack(layers, h, ctx, model.config, cache, slot, depth=depth, dtype=jnp.dtype(plan.cache_dtype))


def _write(blocks: dict, name: str, kv, slot) -> dict:
    return blocks if kv is None else {**blocks, name: C.write(blocks[name], kv, slot)}


def _watched_logits(model, plan, decoder, ctx, state: CacheState, slot, prefill, watch):
    """`h -> [B, V]` logits at the watched positions, for criteria that need them: in prefill the
    prompt's decoder over the whole prompt (`LoopedLM.watched_logits`), in a step the new token
    through the decoder against the decoder cache (earlier tokens' K/V; its own are not written)."""
    if prefill:
        return lambda h: model.watched_logits(h, ctx, watch, True)

    def step(h):
        h, _ = _run_block(model, "decoder", decoder, h, ctx, state.blocks, slot, False, plan)
        return model.logits(h)[:, 0]

    return step


def _depth_loop(model, plan, stack, decoder, h, ctx, state: CacheState, slot, prefill, thr: Thresholds, active, watch):
    """The halting while_loop over depths with cache writes; returns (h, exit depth [B], reasoning KV, valid)."""
    run, cfg = plan.run, model.config
    n, b, t = run.n_recursion, h.shape[0], h.shape[1]
    latest = plan.fill == "latest"
    rsn, valid = state.blocks["reasoning"], state.valid
    if not latest and not prefill:
        # The new token sees itself at every depth it runs; its real visibility is set after the loop.
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((n, b, t), bool), slot, axis=2)
    nl = _num_layers(stack)
    kv_shape = (nl, b, t, cfg.num_kv_heads, cfg.head_dim)
    last0 = C.KV(jnp.zeros(kv_shape, plan.cache_dtype), jnp.zeros(kv_shape, plan.cache_dtype))
    watched_logits = _watched_logits(model, plan, decoder, ctx, state, slot, prefill, watch)

    def cond(c):
        i, _, active, *_ = c
        return (i < n) & jnp.any(active)

    def body(c):
        i, h_old, active, exit_depth, carry, rsn, last = c
        ctx_i = ctx
        if not latest and not prefill:
            vis = jax.lax.dynamic_index_in_dim(valid, i, 0, keepdims=False)
            ctx_i = ctx.replace(mask=ctx.mask & vis[:, None, None, :])
        h_new, kv = _run_block(model, "reasoning", stack, h_old, ctx_i, state.blocks, slot, prefill, plan, depth=i)
        gated = gate_apply(model.gate.arrays(), h_new, h_old)
        q = jax.nn.sigmoid(model.q_logit(h_old, h_new, gated, watch, run.q_source))
        h_next, halt, carry = H.advance(
            run.halting,
            (thr.param0, thr.param1),
            i,
            n,
            q,
            h_old,
            gated,
            active,
            watch,
            carry,
            q_eval_interval=run.q_eval_interval,
            watched_logits=watched_logits,
        )
        if latest:  # halted rows keep writing the K/V of the depth they exited at
            sel = active[None, :, None, None, None]
            kv = C.KV(jnp.where(sel, kv.k, last.k), jnp.where(sel, kv.v, last.v))
        rsn = C.write(rsn, kv, slot, depth=i)
        exit_depth = jnp.where(halt, i + 1, exit_depth)
        return i + 1, h_next, active & ~halt, exit_depth, carry, rsn, kv

    carry0 = H.init_carry(run.halting, b, cfg.vocab_size)
    init = (jnp.int32(0), h, active, jnp.where(active, n, 0).astype(jnp.int32), carry0, rsn, last0)
    i_end, h, _, exit_depth, _, rsn, last = jax.lax.while_loop(cond, body, init)
    if latest:
        rsn = C.fill_deeper(rsn, last, slot, i_end)
    else:
        seen = jnp.arange(n)[:, None, None] < exit_depth[None, :, None]
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.broadcast_to(seen, (n, b, t)), slot, axis=2)
    return h, exit_depth, rsn, valid


def _pass(model, plan, arrays, ids, ctx, state: CacheState, slot, prefill, thr, active, watch, every_position=False):
    """Every block on `ids` [B, T] at slots [slot, slot + T): (new state, logits of the last position [B, V]
    (of every position [B, T, V] with `every_position`), exit [B])."""
    blocks = dict(state.blocks)
    h = model.embed_tokens(ids)
    if plan.run is None:
        h, kv = _run_block(model, "layers", arrays["layers"], h, ctx, blocks, slot, prefill, plan)
        blocks = _write(blocks, "layers", kv, slot)
        exit_depth, valid = jnp.zeros((ids.shape[0],), jnp.int32), state.valid
    else:
        h, kv = _run_block(model, "encoder", arrays["encoder"], h, ctx, blocks, slot, prefill, plan)
        blocks = _write(blocks, "encoder", kv, slot)
        h, exit_depth, blocks["reasoning"], valid = _depth_loop(
            model, plan, arrays["reasoning"], arrays["decoder"], h, ctx, state, slot, prefill, thr, active, watch
        )
        h, kv = _run_block(model, "decoder", arrays["decoder"], h, ctx, blocks, slot, prefill, plan)
        blocks = _write(blocks, "decoder", kv, slot)
    logits = model.logits(h) if every_position else model.logits(h[:, -1:])[:, 0]
    return CacheState(state.keys, blocks, valid), logits, exit_depth


def _empty_state(model, plan: Plan, prompt_mask: jax.Array) -> CacheState:
    cfg, dt = model.config, jnp.dtype(plan.cache_dtype)
    b, p = prompt_mask.shape
    slots = p + plan.max_new + plan.spare_slots
    keys = C.prompt_keys(prompt_mask, slots)
    if plan.run is None:
        return CacheState(keys, {"layers": C.empty_kv(cfg, (cfg.num_layers,), b, slots, dt)}, None)
    n = plan.run.n_recursion
    blocks = {
        "encoder": C.empty_kv(cfg, (model.encoder.num_layers,), b, slots, dt),
        "reasoning": C.empty_kv(cfg, (n, model.reasoning.num_layers), b, slots, dt),
        "decoder": C.empty_kv(cfg, (model.decoder.num_layers,), b, slots, dt),
    }
    valid = jnp.zeros((n, b, slots), bool) if plan.fill == "skip" else None
    return CacheState(keys, blocks, valid)


def prefill_cached(model, plan: Plan, ids: jax.Array, mask: jax.Array, thr: Thresholds):
    """The left-padded prompt [B, P] through every block, filling slots [0, P) of fresh caches."""
    state = _empty_state(model, plan, mask)
    ctx = L.make_context(model.config, mask)
    b, p = ids.shape
    watch = L.last_valid_index(mask) if plan.run is None or plan.run.q_source == "pre_gate_last_valid" else jnp.full((b,), p - 1)
    # The prompt is compute-bound: the layers run as a scan whatever `plan.scan` (a smaller program to compile).
    weights = block_weights(model, dataclasses.replace(plan, scan=True))
    return _pass(model, plan, weights, ids, ctx, state, jnp.int32(0), True, thr, jnp.ones((b,), bool), watch)


def prompt_width(plan: Plan, state: CacheState) -> int:
    """P, the prompt bucket: generated token t sits in slot P + t."""
    return state.keys.mask.shape[1] - plan.max_new - plan.spare_slots


def step_cached(
    model, plan: Plan, weights: dict, state: CacheState, token: jax.Array, t: jax.Array, active: jax.Array, thr: Thresholds
):
    """Generated token `t - 1` (its slot: P + t - 1) through every block against the caches; `weights` from `block_weights`."""
    return feed_cached(model, plan, weights, state, token[:, None], t, active, thr)


def feed_cached(
    model,
    plan: Plan,
    weights: dict,
    state: CacheState,
    tokens: jax.Array,
    t: jax.Array,
    active: jax.Array,
    thr: Thresholds,
    every_position: bool = False,
):
    """Generated tokens t - 1 .. t + T - 2 (`tokens` [B, T], slots from P + t - 1) through every block in
    one pass, each attending to the caches and to the tokens before it; the depth loop judges halting at
    the first of them (with `halting="none"`, as a speculative verification runs, it does not matter)."""
    b, count = tokens.shape
    slot = prompt_width(plan, state) + t - 1
    keys = C.Keys(jax.lax.dynamic_update_slice_in_dim(state.keys.mask, jnp.ones((b, count), bool), slot, 1), state.keys.pos)
    state = state.replace(keys=keys)
    ctx = C.step_context(model.config, keys, slot, count)
    watch = jnp.zeros((b,), jnp.int32)
    return _pass(model, plan, weights, tokens, ctx, state, slot, False, thr, active, watch, every_position)


# --- no cache: the whole prefix through `model(...)` every step -------------------------------------


def _forward_last(model, plan: Plan, state: WindowState, thr: Thresholds):
    if plan.run is None:
        return model(state.ids, state.mask)[:, -1], jnp.zeros((state.ids.shape[0],), jnp.int32)
    logits, exit_depth, _ = model(state.ids, state.mask, plan.run, thr.param0, thr.param1)
    return logits[:, -1], exit_depth


def prefill_window(model, plan: Plan, ids: jax.Array, mask: jax.Array, thr: Thresholds):
    """The prompt left-padded into a window of P + max_new - 1 columns (room for every fed token)."""
    pad = plan.max_new - 1
    state = WindowState(jnp.pad(ids, ((0, 0), (pad, 0))), jnp.pad(mask, ((0, 0), (pad, 0))))
    logits, exit_depth = _forward_last(model, plan, state, thr)
    return state, logits, exit_depth


def step_window(
    model, plan: Plan, weights: None, state: WindowState, token: jax.Array, t: jax.Array, active: jax.Array, thr: Thresholds
):
    """Shift the window left by one, append the token, recompute everything (the `forward` semantics)."""
    ids = jnp.concatenate([state.ids[:, 1:], token[:, None]], axis=1)
    mask = jnp.concatenate([state.mask[:, 1:], jnp.ones_like(state.mask[:, :1])], axis=1)
    state = WindowState(ids, mask)
    logits, exit_depth = _forward_last(model, plan, state, thr)
    return state, logits, exit_depth
