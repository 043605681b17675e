"""Pure functions for one decoder layer and a stack of them.

Parameters are plain dicts of arrays (one layer, or all layers stacked on axis 0). Kernels are stored
[in, out] with heads split out: wq [D, H, hd], wk/wv [D, Hkv, hd], wo [H, hd, D], w_gate/w_up [D, I],
w_down [I, D]. Norms and softmax run in float32; matmuls in the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopus_jax.config import ModelConfig, rope_inv_freq

# Large finite negative (not -inf) so fully masked query rows (padding) give a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttnContext(NamedTuple):
    """Everything a layer needs besides its weights and input; computed once per forward."""

    cos: jax.Array  # [B, T, rotary_dim] float32
    sin: jax.Array  # [B, T, rotary_dim] float32
    mask: jax.Array  # [B, 1, T, S] bool: True where query t may attend key s


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (padding-invariant)."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def make_context(
    cfg: ModelConfig,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    key_positions: jax.Array | None = None,
) -> AttnContext:
    """Causal + padding (+ sliding window) mask and RoPE tables for a [B, T] batch.

    `key_mask`/`key_positions` describe the keys when they differ from the queries (a KV cache);
    by default the keys are the queries themselves.
    """
    if positions is None:
        positions = positions_from_mask(attention_mask)
    if key_mask is None:
        key_mask, key_positions = attention_mask, positions
    cos, sin = rope_cos_sin(cfg, positions)
    q_idx = positions[:, :, None]
    k_idx = key_positions[:, None, :]
    allowed = (k_idx <= q_idx) & key_mask.astype(bool)[:, None, :]
    if cfg.sliding_window is not None:
        allowed &= q_idx - k_idx < cfg.sliding_window
    if key_mask is attention_mask:
        # Same positions can repeat on left-padded rows (all pads sit at 0): order by index too.
        t = attention_mask.shape[1]
        allowed &= jnp.tril(jnp.ones((t, t), bool))[None]
    return AttnContext(cos, sin, allowed[:, None])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int) -> jax.Array:
    """HF's half-split rotation (rotate_half), on the first `rotary_dim` channels. x: [B, T, H, hd]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * c + rotated * s
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def qkv(p: dict, x: jax.Array, ctx: AttnContext, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected, normed and rotated q [B,T,H,hd], k and v [B,T,Hkv,hd] for one layer."""
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, p["wq"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, p["wk"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, p["wv"].astype(dt))
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, ctx.cos, ctx.sin, cfg.rotary_dim)
    k = apply_rope(k, ctx.cos, ctx.sin, cfg.rotary_dim)
    return q, k, v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention; scores and softmax in float32. q [B,T,H,hd], k/v [B,S,Hkv,hd]."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)  # mask [B,1,T,S] -> [B,1,1,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def mlp(p: dict, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = jnp.einsum("btd,di->bti", x, p["w_gate"].astype(dt))
    up = jnp.einsum("btd,di->bti", x, p["w_up"].astype(dt))
    return jnp.einsum("bti,id->btd", jax.nn.silu(gate) * up, p["w_down"].astype(dt))


def decoder_layer(p: dict, h: jax.Array, ctx: AttnContext, cfg: ModelConfig) -> jax.Array:
    """One pre-norm layer: h + attn(norm(h)), then + mlp(norm(.))."""
    x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv(p, x, ctx, cfg)
    a = attend(q, k, v, ctx.mask)
    o = jnp.einsum("bthk,hkd->btd", a, p["wo"].astype(h.dtype))
    if cfg.o_bias:
        o = o + p["bo"].astype(h.dtype)
    h = h + o
    return h + mlp(p, rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps))


def run_layers(stacked: dict, h: jax.Array, ctx: AttnContext, cfg: ModelConfig, *, scan: bool = True) -> jax.Array:
    """Apply every layer of a stack (leading axis) in order: a `lax.scan`, or unrolled."""
    n = jax.tree.leaves(stacked)[0].shape[0] if stacked else 0
    if n == 0:
        return h
    if scan:

        def body(carry, p):
            return decoder_layer(p, carry, ctx, cfg), None

        h, _ = jax.lax.scan(body, h, stacked)
        return h
    for i in range(n):
        h = decoder_layer(jax.tree.map(lambda a, i=i: a[i], stacked), h, ctx, cfg)
    return h
