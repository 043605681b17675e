"""Dtype policy: float32 or bfloat16 parameters, a separate compute dtype, float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopus_jax as lj
from loopus_jax.config import ModelConfig
from loopus_jax.loop.model import loop_model
from loopus_jax.models.transformer import Transformer

CFG = ModelConfig("llama", 97, 64, 96, 3, 4, 2, 16, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lj.save(model, path, format="hf")
    return path


IDS = np.random.RandomState(0).randint(0, 97, (2, 12))


@pytest.mark.parametrize("dtype,compute", [("bfloat16", None), ("float32", "bfloat16"), ("bfloat16", "float32")])
def test_reduced_precision_is_close_to_float32_and_logits_stay_float32(saved, dtype, compute):
    ref, _ = lj.load(saved)
    m, _ = lj.load(saved, dtype=dtype, compute_dtype=compute)
    assert m.embed[...].dtype == jnp.dtype(dtype)
    assert m.compute_dtype == (compute or dtype)
    want = np.asarray(lj.forward(ref, IDS).logits)
    out = lj.forward(m, IDS).logits
    assert out.dtype == jnp.float32
    got = np.asarray(out)
    diff = np.abs(got - want).max()
    # bfloat16 has 8 mantissa bits (relative step 2^-8 = 0.004): through 3 layers the logits move by
    # a few 1e-3 of their scale, and they must move at all (the reduced precision is really used).
    assert 0 < diff < 0.03 * np.abs(want).max(), diff


def test_bf16_compute_runs_the_layers_in_bf16(saved):
    m, _ = lj.load(saved, compute_dtype="bfloat16")
    graphdef, state = nnx.split(m)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.asarray(IDS)))(state))
    assert "bf16[2,12,64]" in jaxpr  # the residual stream
    assert "f32[2,12,97]" in jaxpr  # the logits


def test_looped_gate_and_q_head_stay_float32_under_bf16(saved):
    base, _ = lj.load(saved, dtype="bfloat16")
    m = loop_model(base, "0", "2-", n_recursion=2)
    assert m.gate.A_log[...].dtype == jnp.float32 and m.q_head.w_q[...].dtype == jnp.float32
    assert m.reasoning.wq[...].dtype == jnp.bfloat16
    out = lj.forward(m, IDS)
    assert out.logits.dtype == jnp.float32 and out.q.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
