"""Pure functions for one decoder layer and a stack of them.

Parameters are plain dicts of arrays (one layer, or all layers stacked on axis 0). Kernels are stored
[in, out] with heads split out: wq [D, H, hd], wk/wv [D, Hkv, hd], wo [H, hd, D], w_gate/w_up [D, I],
w_down [I, D]. Norms and softmax run in float32; matmuls in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from loopus_jax.config import ModelConfig, rope_inv_freq

# Large finite negative (not -inf) so fully masked query rows (padding) give a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# Query block length for self-attention over one sequence: blocks attend only to keys up to their
# end (the rest are causally masked), which skips the upper triangle and keeps scores in cache.
ATTENTION_CHUNK = 128


@struct.dataclass
class AttnContext:
    """Everything a layer needs besides its weights and input; computed once per forward."""

    cos: jax.Array  # [B, T, rotary_dim] float32
    sin: jax.Array  # [B, T, rotary_dim] float32
    mask: jax.Array  # [B, 1, T, S] bool: True where query t may attend key s
    # Keys are the queries themselves, masked causally by index: key s > query t is never visible.
    self_causal: bool = struct.field(pytree_node=False, default=False)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (padding-invariant).

    Mask values above 1 mark packed segments (see `make_context`): each segment's positions continue
    from the shared tokens before it, as if it followed them alone.
    """
    m = attention_mask.astype(jnp.int32)
    shared = jnp.cumsum(m == 1, axis=-1)  # shared tokens up to and including each column
    t = jnp.arange(m.shape[-1])
    new_run = jnp.concatenate([jnp.ones_like(m[:, :1], bool), m[:, 1:] != m[:, :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(new_run, t, 0), axis=m.ndim - 1)
    pos = jnp.where(m > 1, shared + (t - run_start), shared - 1)
    return jnp.maximum(pos, 0)


def last_valid_index(attention_mask: jax.Array) -> jax.Array:
    """Each row's last real position, for any padding (the authors take count - 1: right padding only)."""
    t = attention_mask.shape[1]
    return (t - 1) - jnp.argmax(attention_mask[:, ::-1] != 0, axis=-1)


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
    by default the keys are the queries themselves. Mask values: 0 padding, 1 a token every later
    token sees, k > 1 a packed segment (a run of equal values after the shared tokens) that sees the
    shared tokens and itself only: several continuations of one context score in one row, each as if
    alone (`positions_from_mask` restarts its positions after the shared tokens).
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
    self_causal = key_mask is attention_mask
    if self_causal:
        # Same positions can repeat on left-padded rows (all pads sit at 0): order by index too.
        t = attention_mask.shape[1]
        allowed &= jnp.tril(jnp.ones((t, t), bool))[None]
        seg = attention_mask.astype(jnp.int32)
        allowed &= (seg[:, None, :] <= 1) | (seg[:, None, :] == seg[:, :, None])
    return AttnContext(cos, sin, allowed[:, None], self_causal)


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


def _attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,K,G,T,hd], k/v [B,K,S,hd], mask [B,1,T,S] -> [B,K,G,T,hd]; scores and softmax in float32."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, self_causal: bool = False) -> jax.Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,S,Hkv,hd], mask [B,1,T,S] -> [B,T,H,hd].

    Heads go in front (one transpose per input) so both matmuls are plain batched GEMMs. With
    `self_causal`, query blocks of ATTENTION_CHUNK see only keys up to their end: the skipped keys
    are masked anyway, so the result is the same and the masked upper triangle is never computed.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qt = q.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if self_causal and t > ATTENTION_CHUNK:
        blocks = [
            _attend_block(qt[:, :, :, s:e], kt[:, :, :e], vt[:, :, :e], mask[:, :, s:e, :e])
            for s, e in ((s, min(t, s + ATTENTION_CHUNK)) for s in range(0, t, ATTENTION_CHUNK))
        ]
        out = jnp.concatenate(blocks, axis=3)
    else:
        out = _attend_block(qt, kt, vt, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def mlp(p: dict, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = jnp.einsum("btd,di->bti", x, p["w_gate"].astype(dt))
    up = jnp.einsum("btd,di->bti", x, p["w_up"].astype(dt))
    return jnp.einsum("bti,id->btd", jax.nn.silu(gate) * up, p["w_down"].astype(dt))


def decoder_layer(p: dict, h: jax.Array, ctx: AttnContext, cfg: ModelConfig) -> jax.Array:
    """One pre-norm layer: h + attn(norm(h)), then + mlp(norm(.))."""
    x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv(p, x, ctx, cfg)
    a = attend(q, k, v, ctx.mask, ctx.self_causal)
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
