"""Device mesh and parameter sharding.

Mesh-spec parsing, `make_mesh` and `spec_for` are unit-tested in this process (`spec_for` only reads
`mesh.shape`, so an AbstractMesh stands in for 8 devices). The real thing runs in a subprocess with
8 fake CPU devices (`--xla_force_host_platform_device_count=8`; the device count is fixed when jax
starts, so it cannot be changed inside this pytest process): a tiny HF Llama is loaded onto a
data=2,fsdp=2,tensor=2 mesh, every parameter's PartitionSpec is checked against the RULES table, the
sharded forward pass is compared with the single-device one, and a loopus checkpoint saved from the
sharded model is restored onto the mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from loopus_jax.errors import LoopusError
from loopus_jax.sharding import MESH_AXES, RULES, make_mesh, parse_mesh_spec, spec_for

# ----------------------------------------------------------------------------------------------
# parse_mesh_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data=1,fsdp=-1,tensor=1", {"data": 1, "fsdp": -1, "tensor": 1}),
        ("data=2,fsdp=2,tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("tensor=4", {"data": 1, "fsdp": 1, "tensor": 4}),  # missing axes default to 1
        (" fsdp = 2 , data=-1 ", {"data": -1, "fsdp": 2, "tensor": 1}),  # whitespace tolerated
        ("data=2,", {"data": 2, "fsdp": 1, "tensor": 1}),  # empty parts ignored
        ("", {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_parse_mesh_spec(spec, expected):
    got = parse_mesh_spec(spec)
    assert got == expected
    assert tuple(got) == MESH_AXES  # always all three axes, in mesh order


@pytest.mark.parametrize(
    "spec",
    [
        "data=abc",  # not an integer
        "data",  # no '='
        "data=1=2",  # two '='
        "model=2",  # unknown axis
        "data=2,data=2",  # axis twice
        "data=0",  # zero
        "data=-2",  # negative other than -1
        "data=1.5",
        "data=-1,fsdp=-1",  # two "the rest"
    ],
)
def test_parse_mesh_spec_rejects(spec):
    with pytest.raises(LoopusError) as e:
        parse_mesh_spec(spec)
    assert repr(spec) in str(e.value) and "mesh spec" in str(e.value)


# ----------------------------------------------------------------------------------------------
# make_mesh (with placeholder devices: make_mesh only reshapes the list it is given)


def _fake_devices(n: int) -> list[int]:
    return list(range(n))


@pytest.mark.parametrize(
    "spec, n, shape",
    [
        ("data=1,fsdp=-1,tensor=1", 8, (1, 8, 1)),
        ("data=2,fsdp=-1,tensor=2", 8, (2, 2, 2)),
        ("data=-1,tensor=2", 8, (4, 1, 2)),
        ("tensor=-1", 6, (1, 1, 6)),
        ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
        ("fsdp=-1", 1, (1, 1, 1)),
    ],
)
def test_make_mesh_fills_minus_one(spec, n, shape):
    mesh = make_mesh(spec, devices=_fake_devices(n))
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape
    assert mesh.devices.size == n


@pytest.mark.parametrize(
    "spec, n, needle",
    [
        ("data=16", 8, "needs 16 devices, 8 available"),  # too many devices requested
        ("data=2,fsdp=2,tensor=4", 8, "needs 16 devices, 8 available"),
        ("data=2", 8, "needs 2 devices, 8 available"),  # too few: a spec must use every device
        ("data=3,fsdp=-1", 8, "not divisible by 3"),
        ("data=-1,tensor=16", 8, "not divisible by 16"),
    ],
)
def test_make_mesh_device_count_errors(spec, n, needle):
    with pytest.raises(LoopusError, match=needle):
        make_mesh(spec, devices=_fake_devices(n))


def test_make_mesh_default_devices_too_many():
    """Against this process's real devices: asking for more than exist is a LoopusError."""
    import jax

    n = len(jax.devices())
    with pytest.raises(LoopusError, match=f"needs {4 * n} devices, {n} available"):
        make_mesh(f"data={4 * n}")
    assert make_mesh().shape["fsdp"] == n  # the default spec puts every device on fsdp


# ----------------------------------------------------------------------------------------------
# spec_for

MESH222 = AbstractMesh((2, 2, 2), MESH_AXES)


@pytest.mark.parametrize(
    "logical, shape, expected",
    [
        (("vocab", "embed"), (128, 64), PartitionSpec("tensor", "fsdp")),
        (("vocab", "embed"), (7, 64), PartitionSpec(None, "fsdp")),  # 7 % tensor=2: vocab axis dropped
        (("vocab", "embed"), (128, 9), PartitionSpec("tensor", None)),  # 9 % fsdp=2: embed axis dropped
        (("vocab", "embed"), (3, 5), PartitionSpec(None, None)),
        (("layers", "embed", "heads", "head_dim"), (3, 64, 4, 16), PartitionSpec(None, "fsdp", "tensor", None)),
        (("layers", "embed", "kv_heads", "head_dim"), (3, 64, 1, 16), PartitionSpec(None, "fsdp", None, None)),
        (("layers", "norm"), (3, 64), PartitionSpec(None, None)),
        # one mesh axis shards at most one dimension: `mlp` would reuse `tensor`, already taken by `heads`
        (("heads", "mlp"), (4, 8), PartitionSpec("tensor", None)),
        (("mlp", "heads"), (3, 8), PartitionSpec(None, "tensor")),  # ... but is free when the first was dropped
        # batch shards over data and fsdp together, else over the first single axis that divides it
        (("batch", None), (4, 5), PartitionSpec(("data", "fsdp"), None)),
        (("batch", None), (8, 5), PartitionSpec(("data", "fsdp"), None)),
        (("batch", None), (6, 5), PartitionSpec("data", None)),
        (("batch", None), (2, 5), PartitionSpec("data", None)),
        (("batch", None), (3, 5), PartitionSpec(None, None)),
        ((None, "embed"), (4, 64), PartitionSpec(None, "fsdp")),
    ],
)
def test_spec_for(logical, shape, expected):
    assert spec_for(logical, shape, MESH222) == expected


def test_spec_for_skips_size_one_axes():
    mesh = AbstractMesh((1, 4, 1), MESH_AXES)
    assert spec_for(("vocab", "embed"), (128, 64), mesh) == PartitionSpec(None, "fsdp")
    assert spec_for(("batch", None), (4, 3), mesh) == PartitionSpec("fsdp", None)  # data=1 is not named
    assert spec_for(("batch", None), (6, 3), mesh) == PartitionSpec(None, None)


def test_rules_name_only_mesh_axes():
    for role, axes in RULES.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        assert set(axes) <= set(MESH_AXES), role


# ----------------------------------------------------------------------------------------------
# 8 fake CPU devices in a subprocess

# Tiny dims that every mesh axis of size 2 divides: vocab 128, hidden 64, 4 heads, 2 kv heads, ff 128.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

# The PartitionSpec each parameter must get on data=2,fsdp=2,tensor=2, written out from RULES by hand
# (stacked layer parameters have a leading, unsharded layer axis).
EXPECTED_SPECS = {
    "embed": ("tensor", "fsdp"),  # (vocab, embed)
    "lm_head": ("fsdp", "tensor"),  # (embed, vocab)
    "final_norm": (None,),
    "layers.attn_norm": (None, None),
    "layers.mlp_norm": (None, None),
    "layers.wq": (None, "fsdp", "tensor", None),  # (L, embed, heads, head_dim)
    "layers.wk": (None, "fsdp", "tensor", None),  # (L, embed, kv_heads, head_dim)
    "layers.wv": (None, "fsdp", "tensor", None),
    "layers.wo": (None, "tensor", None, "fsdp"),  # (L, heads, head_dim, embed)
    "layers.w_gate": (None, "fsdp", "tensor"),  # (L, embed, mlp)
    "layers.w_up": (None, "fsdp", "tensor"),
    "layers.w_down": (None, "tensor", "fsdp"),  # (L, mlp, embed)
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    import loopus_jax as lj
    from loopus_jax.sharding import make_mesh

    hf_dir, out_dir, result_file = sys.argv[1:4]
    res = {"n_devices": len(jax.devices()), "platform": jax.devices()[0].platform}

    def flat(model):
        return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def describe(model):
        out = {}
        for name, arr in flat(model).items():
            sh = arr.sharding
            out[name] = {
                "named": isinstance(sh, NamedSharding),
                "spec": [list(s) if isinstance(s, tuple) else s for s in sh.spec] if isinstance(sh, NamedSharding) else None,
                "mesh": dict(sh.mesh.shape) if isinstance(sh, NamedSharding) else None,
                "shape": list(arr.shape),
                "shard_shape": list(arr.addressable_shards[0].data.shape),
                "n_devices": len(sh.device_set),
            }
        return out

    ref, _ = lj.load(hf_dir)
    model, _ = lj.load(hf_dir, mesh="data=2,fsdp=2,tensor=2")
    res["params"] = describe(model)
    res["ref_on_one_device"] = all(len(a.sharding.device_set) == 1 for a in flat(ref).values())
    res["same_values"] = all(np.array_equal(np.asarray(a), np.asarray(flat(ref)[k])) for k, a in flat(model).items())

    rng = np.random.default_rng(0)
    res["forward"] = {}
    for b in (4, 8, 3):  # 4 and 8 shard over data*fsdp; 3 does not divide and stays replicated
        ids = rng.integers(0, 128, size=(b, 11))
        mask = np.ones_like(ids)
        mask[0, :4] = 0  # one left-padded row
        out = lj.forward(model, ids, mask)
        want = np.asarray(lj.forward(ref, ids, mask).logits)
        got = np.asarray(out.logits)
        res["forward"][str(b)] = {
            "max_abs_diff": float(np.abs(got - want).max()),
            "max_abs": float(np.abs(want).max()),
            "shape": list(got.shape),
            "n_devices": len(out.logits.sharding.device_set),
        }

    # perplexity (the scoring jit, batches padded with copies) on the mesh vs on one device
    from loopus_jax.eval.perplexity import perplexity_of_ids

    ids = rng.integers(0, 128, size=101).tolist()
    res["ppl"] = {
        str(bs): [perplexity_of_ids(m, ids, max_length=16, batch_size=bs).nll for m in (model, ref)] for bs in (3, 4)
    }

    lj.save(model, out_dir)
    restored, _ = lj.load(out_dir, mesh="data=2,fsdp=2,tensor=2")
    res["restored_params"] = describe(restored)
    a, b = flat(model), flat(restored)
    res["restored_keys_equal"] = sorted(a) == sorted(b)
    res["restored_identical"] = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) and a[k].dtype == b[k].dtype for k in a)
    ids = rng.integers(0, 128, size=(4, 7))
    res["restored_forward_max_abs_diff"] = float(
        np.abs(np.asarray(lj.forward(restored, ids).logits) - np.asarray(lj.forward(ref, ids).logits)).max()
    )
    # The default spec on the real device list: -1 takes all 8 devices.
    res["default_mesh"] = dict(make_mesh().shape)
    res["minus_one_mesh"] = dict(make_mesh("data=2,fsdp=-1").shape)
    try:
        make_mesh("data=16")
        res["too_many"] = None
    except lj.LoopusError as e:
        res["too_many"] = str(e)
    with open(result_file, "w") as f:
        json.dump(res, f)
    """
)


def _make_tiny_hf(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    with torch.no_grad():  # random norms too, and O(1) logits, so a misplaced shard would show
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            else:
                torch.nn.init.normal_(p, std=0.5 if "embed" in name else p.shape[-1] ** -0.5)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sharding")
    _make_tiny_hf(tmp / "hf")
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp / "hf"), str(tmp / "native"), str(tmp / "result.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((tmp / "result.json").read_text())


def test_eight_fake_devices(sharded):
    assert sharded["n_devices"] == 8 and sharded["platform"] == "cpu"


def test_params_sharded_as_rules_say(sharded):
    params = sharded["params"]
    assert sorted(params) == sorted(EXPECTED_SPECS)
    for name, want in EXPECTED_SPECS.items():
        p = params[name]
        assert p["named"], name
        assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}, name
        assert tuple(p["spec"]) == want, name
        # each device really holds only its piece
        expect_shard = [d // 2 if ax is not None else d for d, ax in zip(p["shape"], want)]
        assert p["shard_shape"] == expect_shard, name
        assert p["n_devices"] == 8, name
    # something is actually split (not everything replicated)
    assert params["layers.wq"]["shard_shape"] != params["layers.wq"]["shape"]
    assert params["embed"]["shard_shape"] == [64, 32]


def test_sharded_load_has_same_values(sharded):
    assert sharded["ref_on_one_device"]
    assert sharded["same_values"]


@pytest.mark.parametrize("batch", ["4", "8", "3"])
def test_sharded_forward_matches_one_device(sharded, batch):
    f = sharded["forward"][batch]
    assert f["shape"] == [int(batch), 11, 128]
    assert f["max_abs"] > 0.5  # logits are O(1), so 1e-5 is a meaningful tolerance
    assert f["max_abs_diff"] <= 1e-5
    assert f["n_devices"] == 8


@pytest.mark.parametrize("batch_size", ["3", "4"])
def test_sharded_perplexity_matches_one_device(sharded, batch_size):
    on_mesh, one_device = sharded["ppl"][batch_size]
    assert on_mesh == pytest.approx(one_device, rel=1e-6)


def test_save_and_restore_onto_mesh(sharded):
    assert sharded["restored_keys_equal"]
    assert sharded["restored_identical"]
    for name, want in EXPECTED_SPECS.items():
        got = sharded["restored_params"][name]
        assert got["named"] and tuple(got["spec"]) == want, name
        assert got["shard_shape"] == sharded["params"][name]["shard_shape"], name
    assert sharded["restored_forward_max_abs_diff"] <= 1e-5


def test_make_mesh_on_real_devices(sharded):
    assert sharded["default_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharded["minus_one_mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharded["too_many"] is not None and "needs 16 devices, 8 available" in sharded["too_many"]
