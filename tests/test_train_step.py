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
from loopus_jax.train.step import StepConfig, adamw, init_state, micro_batched, split_model, train_step

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
# Parameters after AdamW updates: each update moves an element by about lr (1e-2: Adam divides by the
# gradient's own scale), so a float32 rounding difference in a gradient near the noise floor of its
# element (or in two that nearly cancel) shows up relative to lr, not to the parameter's value. We saw
# 1.8e-6 (scan vs eager Python, AVX-512 CPU); 1e-3 x lr leaves 5x headroom and is 1000x below one update,
# so a missed, doubled or misdirected update still fails.
ADAM_ATOL = 1e-3 * 1e-2
SUP = jnp.asarray([True, False, True, False])


def _manual(model, batch, sup, opt, grad_accum=1):
    """The authors' loop in plain Python: backward per supervised loss, update every grad_accum losses.
    Returns (params, supervised totals, L2 norm of each update's gradient)."""
    graphdef, params, frozen = split_model(model)
    opt_state = opt.init(params)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    m = nnx.merge(graphdef, params, frozen)
    h, ctx = m.encode(ids, mask, True)
    watch = last_valid_index(mask)
    acc, n_acc, totals, norms = None, 0, [], []
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
            norms.append(_norm(acc))
            upd, opt_state = opt.update(acc, opt_state, params)
            params = optax.apply_updates(params, upd)
            acc, n_acc = None, 0
    return params, totals, norms


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _norm(tree) -> float:
    """Global L2 norm, summed in float64 on the host."""
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


# Gradient norms: the step sums float32 squares on device, the reference float64 on the host, from
# the same float32 gradients computed in a different graph; both errors are ~1e-7 relative: rtol 1e-5.
NORM_RTOL = 1e-5


def _grad(model, batch, steps, weights):
    """Gradient of sum_i weights[i] * total_i of deep_supervision_losses, w.r.t. the trained params."""
    g, params, frozen = split_model(model)
    fn = lambda p: jnp.dot(jnp.asarray(weights), deep_supervision_losses(nnx.merge(g, p, frozen), batch, steps, N).total)
    return jax.grad(fn)(params)


def test_second_supervised_step_sees_the_first_update(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    p0 = _leaves(st.params)
    st, losses, sup, grad_norm = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check(), supervised=SUP)
    want_params, want_totals, want_norms = _manual(_model(), batch, SUP, OPT)
    got_totals = np.asarray(losses.total)[np.asarray(SUP)]
    # The same float32 computation in a scan vs eager Python: 1e-5.
    np.testing.assert_allclose(got_totals, want_totals, rtol=1e-5)
    for a, b in zip(_leaves(st.params), _leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=ADAM_ATOL)
    assert int(st.updates) == 2
    # grad_norm: the mean of the two updates' gradient norms; the first is independently the gradient
    # of supervised step 0's total (later steps cannot reach it), the second is at the updated weights.
    assert want_norms[0] == pytest.approx(_norm(_grad(_model(), batch, [0], [1.0])), rel=NORM_RTOL)
    assert float(grad_norm) == pytest.approx(np.mean(want_norms), rel=NORM_RTOL)
    assert abs(want_norms[0] - want_norms[1]) > 1e-3 * want_norms[0]  # the mean is not one of them
    # Without the first update the second supervised loss would differ: it really saw new weights.
    no_update = deep_supervision_losses(_model(), batch, [0, 2], N).total
    assert abs(float(no_update[1]) - got_totals[1]) > 1e-4
    assert any(not np.array_equal(a, b) for a, b in zip(p0, _leaves(st.params), strict=True))


def test_grad_accum_counts_supervised_losses_across_batches(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    cfg = StepConfig(N, 2, grad_accum=3).check()
    st, _, _, gn = train_step(graphdef, frozen, st, batch, OPT, cfg, supervised=SUP)
    assert int(st.updates) == 0 and int(st.n_acc) == 2  # 2 of 3 losses accumulated, no update yet
    assert np.isnan(float(gn))  # no update in this batch: no gradient norm
    st, _, _, gn = train_step(graphdef, frozen, st, batch, OPT, cfg, supervised=SUP)
    assert int(st.updates) == 1 and int(st.n_acc) == 1  # the 3rd loss triggered an update; 1 carried over
    # The update applied (loss_0 + loss_2 of batch 1 + loss_0 of the same batch 2, all at the initial
    # weights) / 3: the gradient of deep_supervision_losses' totals weighted 2/3 and 1/3.
    assert float(gn) == pytest.approx(_norm(_grad(_model(), batch, [0, 2], [2 / 3, 1 / 3])), rel=NORM_RTOL)


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
    st, _, _, _ = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check())
    for a, b in zip(before, _leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)


def test_per_batch_update_uses_the_mean_supervised_gradient(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT)
    st2, _, _, gn = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2, update="per_batch").check(), supervised=SUP)
    g2, params, frz = split_model(_model())

    def mean_total(p):
        return jnp.mean(deep_supervision_losses(nnx.merge(g2, p, frz), batch, [0, 2], N).total)

    grads = jax.grad(mean_total)(params)
    assert float(gn) == pytest.approx(_norm(grads), rel=NORM_RTOL)
    upd, _ = OPT.update(grads, OPT.init(params), params)
    want = optax.apply_updates(params, upd)
    for a, b in zip(_leaves(st2.params), _leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=ADAM_ATOL)
    assert int(st2.updates) == 1


def test_micro_batches_equal_one_batch_of_their_rows():
    """k = 2 micro-batches of 2 rows through micro_batched(sgd, 2) (optax.MultiSteps) equal one
    per_batch step on the 4 rows together.

    Exact in real arithmetic because (1) both micro-batches score as many tokens (lm is a mean over
    the batch's tokens, q a mean over its rows, so the mean of the micro-batch gradients is the big
    batch's gradient), (2) beta = 0: mono = SiLU(lm - lm_prev) of the batch means is not a mean over
    rows, and (3) the supervised steps are the same: the micro-batches of one update reuse the key,
    and the first draw from seed 5 is the big step's draw (asserted). SGD, not AdamW: AdamW's first
    update ~ lr * sign(g) turns float32 noise in near-zero gradient entries into +-lr differences.
    Tolerance 1e-5 absolute on parameters moved by lr 0.5 x gradients whose float32 rounding
    (different reduction order, Welford mean) is ~1e-7.
    """
    rng = np.random.RandomState(7)
    ids = rng.randint(0, CFG.vocab_size, (4, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 6:] = 0
    big = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}
    micro = [{k: jnp.asarray(v[i : i + 2]) for k, v in big.items()} for i in (0, 2)]
    counts = [int(np.sum(m["labels"][:, 1:] != -100)) for m in micro]
    assert counts[0] == counts[1] == 13
    big = {k: jnp.asarray(v) for k, v in big.items()}
    sgd = optax.sgd(0.5)
    cfg = StepConfig(N, 2, beta=0.0, update="per_batch").check()

    g, frozen, st = init_state(_model(), sgd, seed=5)
    want, want_losses, want_sup, want_gn = train_step(g, frozen, st, big, sgd, cfg)

    opt = micro_batched(sgd, 2)
    g, frozen, st = init_state(_model(), opt, seed=5)
    p0 = _leaves(st.params)
    st, l1, sup1, gn1 = train_step(g, frozen, st, micro[0], opt, cfg)
    for a, b in zip(p0, _leaves(st.params), strict=True):  # the first micro-batch only accumulates
        np.testing.assert_array_equal(a, b)
    assert int(st.updates) == 0 and int(st.opt_state.mini_step) == 1
    st, l2, sup2, gn2 = train_step(g, frozen, st, micro[1], opt, cfg)
    assert int(st.updates) == int(st.opt_state.gradient_step) == 1 and int(st.opt_state.mini_step) == 0
    np.testing.assert_array_equal(sup1, want_sup)
    np.testing.assert_array_equal(sup2, want_sup)
    np.testing.assert_array_equal(jax.random.key_data(st.rng), jax.random.key_data(want.rng))  # key advanced once
    for a, b in zip(_leaves(st.params), _leaves(want.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(p0, _leaves(want.params))) > 1e-3  # the update moved them
    # The micro-batches' mean lm is the big batch's (equal token counts); each logs its own gradient norm.
    sup = np.asarray(want_sup)
    np.testing.assert_allclose((np.asarray(l1.lm) + np.asarray(l2.lm))[sup] / 2, np.asarray(want_losses.lm)[sup], rtol=1e-5)
    assert float(gn1) != float(gn2) and np.isfinite([float(gn1), float(gn2), float(want_gn)]).all()


def test_micro_batches_need_the_per_batch_rule(batch):
    opt = micro_batched(OPT, 2)
    graphdef, frozen, st = init_state(_model(), opt)
    with pytest.raises(LoopusError, match="MultiSteps.*needs update 'per_batch'"):
        train_step(graphdef, frozen, st, batch, opt, StepConfig(N, 2).check(), supervised=SUP)
    with pytest.raises(LoopusError, match="must be >= 1"):
        micro_batched(OPT, 0)


def test_supervised_steps_are_drawn_on_device_distinct(batch):
    model = _model()
    graphdef, frozen, st = init_state(model, OPT, seed=3)
    seen = set()
    for _ in range(4):
        st, _, sup, _ = train_step(graphdef, frozen, st, batch, OPT, StepConfig(N, 2).check())
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
    _, l32, _, _ = train_step(g32, f32, s32, batch, OPT, cfg, supervised=SUP)
    g16, f16, s16 = init_state(_model(), OPT, compute_dtype=jnp.bfloat16)
    s16, l16, _, _ = train_step(g16, f16, s16, batch, OPT, cfg, supervised=SUP)
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
