"""Per-family name tables between HF tensor names and our parameter paths.

Each `Rule` maps one HF tensor (per layer when its name holds `{i}`) to one or more of our
parameters, with `to_jax` and its exact inverse `to_hf` (transposes, reshapes, splits and
concatenations only, so a round trip is bit-exact). The exporter is this table read backwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from loopus_jax.config import ModelConfig

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name, with `{i}` for the layer index
    targets: tuple[str, ...]  # our paths: "embed", "final_norm", "lm_head", or "layers.<name>"
    to_jax: Callable[[np.ndarray], Arrays]
    to_hf: Callable[[Arrays], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def stack(self) -> str | None:
        """The layer-stack attribute a per-layer rule writes into ("layers", "encoder", ...)."""
        return self.targets[0].split(".")[0] if self.per_layer else None


def _identity() -> tuple[Callable, Callable]:
    return (lambda w: (w,)), (lambda ws: ws[0])


def _transpose() -> tuple[Callable, Callable]:
    return (lambda w: (w.T,)), (lambda ws: ws[0].T)


def _heads_in(n: int, hd: int) -> tuple[Callable, Callable]:
    """HF [n*hd, D] -> ours [D, n, hd]."""
    return (lambda w: (w.T.reshape(w.shape[1], n, hd),)), (lambda ws: ws[0].reshape(ws[0].shape[0], n * hd).T)


def _heads_out(n: int, hd: int) -> tuple[Callable, Callable]:
    """HF [D, n*hd] -> ours [n, hd, D]."""
    return (lambda w: (w.T.reshape(n, hd, w.shape[0]),)), (lambda ws: ws[0].reshape(n * hd, ws[0].shape[-1]).T)


def _bias_heads(n: int, hd: int) -> tuple[Callable, Callable]:
    return (lambda b: (b.reshape(n, hd),)), (lambda ws: ws[0].reshape(n * hd))


def _fused_rows(parts: list[tuple[int, tuple[Callable, Callable]]]) -> tuple[Callable, Callable]:
    """HF tensor whose rows concatenate several projections (Phi-3 `qkv_proj`, `gate_up_proj`)."""
    bounds = np.cumsum([rows for rows, _ in parts])[:-1]

    def to_jax(w: np.ndarray) -> Arrays:
        return tuple(fwd(piece)[0] for piece, (_, (fwd, _)) in zip(np.split(w, bounds, axis=0), parts))

    def to_hf(ws: Arrays) -> np.ndarray:
        return np.concatenate([inv((x,)) for x, (_, (_, inv)) in zip(ws, parts)], axis=0)

    return to_jax, to_hf


def _rule(hf: str, targets: str | tuple[str, ...], fns: tuple[Callable, Callable]) -> Rule:
    return Rule(hf, (targets,) if isinstance(targets, str) else targets, *fns)


def hf_rules(cfg: ModelConfig) -> list[Rule]:
    """The name table for `cfg`'s family, restricted to the tensors this config has."""
    h, kv, hd, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    p = "model.layers.{i}."
    rules = [
        _rule("model.embed_tokens.weight", "embed", _identity()),
        _rule("model.norm.weight", "final_norm", _identity()),
        _rule(p + "input_layernorm.weight", "layers.attn_norm", _identity()),
        _rule(p + "post_attention_layernorm.weight", "layers.mlp_norm", _identity()),
        _rule(p + "self_attn.o_proj.weight", "layers.wo", _heads_out(h, hd)),
        _rule(p + "mlp.down_proj.weight", "layers.w_down", _transpose()),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head", _transpose()))
    if cfg.family == "phi3":
        rules.append(
            _rule(
                p + "self_attn.qkv_proj.weight",
                ("layers.wq", "layers.wk", "layers.wv"),
                _fused_rows([(h * hd, _heads_in(h, hd)), (kv * hd, _heads_in(kv, hd)), (kv * hd, _heads_in(kv, hd))]),
            )
        )
        rules.append(
            _rule(
                p + "mlp.gate_up_proj.weight",
                ("layers.w_gate", "layers.w_up"),
                _fused_rows([(inter, _transpose()), (inter, _transpose())]),
            )
        )
    else:
        rules += [
            _rule(p + "self_attn.q_proj.weight", "layers.wq", _heads_in(h, hd)),
            _rule(p + "self_attn.k_proj.weight", "layers.wk", _heads_in(kv, hd)),
            _rule(p + "self_attn.v_proj.weight", "layers.wv", _heads_in(kv, hd)),
            _rule(p + "mlp.gate_proj.weight", "layers.w_gate", _transpose()),
            _rule(p + "mlp.up_proj.weight", "layers.w_up", _transpose()),
        ]
    if cfg.qkv_bias:
        rules += [
            _rule(p + "self_attn.q_proj.bias", "layers.bq", _bias_heads(h, hd)),
            _rule(p + "self_attn.k_proj.bias", "layers.bk", _bias_heads(kv, hd)),
            _rule(p + "self_attn.v_proj.bias", "layers.bv", _bias_heads(kv, hd)),
        ]
    if cfg.o_bias:
        rules.append(_rule(p + "self_attn.o_proj.bias", "layers.bo", _identity()))
    if cfg.qk_norm:
        rules += [
            _rule(p + "self_attn.q_norm.weight", "layers.q_norm", _identity()),
            _rule(p + "self_attn.k_norm.weight", "layers.k_norm", _identity()),
        ]
    return rules


# HF tensors that carry no parameters of ours and may be present in a checkpoint.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_names(rules: list[Rule], layers: dict[str, int]) -> dict[str, tuple[Rule, int | None]]:
    """Every tensor name the table expects -> (its rule, its layer index or None).

    `layers` gives the number of layers of each stack ("layers" for a base model).
    """
    out: dict[str, tuple[Rule, int | None]] = {}
    for r in rules:
        if r.per_layer:
            for i in range(layers[r.stack]):
                out[r.hf.format(i=i)] = (r, i)
        else:
            out[r.hf] = (r, None)
    return out


LDS_BLOCKS = ("encoder", "reasoning", "decoder")


def lds_rules(cfg: ModelConfig) -> list[Rule]:
    """The authors' `lds` checkpoint names: the base table per block (block-local layer indices),
    plus the embedding, final norm, untied lm_head, gate and q head."""
    rules = []
    for r in hf_rules(cfg):
        if r.per_layer:
            suffix = r.hf.removeprefix("model.layers.{i}.")
            for block in LDS_BLOCKS:
                targets = tuple(block + t.removeprefix("layers") for t in r.targets)
                rules.append(Rule(f"{block}.layers.{{i}}.{suffix}", targets, r.to_jax, r.to_hf))
    rules += [
        _rule("encoder.embed_tokens.weight", "embed", _identity()),
        _rule("decoder.norm.weight", "final_norm", _identity()),
        _rule("decoder.lm_head.weight", "lm_head", _transpose()),
        _rule("reasoning.gate.A_log", "gate.A_log", _identity()),
        _rule("reasoning.gate.dt_input_proj.weight", "gate.w_in", _transpose()),
        _rule("reasoning.gate.delta_proj.weight", "gate.w_dt", _transpose()),
        _rule("reasoning.gate.delta_proj.bias", "gate.b_dt", _identity()),
        _rule("q_head.0.weight", "q_head.ln_scale", _identity()),
        _rule("q_head.0.bias", "q_head.ln_bias", _identity()),
        _rule("q_head.1.weight", "q_head.w_q", _transpose()),
        _rule("q_head.1.bias", "q_head.b_q", _identity()),
    ]
    return rules
