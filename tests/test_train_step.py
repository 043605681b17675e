"""The jitted train step: update accounting, frozen parts, per-batch updates, memory flat in N."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from loopus_jax import LoopusError
from loopus_jax.config import ModelConfig
from loopus_jax.loop.model import loop_model
from loopus_jax.models.layers import last_valid_index
from loopus_jax.models.transformer import Transformer
from loopus_jax.train.losses import deep_supervision_losses, supervised_step, unsupervised_step
from loopus_jax.train.step import StepConfig, adamw, init_state, split_model, train_step

CFG = ModelConfig("llama", 61, 32, 48, 4, 4, 2, 8, rms_norm_eps=1e-5)
N = 4


def _model():
    return loop_model(Transformer(CFG, rngs=nnx.Rngs(1)), "0", "3-", n_recursion=N, seed=2)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, CFG.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "labels": jnp.asarray(np.where(mask == 1, ids, -100)),
    }


OPT = adamw(1e-2, 0, 50)
SUP = jnp.asarray([True, False, True, False])


def _manual(model, batch, sup, opt, grad_accum=1):
    """The authors' loop in plain Python: backward per supervised loss, update every grad_accum losses."""
    graphdef, params, frozen = split_model(model)
    opt_state = opt.init(params)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    m = nnx.merge(graphdef, params, frozen)
    h, ctx = m.encode(ids, mask, True)
    watch = last_valid_index(mask)
    acc, n_acc, totals = None, 0, []
    for s in np.asarray(sup):
        if not s:
            h = unsupervised_step(nnx.merge(graphdef, params, frozen), h, ctx, True)
            continue

        def loss(p, h=h):
            h2, losses = supervised_step(nnx.merge(graphdef, p, frozen), h, ctx, labels, watch, 1.0, True)
            return losses.total / grad_accum, (h2, losses.total)

        (_, (h, total)), g = jax.value_and_grad(loss, has_aux=True)(params)
        totals.append(float(total))
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        n_acc += 1
        if n_acc == grad_accum:
            upd, opt_state = opt.update(acc, opt_state, params)
            params = optax.apply_updates(params, upd)
            acc, n_acc = None, 0
    return params, totals


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_second_supervised_step_sees_the_first_update(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    p0 = _leaves(st.params)
    st, losses, sup = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check(), supervised=SUP)
    want_params, want_totals = _manual(_model(), batch, SUP, OPT)
    got_totals = np.asarray(losses.total)[np.asarray(SUP)]
    # The same float32 computation in a scan vs eager Python: 1e-5.
    np.testing.assert_allclose(got_totals, want_totals, rtol=1e-5)
    for a, b in zip(_leaves(st.params), _leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(st.updates) == 2
    # Without the first update the second supervised loss would differ: it really saw new weights.
    no_update = deep_supervision_losses(_model(), batch, [0, 2], N).total
    assert abs(float(no_update[1]) - got_totals[1]) > 1e-4
    assert any(not np.array_equal(a, b) for a, b in zip(p0, _leaves(st.params), strict=True))


def test_grad_accum_counts_supervised_losses_across_batches(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    cfg = StepConfig(N, 2, grad_accum=3).check()
    st, _, _ = train_step(graphdef, frozen, st, batch, OPT, cfg, supervised=SUP)
    assert int(st.updates) == 0 and int(st.n_acc) == 2  # 2 of 3 losses accumulated, no update yet
    st, _, _ = train_step(graphdef, frozen, st, batch, OPT, cfg, supervised=SUP)
    assert int(st.updates) == 1 and int(st.n_acc) == 1  # the 3rd loss triggered an update; 1 carried over


def test_frozen_parts_do_not_change_and_have_no_optimizer_state(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    before = _leaves(frozen)
    trainable_top = set(st.params.keys()) if hasattr(st.params, "keys") else set()
    assert trainable_top == {"reasoning", "gate", "q_head", "decoder", "final_norm", "lm_head"}
    assert set(frozen.keys()) == {"embed", "encoder"}
    n_param_leaves = len(jax.tree.leaves(st.params))
    # adamw keeps mu and nu per trained tensor (+ scalar counts): nothing for the frozen ones.
    big = [x for x in jax.tree.leaves(st.opt_state) if np.ndim(x) > 0]
    assert len(big) == 2 * n_param_leaves
    st, _, _ = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check())
    for a, b in zip(before, _leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)


def test_per_batch_update_uses_the_mean_supervised_gradient(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    st2, _, _ = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2, update="per_batch").check(), supervised=SUP)
    g2, params, frz = split_model(_model())

    def mean_total(p):
        return jnp.mean(deep_supervision_losses(nnx.merge(g2, p, frz), batch, [0, 2], N).total)

    grads = jax.grad(mean_total)(params)
    upd, _ = OPT.update(grads, OPT.init(params), params)
    want = optax.apply_updates(params, upd)
    for a, b in zip(_leaves(st2.params), _leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(st2.updates) == 1


def test_supervised_steps_are_drawn_on_device_distinct(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT, seed=3)
    seen = set()
    for _ in range(4):
        st, _, sup = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check())
        assert int(np.asarray(sup).sum()) == 2
        seen.add(tuple(np.asarray(sup)))
    assert len(seen) > 1


def test_bf16_compute_keeps_float32_master_weights_and_losses(batch):
    """bf16 activations and matmuls; parameters, optimizer state and losses stay float32.

    The bf16 losses are the float32 ones within 3e-2 relative: bf16 keeps 8 mantissa bits (~4e-3
    relative per rounding) and the error of a few layers' rounding adds up to ~1e-2 on a loss of ~4.
    They must also differ from float32 at all, or the policy was not applied.
    """
    cfg = StepConfig(N, 2).check()
    g32, f32, s32 = init_state(_model(), OPT)
    _, l32, _ = train_step(g32, f32, s32, batch, OPT, cfg, supervised=SUP)
    g16, f16, s16 = init_state(_model(), OPT, compute_dtype=jnp.bfloat16)
    s16, l16, _ = train_step(g16, f16, s16, batch, OPT, cfg, supervised=SUP)
    assert nnx.merge(g16, s16.params, f16).compute_dtype == "bfloat16"
    for x in jax.tree.leaves((s16.params, s16.opt_state, s16.grad_acc)):
        assert x.dtype in (jnp.float32, jnp.int32), x.dtype
    for a in l16:
        assert a.dtype == jnp.float32
    sup = np.asarray(SUP)
    np.testing.assert_allclose(np.asarray(l16.lm)[sup], np.asarray(l32.lm)[sup], rtol=3e-2)
    assert not np.array_equal(np.asarray(l16.lm)[sup], np.asarray(l32.lm)[sup])


def test_compiled_memory_is_flat_in_depth(batch):
    """XLA's memory analysis of the train step at N = 32 is within 10% of N = 4."""

    def temp_bytes(n):
        model = loop_model(Transformer(CFG, rngs=nnx.Rngs(1)), "0", "3-", n_recursion=n)
        graphdef, frozen, st = init_state(model, OPT)
        exe = train_step.lower(graphdef, frozen, st, batch, OPT, StepConfig(n, 2).check()).compile()
        ma = exe.memory_analysis()
        return ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes

    small, big = temp_bytes(4), temp_bytes(32)
    assert big <= 1.10 * small, (small, big)


@pytest.mark.parametrize(
    "kw,text",
    [
        ({"n_supervision": 5}, "n_supervision must be in 1..n_recursion"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"update": "x"}, "update rule"),
    ],
)
def test_bad_step_config(kw, text):
    with pytest.raises(LoopusError, match=text):
        StepConfig(**{"n_recursion": 4, "n_supervision": 2, **kw}).check()
