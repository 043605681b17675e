"""Preallocated KV caches and a layer stack that reads and writes them.

Layout. A block's cache holds K and V as [L, B, S, Hkv, hd] (L layers of the block, S slots = prompt
bucket P + max_new_tokens); the looped model's reasoning block has one cache per loop depth, stacked in
front: [N, L, B, S, Hkv, hd]. Slot s < P holds the s-th token of the left-padded prompt, slot P + t the
t-th generated token. `Keys` says which slots exist for attention (prompt padding and not-yet-written
slots are masked at every block and step) and their RoPE positions (0 at each row's first real token).

The stack runs a block on T new tokens at slots [slot, slot + T): in prefill (T = P, slot 0) the
queries attend to their own fresh keys, exactly as `forward` does; in a decoding step (T = 1) the query
attends to the whole cache with its own key and value placed at its slot. It returns the new K/V
([L, B, T, Hkv, hd]) instead of the updated cache so a looped block can write them per its fill rule,
and it reads each layer's cache slice in place (the depth and layer are dynamic indices), so a step
never copies a whole depth's cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from loopus_jax.config import ModelConfig
from loopus_jax.models import layers as L


@struct.dataclass
class KV:
    """Keys and values of a block: [L, B, S|T, Hkv, hd], or [N, L, B, S, Hkv, hd] with one cache per depth."""

    k: jax.Array
    v: jax.Array


@struct.dataclass
class Keys:
    """Per-slot facts shared by every block: `mask` [B, S] bool (a real, written token), `pos` [B, S] int32 RoPE positions."""

    mask: jax.Array
    pos: jax.Array


def empty_kv(cfg: ModelConfig, lead: tuple[int, ...], batch: int, slots: int, dtype: jnp.dtype) -> KV:
    shape = (*lead, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def prompt_keys(prompt_mask: jax.Array, slots: int) -> Keys:
    """Keys of a left-padded prompt [B, P] in an S-slot cache: generated token t gets position n_real + t."""
    b, p = prompt_mask.shape
    n_real = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
    gen_pos = n_real[:, None] + jnp.arange(slots - p, dtype=jnp.int32)[None]
    pos = jnp.concatenate([L.positions_from_mask(prompt_mask), gen_pos], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((b, slots - p), bool)], axis=1)
    return Keys(mask, pos)


def step_context(cfg: ModelConfig, keys: Keys, slot: jax.Array, count: int = 1) -> L.AttnContext:
    """Attention context of `count` new tokens at slots [slot, slot + count) against every written cache
    slot (their own included; causal among themselves by position)."""
    b = keys.pos.shape[0]
    pos = jax.lax.dynamic_slice_in_dim(keys.pos, slot, count, axis=1)
    return L.make_context(cfg, jnp.ones((b, count), jnp.int32), positions=pos, key_mask=keys.mask, key_positions=keys.pos)


def layer_with(p: dict, h: jax.Array, ctx: L.AttnContext, cfg: ModelConfig, attention) -> tuple[jax.Array, tuple]:
    """`layers.decoder_layer` with its attention replaced by `attention(q, k, v) -> (out, new k/v)`."""
    x = L.rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = L.qkv(p, x, ctx, cfg)
    a, kv = attention(q, k, v)
    o = jnp.einsum("bthk,hkd->btd", a, p["wo"].astype(h.dtype))
    if cfg.o_bias:
        o = o + p["bo"].astype(h.dtype)
    h = h + o
    return h + L.mlp(p, L.rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)), kv


def unstack(stack: dict) -> list[dict]:
    """A block's stacked layer weights as one dict per layer (see `run_stack`)."""
    n = jax.tree.leaves(stack)[0].shape[0] if stack else 0
    return [jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n)]


def run_stack(
    layers: dict | list[dict],
    h: jax.Array,
    ctx: L.AttnContext,
    cfg: ModelConfig,
    cache: KV | None,
    slot: jax.Array,
    *,
    depth: jax.Array | None = None,
    dtype: jnp.dtype,
) -> tuple[jax.Array, KV]:
    """Apply a block's layers to h [B, T, D]; returns (h, new K/V [L, B, T, Hkv, hd] in `dtype`).

    `layers` stacked on a leading axis runs as a `lax.scan`; a list of per-layer dicts runs unrolled
    (XLA on CPU copies a scanned layer's weights out of the stack before each matrix-vector product,
    which doubles a decoding step's memory traffic; separate per-layer buffers avoid that).
    `cache` None means prefill (self-attention among the T tokens, `ctx` from `make_context`); else
    the tokens attend to `cache` (indexed at `depth` when it has a depth axis) through `ctx`.
    """

    def layer(p: dict, h: jax.Array, i) -> tuple[jax.Array, tuple]:
        def attention(q, k, v):
            new = (k.astype(dtype), v.astype(dtype))
            if cache is None:
                return L.attend(q, k, v, ctx.mask, ctx.self_causal), new
            full = []
            for c, x in zip((cache.k, cache.v), new):
                if depth is not None:
                    c = jax.lax.dynamic_index_in_dim(c, depth, 0, keepdims=False)
                c = jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False)
                full.append(jax.lax.dynamic_update_slice_in_dim(c, x, slot, axis=1).astype(q.dtype))
            return L.attend(q, full[0], full[1], ctx.mask), new

        return layer_with(p, h, ctx, cfg, attention)

    if isinstance(layers, dict):
        n = jax.tree.leaves(layers)[0].shape[0]
        h, (k, v) = jax.lax.scan(lambda c, xs: layer(xs[0], c, xs[1]), h, (layers, jnp.arange(n)))
        return h, KV(k, v)
    ks, vs = [], []
    for i, p in enumerate(layers):
        h, (k, v) = layer(p, h, i)
        ks.append(k)
        vs.append(v)
    return h, KV(jnp.stack(ks), jnp.stack(vs))


def write(cache: KV, new: KV, slot: jax.Array, depth: jax.Array | None = None) -> KV:
    """Write new K/V [L, B, T, ...] into slots [slot, slot + T) (of one depth's cache when `depth` is given)."""

    def put(c, x):
        if depth is None:
            return jax.lax.dynamic_update_slice_in_dim(c, x, slot, axis=2)
        return jax.lax.dynamic_update_slice(c, x[None], (depth, 0, 0, slot, 0, 0))

    return KV(put(cache.k, new.k), put(cache.v, new.v))


def fill_deeper(cache: KV, latest: KV, slot: jax.Array, from_depth: jax.Array) -> KV:
    """Fill rule `latest` after the depth loop stopped early: depths >= `from_depth` of slots
    [slot, slot + T) get `latest` [L, B, T, ...] (each row's K/V at the depth it exited)."""

    def put(c, x):
        n, t = c.shape[0], x.shape[2]
        region = jax.lax.dynamic_slice_in_dim(c, slot, t, axis=3)
        deeper = (jnp.arange(n) >= from_depth).reshape(n, *([1] * (region.ndim - 1)))
        return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(deeper, x[None], region), slot, axis=3)

    return KV(put(cache.k, latest.k), put(cache.v, latest.v))


def clear_after(c: jax.Array, slot: jax.Array, count: int, keep: jax.Array, axis: int) -> jax.Array:
    """Zero (False) slots [slot + keep, slot + count) of `c` along its slot `axis`: what a rejected
    speculative draft wrote there, so the cache equals one that never saw those tokens."""
    region = jax.lax.dynamic_slice_in_dim(c, slot, count, axis=axis)
    gone = (jnp.arange(count) >= keep).reshape((count,) + (1,) * (c.ndim - axis - 1))
    return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(gone, jnp.zeros_like(region), region), slot, axis=axis)
