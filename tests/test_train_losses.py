"""Random deep supervision losses against the method's equations, finite differences, and frozen parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopus_jax.config import ModelConfig
from loopus_jax.loop.model import loop_model
from loopus_jax.models import layers as L
from loopus_jax.models.transformer import Transformer
from loopus_jax.train.losses import deep_supervision_losses

CFG = ModelConfig("llama", 61, 32, 48, 4, 4, 2, 8, rms_norm_eps=1e-5)
N = 4


@pytest.fixture(scope="module")
def model():
    m = loop_model(Transformer(CFG, rngs=nnx.Rngs(2)), "0", "3-", n_recursion=N, seed=1)
    rng = np.random.RandomState(0)
    for _, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        x = np.asarray(var[...])
        var.set_value(jnp.asarray(x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)))
    return m


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(1)
    ids = rng.randint(0, CFG.vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right-padded
    mask[2, :2] = 0  # left-padded
    labels = np.where(mask == 1, ids, -100)
    labels[0, 4] = -100  # an ignored label inside a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- a plain composition of the blocks, written from the equations -------------------------------


def _np(x):
    return np.asarray(x, np.float64)


def _layers(stack, h, ctx):
    arrs = stack.arrays()
    for i in range(stack.num_layers):
        h = L.decoder_layer({k: v[i] for k, v in arrs.items()}, h, ctx, CFG)
    return h


def _gate(p, h_new, h_old):
    z = (_np(h_new) - _np(h_old)) @ _np(p["w_in"]) @ _np(p["w_dt"]) + _np(p["b_dt"])
    a_bar = np.exp(np.log1p(np.exp(z)) * -np.exp(_np(p["A_log"])))
    return a_bar * _np(h_new) + (1 - a_bar) * _np(h_old)


def _reason(m, h, ctx):
    h_new = _layers(m.reasoning, h, ctx)
    return jnp.asarray(_gate(m.gate.arrays(), h_new, h), jnp.float32), h_new


def _ce(logits, labels):
    lg, t = _np(logits)[:, :-1], labels[:, 1:]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    valid = t != -100
    nll = lse - np.take_along_axis(lg, np.where(valid, t, 0)[..., None], -1)[..., 0]
    return (nll * valid).sum() / valid.sum()


def _setup(m, batch):
    ids, mask, labels = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
    ctx = L.make_context(CFG, mask)
    last = np.array([np.nonzero(np.asarray(r))[0].max() for r in mask])
    return ids, ctx, np.asarray(labels), last


def _trajectory(m, batch, steps):
    """What the method detaches, per supervised step: the entering state h_old, lm_prev and target_q."""
    ids, ctx, labels, last = _setup(m, batch)
    h = _layers(m.encoder, jnp.take(m.embed[...], ids, axis=0), ctx)
    consts = []
    for i in range(N):
        if i not in steps:
            h, _ = _reason(m, h, ctx)
            continue
        h_old = h
        h, _ = _reason(m, _reason(m, h_old, ctx)[0], ctx)
        logits = _np(m.logits(_layers(m.decoder, h, ctx)))
        t = labels[:, 1:]
        valid = t != -100
        tq = ((logits[:, :-1].argmax(-1) == t) & valid).sum(1) / valid.sum(1)
        consts.append({"h_old": h_old, "lm_prev": _ce(m.logits(_layers(m.decoder, h_old, ctx)), labels), "tq": tq})
    return consts


def _segment(m, batch, c, beta):
    """One supervised step's (lm, mono, q, total) from the detached constants `c`."""
    _, ctx, labels, last = _setup(m, batch)
    h_mid, _ = _reason(m, c["h_old"], ctx)
    h, h_new = _reason(m, h_mid, ctx)
    upd = _np(h_new - h_mid)[np.arange(len(last)), last]
    qp = m.q_head.arrays()
    y = (upd - upd.mean(-1, keepdims=True)) / np.sqrt(upd.var(-1, keepdims=True) + 1e-5) * _np(qp["ln_scale"]) + _np(
        qp["ln_bias"]
    )
    q_logit = (y @ _np(qp["w_q"]) + _np(qp["b_q"]))[:, 0]
    lm = _ce(m.logits(_layers(m.decoder, h, ctx)), labels)
    d = lm - c["lm_prev"]
    mono = d / (1 + np.exp(-d))
    tq = c["tq"]
    q = np.mean(np.maximum(q_logit, 0) - q_logit * tq + np.log1p(np.exp(-np.abs(q_logit))))
    return lm, mono, q, lm + beta * mono + q


def _reference(m, batch, steps, beta=1.0):
    return np.array([_segment(m, batch, c, beta) for c in _trajectory(m, batch, steps)])


@pytest.mark.parametrize("steps", [[1, 3], [0], [0, 1, 2, 3]])
def test_losses_equal_plain_composition(model, batch, steps):
    got = deep_supervision_losses(model, batch, steps, N, beta=0.7)
    want = _reference(model, batch, steps, beta=0.7)
    got = np.stack([np.asarray(got.lm), np.asarray(got.mono), np.asarray(got.q), np.asarray(got.total)], 1)
    # float32 layers and decoder vs the same with a float64 gate, CE and q head: 1e-5.
    np.testing.assert_allclose(got, want, atol=1e-5)


def _split(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def test_gradients_equal_finite_differences_and_frozen_parts_get_none(model, batch):
    graphdef, params = _split(model)

    def total(p):
        return jnp.sum(deep_supervision_losses(nnx.merge(graphdef, p), batch, [1, 2], N, beta=0.7).total)

    g = jax.grad(total)(params)
    # Frozen: the embedding and the encoder never receive a gradient.
    assert float(jnp.abs(g["embed"][...]).max()) == 0.0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["encoder"]))
    # Trained parts do.
    for part in ("reasoning", "gate", "q_head", "decoder", "final_norm", "lm_head"):
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[part])) > 0, part
    # Central differences of the equations' objective: the method detaches the state entering each
    # supervised step, lm_prev and target_q, so they are held at the base weights (`_trajectory`)
    # and only the supervised segments see the perturbation. float64 segment arithmetic on float32
    # layers: with eps 1e-2 the quotient's noise is ~1e-4; 2% relative plus 2e-4 absolute.
    consts = _trajectory(model, batch, [1, 2])
    rng = np.random.RandomState(3)
    for path in (
        ("reasoning", "wq"),
        ("gate", "w_dt"),
        ("q_head", "w_q"),
        ("q_head", "ln_scale"),
        ("decoder", "w_up"),
        ("lm_head",),
    ):
        node_p, node_g = params, g
        for k in path:
            node_p, node_g = node_p[k], node_g[k]
        # Half along the gradient (so the derivative is well above the noise), half random.
        gdir = np.asarray(node_g[...]) / np.linalg.norm(np.asarray(node_g[...]))
        r = rng.standard_normal(gdir.shape).astype(np.float32)
        v = gdir + r / np.linalg.norm(r)
        v /= np.linalg.norm(v)
        base = node_p[...]

        def at(eps, node_p=node_p, base=base, v=v):
            node_p.set_value(base + eps * v)
            val = sum(_segment(nnx.merge(graphdef, params), batch, c, 0.7)[3] for c in consts)
            node_p.set_value(base)
            return val

        eps = 1e-2
        fd = (at(eps) - at(-eps)) / (2 * eps)
        analytic = float(np.sum(np.asarray(node_g[...]) * v))
        assert abs(fd - analytic) <= 0.02 * abs(analytic) + 2e-4, (path, fd, analytic)
        assert abs(analytic) > 1e-3, (path, analytic)  # a direction that actually moves the loss


def test_unsupervised_steps_contribute_no_gradient(model, batch):
    """The gradient of step 3's loss equals that of the same supervised step started from a constant state."""
    graphdef, params = _split(model)
    ids, mask, labels = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
    from loopus_jax.models.layers import last_valid_index
    from loopus_jax.train.losses import supervised_step

    m = nnx.merge(graphdef, params)
    h, ctx = m.encode(ids, mask, True)
    for _ in range(3):
        h, _ = m.reason(h, ctx, True)
    h_const = jax.lax.stop_gradient(h)

    def from_const(p):
        mm = nnx.merge(graphdef, p)
        return supervised_step(mm, h_const, ctx, labels, last_valid_index(mask), 1.0, True)[1].total

    def full(p):
        return deep_supervision_losses(nnx.merge(graphdef, p), batch, [3], N).total[0]

    g1, g2 = jax.grad(from_const)(params), jax.grad(full)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
