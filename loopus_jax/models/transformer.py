"""The generic decoder-only transformer as a Flax NNX module, with layer weights stacked on axis 0.

Every family (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4) is this one module: the config's flags pick
biases and q/k norms; fused HF projections (Phi-3) are split at conversion time. The module is only a
container: `__call__` hands plain arrays to the pure functions in `layers.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopus_jax.config import ModelConfig
from loopus_jax.models import layers as L

# Which positions get logits: (start, stop) of every row, or (rows, cols) index arrays (see `LMEnds.logits`).
Columns = tuple[int, int] | tuple[jax.Array, jax.Array]


def stack_spec(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Per-layer parameter name -> (shape without the layer axis, logical axes, init kind)."""
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    spec = {
        "attn_norm": ((d,), ("norm",), "ones"),
        "wq": ((d, h, hd), ("embed", "heads", "head_dim"), "normal"),
        "wk": ((d, kv, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "wv": ((d, kv, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "wo": ((h, hd, d), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((d,), ("norm",), "ones"),
        "w_gate": ((d, i), ("embed", "mlp"), "normal"),
        "w_up": ((d, i), ("embed", "mlp"), "normal"),
        "w_down": ((i, d), ("mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        spec["bq"] = ((h, hd), ("heads", "head_dim"), "zeros")
        spec["bk"] = ((kv, hd), ("kv_heads", "head_dim"), "zeros")
        spec["bv"] = ((kv, hd), ("kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        spec["bo"] = ((d,), ("norm",), "zeros")
    if cfg.qk_norm:
        spec["q_norm"] = ((hd,), ("head_dim",), "ones")
        spec["k_norm"] = ((hd,), ("head_dim",), "ones")
    return spec


def _init(kind: str, shape: tuple[int, ...], key: jax.Array, dtype: Any) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class LayerStack(nnx.Module):
    """`n` decoder layers whose weights share a leading layer axis; a block of the model is a stack."""

    def __init__(self, cfg: ModelConfig, n: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        self.names = tuple(stack_spec(cfg))
        for name, (shape, _, kind) in stack_spec(cfg).items():
            setattr(self, name, nnx.Param(_init(kind, (n, *shape), rngs.params(), param_dtype)))

    @property
    def num_layers(self) -> int:
        return getattr(self, self.names[0]).shape[0]

    def arrays(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in self.names}


class LMEnds(nnx.Module):
    """Embedding lookup and final norm + LM head, shared by the base and the looped model.

    Subclasses define `config`, `compute_dtype`, `embed`, `final_norm` and `lm_head` (None if tied).
    """

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.compute_dtype)

    def head_weight(self) -> jax.Array:
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, h: jax.Array, columns: Columns | None = None) -> jax.Array:
        """Final norm + lm_head; logits are float32. `columns` (start, stop) ints: only those positions'
        logits, so a caller that needs a few (task scoring) skips the vocabulary-wide matmul elsewhere;
        (rows, cols) int arrays [P]: the P positions `(rows[i], cols[i])` as one row [1, P, V] (a ragged
        set of positions per row)."""
        if columns is not None:
            start, stop = columns
            h = h[:, start:stop] if isinstance(start, int) else h[start, stop][None]
        x = L.rms_norm(h, self.final_norm[...], self.config.rms_norm_eps)
        return jnp.einsum("btd,dv->btv", x, self.head_weight().astype(x.dtype), preferred_element_type=jnp.float32)


class Transformer(LMEnds):
    """Embedding -> stacked layers -> final norm -> lm_head (or the tied embedding)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs | None = None,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        scan_layers: bool = True,
    ):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.compute_dtype = jnp.dtype(dtype or param_dtype).name
        self.scan_layers = scan_layers
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed = nnx.Param(_init("normal", (v, d), rngs.params(), param_dtype))
        self.layers = LayerStack(cfg, cfg.num_layers, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(_init("normal", (d, v), rngs.params(), param_dtype))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        scan_layers: bool | None = None,
        columns: Columns | None = None,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        ctx = L.make_context(self.config, attention_mask)
        h = self.embed_tokens(input_ids)
        scan = self.scan_layers if scan_layers is None else scan_layers
        h = L.run_layers(self.layers.arrays(), h, ctx, self.config, scan=scan)
        return self.logits(h, columns)


@dataclasses.dataclass
class ModelOutput:
    """What `forward` returns; looped models add `exit_depth` and `q`."""

    logits: jax.Array
    exit_depth: jax.Array | None = None
    q: jax.Array | None = None


def param_dtype(model: nnx.Module) -> np.dtype:
    """The dtype of the model's (non-gate) parameters, as stored and exported."""
    return np.dtype(model.embed[...].dtype)


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
