"""GGUF files (llama.cpp) as a tensor source with HF names, so they share the HF name table.

Quantized tensors are dequantized by the `gguf` package on access, one tensor at a time and in
blocks of rows (so the package's temporaries stay small); llama.cpp's row permutation of the Llama
q/k projections is undone. The reader's parsed metadata (a Python object per vocabulary entry, ~90 MB
for a 49k vocabulary) is dropped once the config is read: the tokenizer is built from the file itself.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from loopus_jax.errors import LoopusError

# Rows dequantized at once: bounds the gguf package's float32 temporaries to a few MB.
DEQUANT_ROWS = 2048

# GGUF architecture -> HF architecture name and whether llama.cpp permuted q/k rows.
_ARCHS = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
    return None


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """HF `llama3` rope parameters from llama.cpp's `rope_freqs.weight` (one divisor per frequency).

    llama.cpp stores divisors f = 1 / ((1 - s) / factor + s), with s = (orig / wavelen - low) /
    (high - low) between the two wavelength bounds, 1 above high frequencies and `factor` below low
    ones. factor = max(f); with low_freq_factor = 1 (every Llama 3.x release) two transitional
    entries fix high_freq_factor and original_max_position_embeddings. The result is checked by
    recomputing every divisor; a file that no llama3 parameters reproduce is an error.
    """
    from loopus_jax import config as C

    f = np.asarray(factors, np.float64)
    if np.allclose(f, 1.0):
        return {}
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(f.max())
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    params = None
    if mid.sum() >= 2:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, c = np.polyfit(inv[mid] / (2 * math.pi), smooth, 1)  # s = orig / (high - low) / wavelen - low / (high - low)
        if c < 0:
            high = 1 - 1 / c
            orig = round(a * (high - 1))
            params = {
                "factor": round(factor, 4),
                "low_freq_factor": 1.0,
                "high_freq_factor": round(float(high), 3),
                "original_max_position_embeddings": int(orig),
            }
    if params is not None:
        items = tuple(sorted(params.items()))
        cfg = C.ModelConfig("llama", 1, head_dim, 1, 1, 1, 1, head_dim, rope_theta=theta, rope_type="llama3", rope_params=items)
        implied = inv / np.asarray(C.rope_inv_freq(cfg), np.float64)
        if np.allclose(implied, f, rtol=1e-4):
            return params
    raise LoopusError(
        "GGUF rope_freqs.weight matches no llama3 rope scaling (low_freq_factor 1); this file's RoPE frequencies are not "
        "supported: convert the original HF checkpoint instead"
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for q/k rows (interleaved -> HF half-split RoPE layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF file's config (as an HF config dict) and tensors (HF names, float32 on access)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct.error/IndexError on damage
            raise LoopusError(f"{self.path} is truncated or not a valid GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
        arch = self._field("general.architecture")
        if arch not in _ARCHS:
            raise LoopusError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}")
        self.arch = arch
        self.hf_config = self._config()
        self._tensors = {}
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":  # llama3 RoPE scaling, stored as divisors: back into the config
                self.hf_config["rope_scaling"] = self._rope_from_freqs(t)
                continue
            name = _hf_name(t.name)
            if name is None:
                raise LoopusError(f"{self.path}: unexpected GGUF tensor {t.name!r} for architecture {arch}")
            self._tensors[name] = t
        self.reader.fields = {}  # everything needed is in hf_config now
        self.release()

    def _field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _config(self) -> dict:
        a = self.arch
        req = {
            k: self._field(f"{a}.{k}") for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
        }
        missing = [k for k, v in req.items() if v is None]
        if missing:
            raise LoopusError(f"{self.path}: GGUF metadata lacks {', '.join(f'{a}.{k}' for k in missing)}")
        heads = int(req["attention.head_count"])
        hidden = int(req["embedding_length"])
        names = [t.name for t in self.reader.tensors]
        vocab = self._field(f"{a}.vocab_size") or len(self._field("tokenizer.ggml.tokens") or [])
        head_dim = self._field(f"{a}.attention.key_length") or hidden // heads
        cfg = {
            "architectures": [_ARCHS[a][0]],
            "model_type": a,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(req["feed_forward_length"]),
            "num_hidden_layers": int(req["block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv") or heads),
            "head_dim": int(head_dim),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._field(f"{a}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        scaling = self._field(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise LoopusError(f"{self.path}: unsupported GGUF rope scaling {scaling!r}")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(self._field(f"{a}.rope.scaling.factor"))}
        return cfg

    def _rope_from_freqs(self, t) -> dict | None:
        if "rope_scaling" in self.hf_config:
            raise LoopusError(f"{self.path}: both rope_freqs.weight and rope scaling metadata; expected one")
        cfg = self.hf_config
        rotary = int(self._field(f"{self.arch}.rope.dimension_count") or cfg["head_dim"])
        factors = np.asarray(t.data, np.float32).reshape(-1)
        if factors.size != rotary // 2:
            raise LoopusError(f"{self.path}: rope_freqs.weight has {factors.size} entries, expected {rotary // 2}")
        params = llama3_rope_from_factors(factors, cfg["rope_theta"], rotary)
        return {"rope_type": "llama3", **params} if params else None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)

    def release(self) -> None:
        """Drop the GGUF's mapped pages from the resident set (the reader keeps a np.memmap)."""
        mm = getattr(getattr(self.reader, "data", None), "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        w = np.empty(self.shape(name), np.float32)
        data = t.data if t.data.ndim > 1 else t.data[None]
        rows = w.reshape(data.shape[0], -1)
        try:
            for i in range(0, data.shape[0], DEQUANT_ROWS):
                block = gguf.quants.dequantize(data[i : i + DEQUANT_ROWS], t.tensor_type)
                rows[i : i + DEQUANT_ROWS] = block.reshape(rows[i : i + DEQUANT_ROWS].shape)
        except NotImplementedError:
            raise LoopusError(f"{self.path}: tensor {t.name} has unsupported quantization {t.tensor_type.name}") from None
        if _ARCHS[self.arch][1] and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.hf_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        return w
