"""Logit parity with transformers for every supported family, scan vs unrolled, padding invariance."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import SAME_WEIGHTS, VARIANTS, make_tiny_hf, torch_logits

import loopus_jax
from loopus_jax import LoopusError

# Our float32 logits vs transformers' float32 (eager attention) logits. Both compute the same math in
# float32 but in a different order (einsum vs matmul+view, fused vs separate softmax), so they differ
# by a few float32 ulps per op; with logits of magnitude ~1-20 we observe <= ~1e-5. 1e-4 leaves a
# margin while any real conversion bug (a wrong transpose, norm, bias, RoPE layout) is >> 1e-2.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    """`loaded(variant)` -> (our model, torch model), each loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            path, tm = tiny_hf(name)
            model, tok = loopus_jax.load(path)
            assert tok is None  # tiny checkpoints carry no tokenizer
            cache[name] = (model, tm)
        return cache[name]

    return get


def _logits(model, ids, mask, **kw) -> np.ndarray:
    return np.asarray(loopus_jax.forward(model, ids, mask, **kw).logits)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_parsed(loaded, variant):
    """The parsed config reflects the HF config (catches a test that silently runs a default config)."""
    model, tm = loaded(variant)
    cfg, hf = model.config, tm.config
    assert cfg.family == VARIANTS[variant][0]
    assert cfg.vocab_size == hf.vocab_size and cfg.num_layers == hf.num_hidden_layers
    assert (cfg.num_heads, cfg.num_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.rope_type == hf.rope_parameters.get("rope_type", "default")
    assert cfg.partial_rotary_factor == hf.rope_parameters.get("partial_rotary_factor", 1.0)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    scaling = {k: v for k, v in hf.rope_parameters.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
    assert dict(cfg.rope_params) == scaling
    assert cfg.sliding_window == (hf.sliding_window if cfg.family in ("mistral", "phi3") else None)
    attention_bias = getattr(hf, "attention_bias", False)
    assert cfg.qkv_bias == (cfg.family == "qwen2" or attention_bias)
    assert cfg.o_bias == attention_bias
    assert cfg.qk_norm == (cfg.family == "qwen3")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_padded(loaded, variant, padded_batch):
    model, tm = loaded(variant)
    ids, mask = padded_batch
    valid = mask.astype(bool)
    ours = _logits(model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (*ids.shape, model.config.vocab_size)
    assert np.isfinite(ours).all()  # padding positions too: masked rows must not produce NaN
    # With our positions passed explicitly, and with transformers' default arange positions: RoPE is
    # relative, so on valid positions both agree (the left-padded row is shifted by 2 in the latter).
    for use_positions in (True, False):
        ref = torch_logits(tm, ids, mask, use_positions=use_positions)
        err = np.abs(ours - ref)[valid].max()
        assert err <= PARITY_ATOL, f"{variant} (position_ids={use_positions}): max abs diff {err}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_unpadded(loaded, variant, unpadded_batch):
    model, tm = loaded(variant)
    ids, mask = unpadded_batch
    ref = torch_logits(tm, ids, mask, use_positions=False)
    np.testing.assert_allclose(_logits(model, ids, mask), ref, rtol=0, atol=PARITY_ATOL)
    # A missing mask means "all valid".
    np.testing.assert_array_equal(_logits(model, ids, None), _logits(model, ids, mask))


# Scanned vs unrolled layers under jit run the same per-layer ops on the same values, but XLA may
# compile a scan body and inlined layers with different fusions (e.g. where the o_proj bias add lands
# relative to the matmul), which moves float32 rounding by a few ulps. On XLA:CPU (jax 0.10.2) every
# variant without an o_proj bias is bitwise identical (checked), so we assert exact equality there;
# "llama_attn_bias" differs by ~1.4e-6 on logits of magnitude ~4 (~3 ulps), and other backends may
# fuse differently, so there we allow 1e-6 times the logit scale (a handful of ulps, far below any
# real bug).
SCAN_REL_TOL = 1e-6


def _scan_exact(model) -> bool:
    # XLA compiles the scan body and the unrolled layers separately; with an o_proj bias, or q/k
    # RMSNorm feeding attention's head-major transposes, it fuses them differently and results
    # differ by a few float32 ulps (seen: 6e-7 on logits of ~3). Those get the 1e-6-of-scale bound.
    cfg = model.config
    return jax.default_backend() == "cpu" and not cfg.o_bias and not cfg.qk_norm


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scan_vs_unrolled(loaded, variant, padded_batch):
    model, _ = loaded(variant)
    ids, mask = padded_batch
    scanned = _logits(model, ids, mask, scan_layers=True)
    unrolled = _logits(model, ids, mask, scan_layers=False)
    if _scan_exact(model):
        np.testing.assert_array_equal(scanned, unrolled)
    else:
        err, scale = np.abs(scanned - unrolled).max(), max(1.0, np.abs(scanned).max())
        assert err <= SCAN_REL_TOL * scale, f"max abs diff {err} at logit scale {scale}"
    # scan_layers=None follows the model's own setting (load(scan_layers=True) by default).
    np.testing.assert_array_equal(_logits(model, ids, mask), scanned)


@pytest.mark.parametrize("variant", ["qwen2"])
def test_load_scan_layers_false(tiny_hf, loaded, variant, padded_batch):
    """load(scan_layers=False) builds a model whose default forward is unrolled, with the same logits."""
    path, _ = tiny_hf(variant)
    unrolled_model, _ = loopus_jax.load(path, scan_layers=False)
    model, _ = loaded(variant)
    ids, mask = padded_batch
    assert unrolled_model.scan_layers is False
    # The same compiled computation as forward(scan_layers=False) on the scanned-by-default model.
    np.testing.assert_array_equal(_logits(unrolled_model, ids, mask), _logits(model, ids, mask, scan_layers=False))
    np.testing.assert_array_equal(_logits(unrolled_model, ids, mask, scan_layers=True), _logits(model, ids, mask))


# A left-padded row vs the same tokens alone: positions match exactly (cumsum) and masked keys add
# exact zeros to the softmax sums, so XLA CPU gives bitwise equal logits (observed 0.0). The padded
# run is still a different-shaped computation (other reduction tiling on GPU/TPU), so allow float32
# rounding noise; a position or mask bug shows up as >> 1e-3.
PAD_ATOL = 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padding_invariance(loaded, variant, padded_batch):
    model, _ = loaded(variant)
    ids, mask = padded_batch
    padded = _logits(model, ids, mask)
    for row in range(ids.shape[0]):
        valid = mask[row].astype(bool)
        alone = _logits(model, ids[row][valid][None], None)[0]
        err = np.abs(padded[row][valid] - alone).max()
        assert err <= PAD_ATOL, f"{variant} row {row}: max abs diff {err}"


@pytest.mark.parametrize("base, other", SAME_WEIGHTS, ids=[f"{a}-{b}" for a, b in SAME_WEIGHTS])
def test_variants_are_not_trivial(tiny_hf, padded_batch, base, other):
    """Sanity of the test setup: a variant's setting (RoPE scaling, sliding window, partial rotary)
    changes transformers' logits, so the parity tests above really cover it."""
    ids, mask = padded_batch
    valid = mask.astype(bool)
    (_, base_model), (_, other_model) = tiny_hf(base), tiny_hf(other)
    a, b = base_model.state_dict(), other_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "variants should share weights"
    diff = np.abs(torch_logits(other_model, ids, mask) - torch_logits(base_model, ids, mask))[valid].max()
    assert diff > 1e-2, f"{other} gives the same logits as {base} (max diff {diff})"


def test_fully_padded_row(loaded, unpadded_batch):
    """A row with no valid token gives finite logits and leaves the other rows unchanged."""
    model, _ = loaded("llama")
    ids, mask = unpadded_batch  # same [2, 9] shape as the other tests: no new compilation
    ids, mask = ids.copy(), mask.copy()
    ids[1], mask[1] = 0, 0
    out = _logits(model, ids, mask)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], _logits(model, *unpadded_batch)[0], rtol=0, atol=PAD_ATOL)


def test_qwen2_mixed_sliding_layers_are_a_clear_error(tmp_path):
    # max_window_layers=1: layer 0 full attention, layer 1 sliding (window 4) in transformers.
    path, tm = make_tiny_hf("qwen2", tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert tm.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(LoopusError, match=r"layers \[1\] use a sliding window of 4"):
        loopus_jax.load(path)


@pytest.mark.parametrize("max_window_layers,windowed", [(0, True), (2, False)])
def test_qwen2_uniform_sliding_layers_match_transformers(tmp_path, padded_batch, max_window_layers, windowed):
    """All layers windowed (max_window_layers=0) or none (>= num_layers): parity with transformers."""
    path, tm = make_tiny_hf("qwen2", tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=max_window_layers)
    ids, mask = padded_batch
    model, _ = loopus_jax.load(path)
    assert (model.config.sliding_window == 4) == windowed
    err = np.abs(_logits(model, ids, mask) - torch_logits(tm, ids, mask))[mask.astype(bool)].max()
    assert err <= PARITY_ATOL, f"max abs diff {err}"
    loopus_jax.save(model, tmp_path / "out", format="hf")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert back.config.layer_types == tm.config.layer_types
