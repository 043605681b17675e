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


def packing_layout(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(positions, document, run, shared) of each column of a [B, T] mask under `make_context`'s
    convention; a document and a run are named by the column they start at."""
    m = attention_mask.astype(jnp.int32)
    b, t = m.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    real = m != 0
    shared = real & (m % 2 == 1)
    segment = real & ~shared
    new_run = jnp.concatenate([jnp.ones((b, 1), bool), m[:, 1:] != m[:, :-1]], axis=1)
    run = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=1)
    last_real = jax.lax.cummax(jnp.where(real, idx, -1), axis=1)
    prev_real = jnp.concatenate([jnp.full((b, 1), -1), last_real[:, :-1]], axis=1)
    after_segment = jnp.take_along_axis(segment, jnp.maximum(prev_real, 0), axis=1) & (prev_real >= 0)
    doc = jax.lax.cummax(jnp.where(shared & ((prev_real < 0) | after_segment), idx, 0), axis=1)
    n_shared = jnp.cumsum(shared, axis=1)
    in_doc = n_shared - jnp.take_along_axis(n_shared - shared, doc, axis=1)  # the document's shared tokens so far
    pos = jnp.where(segment, in_doc + idx - run, in_doc - 1)
    return jnp.maximum(pos, 0), doc, run, shared


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (padding-invariant); in packed
    rows (see `make_context`) each document and segment at the positions it would have alone."""
    return packing_layout(attention_mask)[0]


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
    by default the keys are the queries themselves, and the mask's values may pack several sequences
    into one row: 0 padding; odd, a shared token, seen by every later token of its document; even, a
    segment (a run of one value) that sees its document's shared tokens and itself only. A document
    starts at a shared token that follows a segment (or at the row's first token); one without shared
    tokens can only start a row. Each token sits at the position it would have alone: several
    continuations of one context, and several such documents, score in one row. A 0/1 mask is one
    document: the usual causal mask.
    """
    doc = run = shared = None
    if positions is None:
        positions, doc, run, shared = packing_layout(attention_mask)
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
        if doc is None:
            _, doc, run, shared = packing_layout(attention_mask)
        allowed &= (doc[:, None, :] == doc[:, :, None]) & (shared[:, None, :] | (run[:, None, :] == run[:, :, None]))
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
