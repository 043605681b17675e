"""The selective gate between loop iterations and the confidence (q) head (method sections 2-3).

Both compute in float32 whatever the parameter and activation dtypes, and cast back.
Initialisation follows the authors: the gate as in Mamba (A_log = log(1..D), delta_proj weight
uniform in +-r^-0.5, bias = softplus^-1 of log-uniform dt in [1e-3, 1e-1] floored at 1e-4, the
input projection with torch's default Linear init), the q head as torch's LayerNorm + Linear.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from loopus_jax.sharding import register_param_axes

register_param_axes(
    {
        "A_log": ("norm",),
        "w_in": ("embed", None),
        "w_dt": (None, "embed"),
        "b_dt": ("norm",),
        "ln_scale": ("norm",),
        "ln_bias": ("norm",),
        "w_q": ("embed", None),
        "b_q": (None,),
    }
)

LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the authors' q head uses


def gate_rank(hidden_size: int) -> int:
    return math.ceil(hidden_size / 16)


def gate_apply(p: dict, h_new: jax.Array, h_old: jax.Array) -> jax.Array:
    """h = A_bar * h_new + (1 - A_bar) * h_old with A_bar = exp(softplus(W_dt W_in (h_new - h_old) + b) * -exp(A_log))."""
    f32 = jnp.float32
    new, old = h_new.astype(f32), h_old.astype(f32)
    dt_low = (new - old) @ p["w_in"].astype(f32)
    delta = jax.nn.softplus(dt_low @ p["w_dt"].astype(f32) + p["b_dt"].astype(f32))
    a_bar = jnp.exp(delta * -jnp.exp(p["A_log"].astype(f32)))
    return (a_bar * new + (1.0 - a_bar) * old).astype(h_new.dtype)


def q_head_apply(p: dict, x: jax.Array) -> jax.Array:
    """q logit = Linear(LayerNorm(x)); x [..., D] -> [...] float32."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(var + LAYERNORM_EPS) * p["ln_scale"].astype(jnp.float32) + p["ln_bias"].astype(jnp.float32)
    return (y @ p["w_q"].astype(jnp.float32) + p["b_q"].astype(jnp.float32))[..., 0]


class SelectiveGate(nnx.Module):
    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d, r = hidden_size, gate_rank(hidden_size)
        k1, k2, k3 = rngs.params(), rngs.params(), rngs.params()
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, d + 1, dtype=jnp.float32)).astype(param_dtype))
        bound = 1.0 / math.sqrt(d)  # torch Linear default (kaiming_uniform with a=sqrt(5))
        self.w_in = nnx.Param(jax.random.uniform(k1, (d, r), jnp.float32, -bound, bound).astype(param_dtype))
        std = r**-0.5
        self.w_dt = nnx.Param(jax.random.uniform(k2, (r, d), jnp.float32, -std, std).astype(param_dtype))
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = jnp.maximum(jnp.exp(jax.random.uniform(k3, (d,), jnp.float32) * (hi - lo) + lo), 1e-4)
        self.b_dt = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in ("A_log", "w_in", "w_dt", "b_dt")}


class QHead(nnx.Module):
    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d = hidden_size
        bound = 1.0 / math.sqrt(d)
        self.ln_scale = nnx.Param(jnp.ones((d,), param_dtype))
        self.ln_bias = nnx.Param(jnp.zeros((d,), param_dtype))
        self.w_q = nnx.Param(jax.random.uniform(rngs.params(), (d, 1), jnp.float32, -bound, bound).astype(param_dtype))
        self.b_q = nnx.Param(jax.random.uniform(rngs.params(), (1,), jnp.float32, -bound, bound).astype(param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in ("ln_scale", "ln_bias", "w_q", "b_q")}
