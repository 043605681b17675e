"""Every user-facing failure is a LoopusError whose message names the problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, copy_checkpoint
from safetensors.torch import load_file, save_file

import loopus_jax
from loopus_jax import LoopusError
from loopus_jax.sharding import make_mesh, parse_mesh_spec

# The base checkpoint is "llama": hidden 48, 4 heads x head_dim 16, 2 kv heads, 2 layers, untied.
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def ckpt(tiny_hf, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    return copy_checkpoint(tiny_hf("llama")[0], tmp_path / "ckpt")


@pytest.fixture(scope="module")
def model(tiny_hf):
    return loopus_jax.load(tiny_hf("llama")[0])[0]


def edit_config(path: Path, fn) -> None:
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def set_rope(params: dict):
    def fn(cfg):
        cfg["rope_parameters"] = params
        cfg["rope_scaling"] = params

    return fn


# (id, config edit, expected message substrings)
CONFIG_CASES = [
    (
        "unknown_architecture",
        lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
        ["unsupported architecture GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"],
    ),
    (
        "unknown_model_type_without_architectures",
        lambda c: (c.pop("architectures"), c.update(model_type="gpt2")),
        ["unsupported architecture", "gpt2", "LlamaForCausalLM"],
    ),
    (
        "rope_yarn",
        set_rope({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}),
        ["unsupported rope scaling type 'yarn'", "llama3", "linear"],
    ),
    (
        "rope_legacy_type_key_dynamic",
        lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "dynamic", "factor": 2.0})),
        ["unsupported rope scaling type 'dynamic'"],
    ),
    ("rope_linear_without_factor", set_rope({"rope_type": "linear", "rope_theta": 10000.0}), ["'linear' needs a 'factor'"]),
    (
        "rope_llama3_incomplete",
        set_rope({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
        ["'llama3' is missing", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings"],
    ),
    ("hidden_act_gelu", lambda c: c.update(hidden_act="gelu"), ["unsupported hidden_act 'gelu'"]),
    ("mlp_bias", lambda c: c.update(mlp_bias=True), ["mlp_bias"]),
    ("missing_config_key", lambda c: c.pop("num_attention_heads"), ["lacks required key 'num_attention_heads'"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(ckpt, edit, expected):
    edit_config(ckpt, edit)
    with pytest.raises(LoopusError) as e:
        loopus_jax.load(ckpt)
    for s in expected:
        assert s in str(e.value), f"{s!r} not in {str(e.value)!r}"


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(LoopusError, match=r"config\.json is not valid JSON"):
        loopus_jax.load(ckpt)


def _del(name):
    return lambda t: t.pop(name)


def _add(name, shape):
    return lambda t: t.update({name: torch.zeros(shape)})


def _reshape(name, shape):
    return lambda t: t.update({name: torch.zeros(shape)})


# (id, tensor edit, expected message substrings)
TENSOR_CASES = [
    ("missing_tensor", _del("model.layers.1.mlp.up_proj.weight"), ["missing tensor", "model.layers.1.mlp.up_proj.weight"]),
    ("missing_lm_head", _del("lm_head.weight"), ["missing tensor", "lm_head.weight"]),
    ("missing_final_norm", _del("model.norm.weight"), ["missing tensor", "model.norm.weight"]),
    (
        "unexpected_tensor",
        _add("model.layers.0.self_attn.extra_proj.weight", (4, 4)),
        ["unexpected tensor", "model.layers.0.self_attn.extra_proj.weight"],
    ),
    (
        "tensor_of_a_layer_beyond_num_layers",
        _add("model.layers.2.input_layernorm.weight", (48,)),
        ["unexpected tensor", "model.layers.2.input_layernorm.weight"],
    ),
    ("bias_the_family_lacks", _add("model.layers.0.self_attn.q_proj.bias", (64,)), ["unexpected tensor", "q_proj.bias"]),
    ("shape_mismatch_rows", _reshape(Q1, (60, 48)), [Q1, "[60, 48]", "[64, 48]"]),
    ("shape_mismatch_transposed", _reshape(Q1, (48, 64)), [Q1, "[48, 64]", "[64, 48]"]),
    (
        "shape_mismatch_vocab",
        _reshape("model.embed_tokens.weight", (100, 48)),
        ["model.embed_tokens.weight", "[100, 48]", "[101, 48]"],
    ),
    (
        "shape_mismatch_norm",
        _reshape("model.layers.0.post_attention_layernorm.weight", (47,)),
        ["post_attention_layernorm", "[47]"],
    ),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensors(ckpt, edit, expected):
    edit_tensors(ckpt, edit)
    with pytest.raises(LoopusError) as e:
        loopus_jax.load(ckpt)
    for s in expected:
        assert s in str(e.value), f"{s!r} not in {str(e.value)!r}"


def test_many_missing_tensors_are_summarised(ckpt):
    edit_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    with pytest.raises(LoopusError, match=r"missing tensor\(s\) model\.layers\.1\..* and \d+ more"):
        loopus_jax.load(ckpt)


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(f: Path) -> None:
    data = f.read_bytes()
    junk = b"\x00\xffthis is not json at all"
    f.write_bytes(struct.pack("<Q", len(junk)) + junk + data[8:])


def _huge_header_length(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**15) + data[8:])


def _header_not_object(f: Path) -> None:
    raw = b"[1, 2, 3]"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _tiny_file(f: Path) -> None:
    f.write_bytes(b"abc")


def _bad_dtype(f: Path) -> None:
    raw = json.dumps({"model.norm.weight": {"dtype": "Q4", "shape": [48], "data_offsets": [0, 24]}}).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))


# (id, file damage, expected message substrings); all name the file.
FILE_CASES = [
    ("truncated_half", _truncate, ["truncated or corrupt", "ends at byte"]),
    ("garbage_header", _garbage_header, ["truncated or corrupt", "header is not valid JSON"]),
    ("huge_header_length", _huge_header_length, ["truncated or corrupt", "header length"]),
    ("header_not_an_object", _header_not_object, ["truncated or corrupt", "not a JSON object"]),
    ("shorter_than_8_bytes", _tiny_file, ["truncated or corrupt", "3 bytes"]),
    ("unknown_dtype_code", _bad_dtype, ["truncated or corrupt", "model.norm.weight", "malformed header entry"]),
]


@pytest.mark.parametrize("damage, expected", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_corrupt_safetensors(ckpt, damage, expected):
    damage(ckpt / "model.safetensors")
    with pytest.raises(LoopusError) as e:
        loopus_jax.load(ckpt)
    msg = str(e.value)
    assert "model.safetensors" in msg
    for s in expected:
        assert s in msg, f"{s!r} not in {msg!r}"


def test_no_safetensors_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(LoopusError, match=r"no \*\.safetensors files"):
        loopus_jax.load(ckpt)


def test_index_names_missing_shard(ckpt):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoopusError, match=r"names shard model-00002-of-00002\.safetensors, which is missing"):
        loopus_jax.load(ckpt)


def test_index_is_corrupt(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(LoopusError, match=r"model\.safetensors\.index\.json is corrupt"):
        loopus_jax.load(ckpt)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "does_not_exist", "does not exist"),
        (lambda d: (d / "weights.bin").write_bytes(b"x") and d / "weights.bin", "is a file but not a .gguf"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "is not a checkpoint"),
    ],
    ids=["nonexistent", "non_gguf_file", "empty_directory"],
)
def test_bad_path(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(LoopusError) as e:
        loopus_jax.load(path)
    assert expected in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "content",
    [bytes(range(100)), b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 92],
    ids=["garbage", "magic_then_garbage"],
)
def test_truncated_gguf(tmp_path, content):
    f = tmp_path / "x.gguf"
    f.write_bytes(content)
    with pytest.raises(LoopusError) as e:
        loopus_jax.load(f)
    assert "x.gguf" in str(e.value) and "truncated or not a valid GGUF file" in str(e.value)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data=x", "cannot parse mesh spec 'data=x'"),
        ("foo=2", "cannot parse mesh spec 'foo=2'"),
        ("data=-1,fsdp=-1", "more than one -1"),
        ("data=0", "cannot parse mesh spec"),
        ("data=-2", "cannot parse mesh spec"),
        ("data=1,data=1", "cannot parse mesh spec"),
        ("data", "cannot parse mesh spec"),
        ("data=1=2", "cannot parse mesh spec"),
    ],
)
def test_bad_mesh_spec(spec, expected):
    with pytest.raises(LoopusError) as e:
        parse_mesh_spec(spec)
    assert expected in str(e.value)


def test_good_mesh_spec():
    assert parse_mesh_spec("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
    assert parse_mesh_spec(" data = 1 , tensor=1 ") == {"data": 1, "fsdp": 1, "tensor": 1}


def test_mesh_needs_more_devices():
    import jax

    n = len(jax.devices())
    with pytest.raises(LoopusError, match=f"needs {2 * n} devices, {n} available"):
        make_mesh(f"data={2 * n}")


def test_load_with_bad_mesh_spec(tiny_hf):
    with pytest.raises(LoopusError, match="cannot parse mesh spec"):
        loopus_jax.load(tiny_hf("llama")[0], mesh="tensor=two")


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_out_of_range_token_ids(model, bad):
    ids = np.array([[3, 4, bad, 5]], np.int32)
    with pytest.raises(LoopusError) as e:
        loopus_jax.forward(model, ids)
    assert f"input_ids must lie in [0, {VOCAB})" in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize(
    "ids, mask, expected",
    [
        (np.array([[1.0, 2.0]]), None, "input_ids must be an integer array"),
        (np.zeros((1, 2, 3), np.int32), None, "input_ids must be an integer array"),
        (np.array([[1, 2, 3]]), np.ones((1, 4)), "attention_mask shape [1, 4] does not match input_ids [1, 3]"),
    ],
    ids=["float_ids", "3d_ids", "mask_shape"],
)
def test_bad_forward_inputs(model, ids, mask, expected):
    with pytest.raises(LoopusError) as e:
        loopus_jax.forward(model, ids, mask)
    assert expected in str(e.value)


def test_forward_rejects_options_and_non_models(model):
    with pytest.raises(LoopusError, match="looped models only"):
        loopus_jax.forward(model, np.array([[1, 2]]), num_loops=2)
    with pytest.raises(LoopusError, match="expected a model from loopus_jax.load"):
        loopus_jax.forward(object(), np.array([[1, 2]]))


def test_bad_save_arguments(model, tmp_path):
    with pytest.raises(LoopusError, match="unknown format 'gguf'"):
        loopus_jax.save(model, tmp_path / "a", format="gguf")
    with pytest.raises(LoopusError, match="only supported for format='hf'"):
        loopus_jax.save(model, tmp_path / "b", format="loopus", dtype="bfloat16")


def test_transposed_mask_is_rejected(model):
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int32)  # [batch=2, seq=3]
    mask = np.array([[1, 1], [1, 1], [0, 0]], np.int32)  # [seq, batch] by mistake
    with pytest.raises(LoopusError, match="attention_mask shape"):
        loopus_jax.forward(model, ids, mask)
