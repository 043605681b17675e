"""Model configuration: one dataclass for every supported family, parsed from HF `config.json`.

HF configs changed their RoPE keys between transformers 4 (`rope_theta` + `rope_scaling`) and 5
(`rope_parameters`); we read both and write both so exported checkpoints load everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from loopus_jax.errors import LoopusError

# HF architecture name -> family tag used by the name tables.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer; hashable so it can be a static jit arg."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Frozen tuple of (key, value) pairs for the scaling type's parameters (hashable).
    rope_params: tuple = ()
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def architecture(self) -> str:
        return {v: k for k, v in ARCHITECTURES.items()}[self.family]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_params"] = dict(self.rope_params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_params"] = tuple(sorted((d.get("rope_params") or {}).items()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise LoopusError(f"unknown model config keys {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**d)


def _family(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = hf.get("model_type")
    if not archs and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    name = archs[0] if archs else f"model_type={mt!r}"
    raise LoopusError(f"unsupported architecture {name}; supported: {', '.join(ARCHITECTURES)}")


def _rope(hf: dict) -> tuple[float, str, dict, float]:
    """Return (theta, type, params, partial_rotary_factor) from either RoPE key style."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    rtype = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rtype not in ROPE_TYPES:
        raise LoopusError(f"unsupported rope scaling type {rtype!r}; supported: {', '.join(ROPE_TYPES)}")
    if rtype == "linear" and "factor" not in params:
        raise LoopusError("rope scaling 'linear' needs a 'factor'")
    if rtype == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(params)
        if missing:
            raise LoopusError(f"rope scaling 'llama3' is missing {sorted(missing)}")
    if rtype == "default":
        params = {}
    return float(theta), rtype, params, float(partial)


def _sliding_window(hf: dict, family: str, num_layers: int) -> int | None:
    """One window for all layers, or None; per-layer mixes (HF `layer_types`) are a clear error.

    Qwen2/Qwen3 window only the layers >= `max_window_layers` and only with `use_sliding_window`;
    Mistral and Phi-3 window every layer when `sliding_window` is set.
    """
    window = hf.get("sliding_window")
    if not window:
        return None
    types = hf.get("layer_types")
    if types is None:
        if family in ("qwen2", "qwen3"):
            if not hf.get("use_sliding_window", False):
                return None
            first = int(hf.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention"] * num_layers
    kinds = set(types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    raise LoopusError(
        f"unsupported per-layer attention: layers {sliding} use a sliding window of {window} and the others full "
        "attention; only one kind for all layers is supported"
    )


def from_hf(hf: dict) -> ModelConfig:
    """Parse an HF `config.json` dict; every unsupported feature is a LoopusError naming it."""
    family = _family(hf)
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        vocab = int(hf["vocab_size"])
        inter = int(hf["intermediate_size"])
    except KeyError as e:
        raise LoopusError(f"config.json lacks required key {e.args[0]!r}") from None
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LoopusError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise LoopusError("unsupported mlp_bias=true; only bias-free MLPs are supported")
    theta, rtype, rparams, partial = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = family == "qwen2" or attention_bias
    o_bias = attention_bias and family in ("llama", "mistral", "qwen3")
    sliding = _sliding_window(hf, family, layers)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if head_dim * partial % 2:
        raise LoopusError(f"rotary dimension {head_dim * partial} must be even")
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rtype,
        rope_params=tuple(sorted(rparams.items())),
        partial_rotary_factor=partial,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=family == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF `config.json` dict that transformers 4.x and 5.x both load (both RoPE key styles)."""
    model_type = cfg.family
    rope_scaling = (
        None if cfg.rope_type == "default" else {"rope_type": cfg.rope_type, "type": cfg.rope_type, **dict(cfg.rope_params)}
    )
    rope_parameters = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_params)}
    if cfg.partial_rotary_factor != 1.0:
        rope_parameters["partial_rotary_factor"] = cfg.partial_rotary_factor
    d: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.family in ("llama", "mistral", "qwen3"):
        d["attention_bias"] = cfg.o_bias
    if cfg.family == "llama":
        d["mlp_bias"] = False
    if cfg.family in ("mistral", "phi3"):
        d["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        d["sliding_window"] = cfg.sliding_window
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["max_window_layers"] = 0 if cfg.sliding_window is not None else cfg.num_layers
        d["layer_types"] = ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    if cfg.family == "phi3":
        d["original_max_position_embeddings"] = cfg.max_position_embeddings
    return d


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse frequencies for the configured RoPE type, in float64 then rounded like HF's float32."""
    import numpy as np

    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    p = dict(cfg.rope_params)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(p["factor"])
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        low_wl, high_wl = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv
