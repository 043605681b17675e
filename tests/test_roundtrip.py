"""Round trips: HF -> ours -> HF (bit-exact, loadable by transformers), HF -> loopus -> ours, bf16, shards."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import PADDED_IDS, PADDED_MASK, VARIANTS, make_variant, torch_logits
from flax import nnx
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import loopus_jax
from loopus_jax.convert.hf import save_hf

# The re-exported checkpoint holds the very same bytes, and transformers runs the very same code on
# them, so logits are identical in practice; 1e-5 (as specified) only absorbs any run-to-run
# nondeterminism of threaded CPU kernels. A wrong tensor or config key gives errors >> 1e-2.
HF_RELOAD_ATOL = 1e-5


def read_tensors(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) over every *.safetensors file of a directory, read with safetensors."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                assert name not in out, f"{name} appears in two shards"
                t = st.get_tensor(name).contiguous()
                out[name] = (t.dtype, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return out


def assert_same_tensors(original: Path, exported: Path) -> None:
    a, b = read_tensors(original), read_tensors(exported)
    assert set(a) == set(b), f"only in original: {sorted(set(a) - set(b))}; only in export: {sorted(set(b) - set(a))}"
    for name in a:
        assert a[name][0] == b[name][0], f"{name}: dtype {a[name][0]} -> {b[name][0]}"
        assert a[name][1] == b[name][1], f"{name}: shape {a[name][1]} -> {b[name][1]}"
        assert a[name][2] == b[name][2], f"{name}: bytes differ"


def params_of(model) -> dict:
    return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
    pa, pb = params_of(a), params_of(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


def our_logits(model) -> np.ndarray:
    return np.asarray(loopus_jax.forward(model, PADDED_IDS, PADDED_MASK).logits)


def hf_from_pretrained(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()


def assert_hf_logits_close(reloaded: torch.nn.Module, original: torch.nn.Module) -> None:
    valid = PADDED_MASK.astype(bool)
    err = np.abs(torch_logits(reloaded, PADDED_IDS, PADDED_MASK) - torch_logits(original, PADDED_IDS, PADDED_MASK))[valid].max()
    assert err <= HF_RELOAD_ATOL, f"max abs diff {err}"


def rope_dict(cfg) -> dict:
    """RoPE settings of a transformers config, without the redundant legacy 'type' key."""
    return {k: v for k, v in cfg.rope_parameters.items() if k != "type"}


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory):
    """`exported(variant)` -> (original dir, torch model, our model, exported HF dir); once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            path, tm = tiny_hf(name)
            model, _ = loopus_jax.load(path)
            out = loopus_jax.save(model, tmp_path_factory.mktemp(f"export_{name}"), format="hf")
            cache[name] = (path, tm, model, Path(out))
        return cache[name]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_export_bit_exact(exported, variant):
    path, _, _, out = exported(variant)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert_same_tensors(path, out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_export_loads_in_transformers(exported, variant):
    _, tm, model, out = exported(variant)
    reloaded = hf_from_pretrained(out)
    assert type(reloaded) is type(tm)
    a, b = tm.config, reloaded.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.num_key_value_heads, a.tie_word_embeddings, a.rms_norm_eps) == (
        b.num_key_value_heads,
        b.tie_word_embeddings,
        b.rms_norm_eps,
    )
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert head_dim(a) == head_dim(b) == model.config.head_dim
    assert getattr(a, "sliding_window", None) == getattr(b, "sliding_window", None)
    assert rope_dict(a) == rope_dict(b)
    assert_hf_logits_close(reloaded, tm)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_export_reloads_in_loopus(exported, variant):
    _, _, model, out = exported(variant)
    again, _ = loopus_jax.load(out)
    assert again.config == model.config
    assert_same_params(model, again)
    np.testing.assert_array_equal(our_logits(again), our_logits(model))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loopus_native_roundtrip(exported, variant, tmp_path):
    _, _, model, _ = exported(variant)
    out = loopus_jax.save(model, tmp_path / "native", format="loopus")
    again, tok = loopus_jax.load(out)
    assert tok is None
    assert again.config == model.config
    assert_same_params(model, again)
    np.testing.assert_array_equal(our_logits(again), our_logits(model))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """`bf16_checkpoint(variant)` -> dir of that variant saved by transformers in bfloat16."""
    cache = {}

    def get(name):
        if name not in cache:
            _, tm = make_variant(name, tmp_path_factory.mktemp(f"f32_{name}"))
            path = tmp_path_factory.mktemp(f"bf16_{name}")
            tm.to(torch.bfloat16).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


BF16_VARIANTS = ["llama_tied", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_bf16_hf_roundtrip(bf16_checkpoint, variant, tmp_path):
    path = bf16_checkpoint(variant)
    assert {t[0] for t in read_tensors(path).values()} == {torch.bfloat16}
    model, _ = loopus_jax.load(path)
    assert all(str(v.dtype) == "bfloat16" for v in params_of(model).values())
    logits = our_logits(model)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()

    out = loopus_jax.save(model, tmp_path / "hf", format="hf")
    assert_same_tensors(path, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert reloaded.dtype == torch.bfloat16

    # bf16 -> float32 (load) -> bf16 (save) is exact.
    model32, _ = loopus_jax.load(path, dtype=np.float32)
    assert all(str(v.dtype) == "float32" for v in params_of(model32).values())
    out2 = loopus_jax.save(model32, tmp_path / "hf_cast", format="hf", dtype="bfloat16")
    assert_same_tensors(path, out2)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_bf16_loopus_roundtrip(bf16_checkpoint, variant, tmp_path):
    model, _ = loopus_jax.load(bf16_checkpoint(variant))
    again, _ = loopus_jax.load(loopus_jax.save(model, tmp_path / "native"))
    assert_same_params(model, again)  # includes dtype == bfloat16
    np.testing.assert_array_equal(our_logits(again), our_logits(model))


@pytest.mark.parametrize("variant", ["llama", "llama_tied", "phi3"])
def test_sharded_export(exported, variant, tmp_path):
    path, tm, model, _ = exported(variant)
    out = tmp_path / "sharded"
    # ~200 KB of float32 parameters, the biggest tensor ~19 KB: 40 KB shards give several files.
    save_hf(model, out, max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3, shards
    assert not (out / "model.safetensors").exists()
    assert all(f.stat().st_size <= 40_000 + 4096 for f in shards)  # data limit + header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    assert_same_tensors(path, out)

    again, _ = loopus_jax.load(out)
    assert_same_params(model, again)
    np.testing.assert_array_equal(our_logits(again), our_logits(model))
    assert_hf_logits_close(hf_from_pretrained(out), tm)


def test_reexport_replaces_old_files(exported, tmp_path):
    """Exporting into a directory that holds a previous export leaves no stale shards or index."""
    path, _, model, _ = exported("llama")
    out = tmp_path / "out"
    save_hf(model, out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    save_hf(model, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert_same_tensors(path, out)
    save_hf(model, out, max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists()
    assert_same_tensors(path, out)
    again, _ = loopus_jax.load(out)
    assert_same_params(model, again)


def test_jax_arrays_are_on_device(exported):
    """Loaded parameters are committed jax arrays (not numpy views of the memory map)."""
    _, _, model, _ = exported("llama")
    assert all(isinstance(v, jax.Array) for v in params_of(model).values())
