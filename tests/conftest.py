"""Shared helpers: tiny random HF checkpoints built with torch, and a padded batch.

Every tiny model has random weights *and* random norm weights / biases (HF initialises norms to
ones and biases to zeros, which would hide a missing or misplaced norm/bias in our conversion).
Weights are scaled so logits are O(1): a tolerance in absolute units then means something.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

HF_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "phi3": Phi3Config,
}
# Families whose config takes an explicit head_dim; we pick one != hidden_size // num_heads (48 // 4 = 12)
# so a conversion that silently assumes hidden_size // num_heads fails.
EXPLICIT_HEAD_DIM = {"llama", "mistral", "qwen3"}

VOCAB = 101
PAD = 0


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop JAX's compiled executables after each test module. The whole suite compiles thousands of
    XLA:CPU programs in one process; late in it jaxlib 0.10 aborted inside a compile (2026-12-07) and,
    in earlier runs, while serializing an executable. Each module's own compiles are unaffected."""
    yield
    import jax

    jax.clear_caches()

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small so the test sequence spans low, medium (smoothed) and high frequency bands.
    "original_max_position_embeddings": 16,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

# name -> (family, make_tiny_hf keyword arguments). Same family + same shapes + same seed gives the
# same weights, so e.g. "llama", "llama_rope_llama3" and "llama_rope_linear" differ only in RoPE.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie": True}),
    "llama_rope_llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama_rope_linear": ("llama", {"rope_parameters": LINEAR_ROPE}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3", {"tie": True}),
    "phi3": ("phi3", {}),
    # Phi-4-mini style partial rotary embedding.
    "phi3_partial_rotary": (
        "phi3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    "phi3_sliding_window": ("phi3", {"sliding_window": 4}),
    # A window shorter than the test sequence, so the sliding-window mask matters.
    "mistral": ("mistral", {"sliding_window": 4}),
    # Biases on q, k, v and o (attention_bias=true).
    "llama_attn_bias": ("llama", {"attention_bias": True}),
}
# Pairs that share weights and differ only in a setting (see test_variants_are_not_trivial).
SAME_WEIGHTS = [
    ("llama", "llama_rope_llama3"),
    ("llama", "llama_rope_linear"),
    ("llama", "mistral"),
    ("phi3", "phi3_sliding_window"),
    ("phi3", "phi3_partial_rotary"),
]


def randomize_torch_params(model: torch.nn.Module) -> None:
    """Every parameter random: norms around 1, biases around 0, matrices ~ 1/sqrt(fan_in)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            elif name.endswith(".bias"):
                torch.nn.init.normal_(p, mean=0.0, std=0.2)
            elif "embed_tokens" in name:
                torch.nn.init.normal_(p, mean=0.0, std=0.5)
            else:
                torch.nn.init.normal_(p, mean=0.0, std=p.shape[-1] ** -0.5)


def make_tiny_hf(family: str, tmp_path: Path, tie: bool = False, seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    """A tiny random HF causal LM saved (safetensors) under `tmp_path`; returns (path, float32 eval model).

    The returned torch model uses eager attention (the plainest reference implementation).
    """
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in EXPLICIT_HEAD_DIM:
        kw["head_dim"] = 16
    kw.update(overrides)
    cfg = HF_CONFIGS[family](**kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_torch_params(model)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    path = Path(tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path, model


def make_variant(name: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    family, kw = VARIANTS[name]
    return make_tiny_hf(family, tmp_path, **kw)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """`tiny_hf(variant)` -> (path, torch model), built once per session; treat the directory as read-only."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in cache:
            cache[name] = make_variant(name, tmp_path_factory.mktemp(f"hf_{name}"))
        return cache[name]

    return get


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private, writable copy of a checkpoint directory (for tests that damage it)."""
    shutil.copytree(src, dst)
    return dst


# A left-padded row and a right-padded row, length 9; token ids avoid PAD inside the valid span.
PADDED_IDS = np.array(
    [
        [PAD, PAD, 5, 17, 33, 2, 99, 45, 8],
        [7, 64, 3, 12, 88, 21, 50, PAD, PAD],
    ],
    np.int32,
)
PADDED_MASK = np.array(
    [
        [0, 0, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
    ],
    np.int32,
)
UNPADDED_IDS = np.array([[5, 17, 33, 2, 99, 45, 8, 60, 1], [7, 64, 3, 12, 88, 21, 50, 100, 0]], np.int32)


@pytest.fixture(scope="session")
def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): row 0 left-padded by 2, row 1 right-padded by 2."""
    return PADDED_IDS.copy(), PADDED_MASK.copy()


@pytest.fixture(scope="session")
def unpadded_batch() -> tuple[np.ndarray, np.ndarray]:
    return UNPADDED_IDS.copy(), np.ones_like(UNPADDED_IDS)


def positions(mask: np.ndarray) -> np.ndarray:
    """Our position convention (cumsum(mask) - 1, clipped at 0), to pass to transformers as position_ids."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, use_positions: bool = True) -> np.ndarray:
    """float32 logits [B, T, V] from a transformers model."""
    kw = {"position_ids": torch.from_numpy(positions(mask)).long()} if use_positions else {}
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), **kw)
    return out.logits.float().numpy()
