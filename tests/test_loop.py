"""The looped model against the method's equations, a plain Python loop, and the authors' format."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopus_jax as lj
from loopus_jax.config import ModelConfig
from loopus_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from loopus_jax.loop import halting as H
from loopus_jax.loop.gate import gate_apply, q_head_apply
from loopus_jax.loop.model import loop_model
from loopus_jax.models import layers as L
from loopus_jax.models.transformer import Transformer

CFG = ModelConfig("llama", 101, 32, 48, 5, 4, 2, 8, rms_norm_eps=1e-5)


def _randomize(model: nnx.Module, seed: int) -> None:
    """Perturb every parameter (norms included) so no weight sits at an identity value."""
    rng = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(var[...])
        var.set_value(jnp.asarray(x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)))


@pytest.fixture(scope="module")
def base() -> Transformer:
    m = Transformer(CFG, rngs=nnx.Rngs(1))
    _randomize(m, 0)
    return m


@pytest.fixture(scope="module")
def looped(base) -> nnx.Module:
    m = loop_model(base, "0", "4-", n_recursion=3, seed=3)
    _randomize(m.gate, 1)
    _randomize(m.q_head, 2)
    return m


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left-padded
    mask[2, 6:] = 0  # right-padded
    return ids, mask


# --- the gate and q head against NumPy implementations of the method's equations -----------------


def _np_gate(p, h_new, h_old):
    f = lambda x: np.asarray(x, np.float64)
    dt_low = (f(h_new) - f(h_old)) @ f(p["w_in"])
    z = dt_low @ f(p["w_dt"]) + f(p["b_dt"])
    delta = np.log1p(np.exp(z))
    a_bar = np.exp(delta * -np.exp(f(p["A_log"])))
    return a_bar * f(h_new) + (1 - a_bar) * f(h_old)


def _np_q(p, x):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p["ln_scale"]) + np.asarray(p["ln_bias"])
    return (y @ np.asarray(p["w_q"], np.float64) + np.asarray(p["b_q"], np.float64))[..., 0]


def test_gate_matches_numpy(looped):
    rng = np.random.RandomState(5)
    h_old = rng.standard_normal((2, 5, 32)).astype(np.float32)
    h_new = h_old + 0.3 * rng.standard_normal((2, 5, 32)).astype(np.float32)
    p = looped.gate.arrays()
    got = np.asarray(gate_apply(p, jnp.asarray(h_new), jnp.asarray(h_old)))
    # float32 inside vs float64 reference: relative rounding ~1e-7 on O(1) values.
    np.testing.assert_allclose(got, _np_gate(p, h_new, h_old), atol=1e-6)


def test_gate_init_follows_the_authors(looped, base):
    fresh = loop_model(base, "0", "4-", seed=7).gate
    d, r = 32, 2
    np.testing.assert_allclose(np.asarray(fresh.A_log[...]), np.log(np.arange(1, d + 1)), rtol=1e-6)
    assert np.abs(np.asarray(fresh.w_dt[...])).max() <= r**-0.5
    dt = np.log1p(np.exp(np.asarray(fresh.b_dt[...], np.float64)))  # softplus(bias) = the sampled dt
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)


def test_q_head_matches_numpy(looped):
    x = np.random.RandomState(6).standard_normal((4, 32)).astype(np.float32) * 3
    p = looped.q_head.arrays()
    np.testing.assert_allclose(np.asarray(q_head_apply(p, jnp.asarray(x))), _np_q(p, x), atol=1e-5)


# --- the looped forward against the base model and a plain Python loop ---------------------------


def test_pass_through_gate_at_n1_equals_base(base, batch):
    m = loop_model(base, "0", "4-", n_recursion=1)
    m.gate.A_log.set_value(jnp.full((32,), -1e4))  # A = -exp(-1e4) = 0, so A_bar = 1: h = h_new
    ids, mask = batch
    want = np.asarray(lj.forward(base, ids, mask).logits)
    got = np.asarray(lj.forward(m, ids, mask).logits)
    v = mask.astype(bool)
    np.testing.assert_allclose(got[v], want[v], atol=1e-5)


def test_forward_signature_is_shared_by_base_and_looped(base, looped, batch):
    ids, mask = batch
    kw = dict(n_recursion=None, halting=None, q_threshold=None)
    out = lj.forward(base, ids, mask, **kw)
    assert out.exit_depth is None and out.q is None
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(lj.forward(base, ids, mask).logits))
    assert lj.forward(looped, ids, mask, **kw).exit_depth.shape == (3,)
    with pytest.raises(lj.LoopusError, match="looped models only"):
        lj.forward(base, ids, mask, n_recursion=2)


def test_tied_base_copies_embedding_into_lm_head(base):
    tied = Transformer(CFG.__class__(**{**CFG.__dict__, "tie_word_embeddings": True}), rngs=nnx.Rngs(4))
    m = loop_model(tied, "0", "4-")
    np.testing.assert_array_equal(np.asarray(m.lm_head[...]), np.asarray(tied.embed[...]).T)


def _python_loop(model, ids, mask, n):
    """Plain Python composition of the blocks, layer by layer, with the NumPy gate."""
    cfg = model.config
    ctx = L.make_context(cfg, jnp.asarray(mask))
    h = jnp.take(model.embed[...], jnp.asarray(ids), axis=0)

    def layers(stack, h):
        arrs = stack.arrays()
        for i in range(stack.num_layers):
            h = L.decoder_layer({k: v[i] for k, v in arrs.items()}, h, ctx, cfg)
        return h

    h = layers(model.encoder, h)
    for _ in range(n):
        h = jnp.asarray(_np_gate(model.gate.arrays(), layers(model.reasoning, h), h), jnp.float32)
    return np.asarray(model.logits(layers(model.decoder, h)))


def test_n3_equals_python_loop(looped, batch):
    ids, mask = batch
    got = np.asarray(lj.forward(looped, ids, mask, n_recursion=3).logits)
    want = _python_loop(looped, ids, mask, 3)
    v = mask.astype(bool)
    # float32 through 11 layer applications; the reference gate runs in float64.
    np.testing.assert_allclose(got[v], want[v], atol=1e-5)


def test_scan_equals_unrolled(looped, batch):
    ids, mask = batch
    a = lj.forward(looped, ids, mask, n_recursion=3, scan_layers=True).logits
    b = lj.forward(looped, ids, mask, n_recursion=3, scan_layers=False).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _loss_and_grads(model, ids, mask, remat):
    opts, q, eps = model.options(n_recursion=3, remat=remat)
    graphdef, state = nnx.split(model, nnx.Param)
    w = jax.random.normal(jax.random.key(0), (ids.shape[0], ids.shape[1], CFG.vocab_size))

    def loss(state):
        logits, _, qs = nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask), opts, q, eps)
        return jnp.sum(logits * w) + jnp.sum(qs)

    return jax.value_and_grad(loss)(state)


def test_remat_on_equals_off_in_values_and_gradients(looped, batch):
    ids, mask = batch
    v0, g0 = _loss_and_grads(looped, ids, mask, "none")
    for policy in ("full",):
        v1, g1 = _loss_and_grads(looped, ids, mask, policy)
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
            # Remat recomputes the forward in a different fusion order: float32 rounding (~1e-7
            # relative per op) accumulates over 9 layer applications and their backward, so we
            # allow 1e-4 of each gradient's own scale (seen: 1.6e-5 on entries of size ~1).
            scale = float(np.abs(np.asarray(a)).max())
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4 * scale + 1e-9)
    # The gradient reaches the gate and the q head.
    assert float(jnp.abs(g0["gate"]["w_in"][...]).max()) > 0
    assert float(jnp.abs(g0["q_head"]["w_q"][...]).max()) > 0


# --- halting ---------------------------------------------------------------------------------------


def _first_exit(qs, thr, n):
    for i, q in enumerate(qs):
        if q > thr:
            return i + 1
    return n


@pytest.mark.parametrize("strategy", ["threshold", "cdf", "convergence"])
def test_per_sample_halting_equals_each_sample_alone(looped, batch, strategy):
    ids, mask = batch
    n = 6
    free = lj.forward(looped, ids, mask, n_recursion=n)
    qs = np.asarray(free.q)
    # A threshold inside the observed q range makes the samples exit at different depths.
    thr = float(np.median(qs[:, :3]))
    eps = 0.5 if strategy == "convergence" else 1e-2
    kw = dict(n_recursion=n, halting=strategy, q_threshold=thr, convergence_epsilon=eps)
    out = lj.forward(looped, ids, mask, **kw)
    for b in range(ids.shape[0]):
        v = mask[b].astype(bool)
        alone = lj.forward(looped, ids[b : b + 1, v], **kw)
        np.testing.assert_array_equal(np.asarray(alone.exit_depth)[0], np.asarray(out.exit_depth)[b])
        np.testing.assert_allclose(np.asarray(alone.logits)[0], np.asarray(out.logits)[b][v], atol=1e-5)
    if strategy == "threshold":
        want = [_first_exit(qs[b], thr, n) for b in range(3)]
        assert list(np.asarray(out.exit_depth)) == want
        assert len(set(want)) > 1, "the test needs samples that exit at different depths"


def _run_rule(strategy, qs, deltas=None, thr=0.6, interval=1, eps=0.1):
    """Drive `halting.advance` along a hand-built trajectory for one sample; return its exit depth.
    The watched state is one channel that moves by the given change at each step (from 0)."""
    n = len(qs)
    active, carry = jnp.ones((1,), bool), H.init_carry(strategy, 1, 1)
    params = (jnp.float32(eps if strategy == "convergence" else thr), jnp.float32(0.0))
    for i in range(n):
        d = 1.0 if deltas is None else deltas[i]
        h_old, gated = jnp.zeros((1, 1, 1), jnp.float32), jnp.full((1, 1, 1), d, jnp.float32)
        q = jnp.asarray([qs[i]], jnp.float32)
        _, halt, carry = H.advance(
            strategy,
            params,
            jnp.int32(i),
            n,
            q,
            h_old,
            gated,
            active,
            jnp.zeros((1,), jnp.int32),
            carry,
            q_eval_interval=interval,
        )
        if bool(halt[0]):
            return i + 1
        active = active & ~halt
    return n


def test_halting_rules_on_hand_computed_trajectories():
    # threshold: first q > 0.6 is at step 3.
    assert _run_rule("threshold", [0.3, 0.5, 0.7, 0.9, 0.9]) == 3
    # with q_eval_interval 2 only steps 2, 4 and the last are judged: 0.7 at step 3 is skipped.
    assert _run_rule("threshold", [0.3, 0.5, 0.7, 0.5, 0.5], interval=2) == 5
    # cdf: survival 0.7 -> 0.35 -> cdf 0.3, 0.65 > 0.6 at step 2.
    assert _run_rule("cdf", [0.3, 0.5, 0.1, 0.1]) == 2
    # cdf with interval 2: only step 2 updates survival (q=0.5 -> cdf 0.5), step 4: 1-0.5*0.8=0.6, not > 0.6;
    # the last step (6) updates again: 1 - 0.4 * 0.5 = 0.8.
    assert _run_rule("cdf", [0.9, 0.5, 0.9, 0.2, 0.9, 0.5], interval=2) == 6
    # convergence: first change below 0.1 at step 4 (judged every step, q ignored).
    assert _run_rule("convergence", [0.99] * 5, deltas=[1.0, 0.5, 0.2, 0.05, 0.01]) == 4
    assert _run_rule("threshold", [0.1, 0.2]) == 2  # never halts: N


def test_model_convergence_extremes(looped, batch):
    ids, mask = batch
    assert np.asarray(
        lj.forward(looped, ids, mask, n_recursion=4, halting="convergence", convergence_epsilon=1e9).exit_depth
    ).tolist() == [1, 1, 1]
    assert np.asarray(
        lj.forward(looped, ids, mask, n_recursion=4, halting="convergence", convergence_epsilon=0.0).exit_depth
    ).tolist() == [4, 4, 4]


def test_q_sources_differ_and_post_gate_uses_last_position(looped, batch):
    ids, mask = batch
    pre = np.asarray(lj.forward(looped, ids, mask, n_recursion=2).q)
    post = np.asarray(lj.forward(looped, ids, mask, n_recursion=2, q_source="post_gate_last").q)
    assert not np.allclose(pre, post)
    # Post-gate q at the last position of a right-padded row reads a padding position.
    cfg = looped.config
    ctx = L.make_context(cfg, jnp.asarray(mask))
    h, _ = looped.encode(jnp.asarray(ids), jnp.asarray(mask), True)
    gated, _ = looped.reason(h, ctx, True)
    want = 1 / (1 + np.exp(-_np_q(looped.q_head.arrays(), np.asarray(gated)[:, -1])))
    np.testing.assert_allclose(post[:, 0], want, atol=1e-5)


def test_bad_options_are_clear_errors(looped, batch):
    ids, mask = batch
    for kw, text in [
        ({"halting": "sometimes"}, "unknown halting strategy"),
        ({"n_recursion": 0}, "n_recursion must be"),
        ({"q_source": "x"}, "unknown q_source"),
        ({"remat": "x"}, "unknown remat policy"),
    ]:
        with pytest.raises(lj.LoopusError, match=text):
            lj.forward(looped, ids, mask, **kw)


# --- the authors' lds format -----------------------------------------------------------------------


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_lds_write_read_is_bit_exact(looped, tmp_path, batch):
    lj.save(looped, tmp_path / "m", format="lds")
    back, _ = lj.load(tmp_path / "m")
    a, b = _params(looped), _params(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    assert back.loop == looped.loop
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "lds" and cfg["base_config_dict"]["tie_word_embeddings"] is False
    assert cfg["encoder_layer_indices"] == [0] and cfg["reasoning_layer_indices"] == [1, 2, 3]
    keys = set(SafetensorsFile(tmp_path / "m" / "model.safetensors").keys())
    for k in (
        "encoder.embed_tokens.weight",
        "encoder.layers.0.self_attn.q_proj.weight",
        "reasoning.layers.0.mlp.up_proj.weight",
        "reasoning.layers.2.input_layernorm.weight",
        "decoder.layers.0.post_attention_layernorm.weight",
        "decoder.norm.weight",
        "decoder.lm_head.weight",
        "reasoning.gate.A_log",
        "reasoning.gate.dt_input_proj.weight",
        "reasoning.gate.delta_proj.weight",
        "reasoning.gate.delta_proj.bias",
        "q_head.0.weight",
        "q_head.0.bias",
        "q_head.1.weight",
        "q_head.1.bias",
    ):
        assert k in keys, k
    assert "reasoning.layers.3.mlp.up_proj.weight" not in keys  # block-local indices: 3 reasoning layers


def _rewrite(src, dst, edit):
    f = SafetensorsFile(src)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    edit(tensors)
    write_safetensors(dst, [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()])


def test_lds_config_names_only_rules_the_authors_know(looped, tmp_path):
    """A Huginn criterion is written as the authors' default ("threshold") and kept under loopus_halting."""
    saved = looped.loop
    try:
        for ours, theirs in (("kl", "threshold"), ("none", "threshold"), ("cdf", "cdf"), ("convergence", "convergence")):
            looped.loop = dataclasses.replace(saved, halting=ours)
            lj.save(looped, tmp_path / ours, format="lds")
            cfg = json.loads((tmp_path / ours / "config.json").read_text())
            assert (cfg["halting_strategy"], cfg["loopus_halting"]) == (theirs, ours)
            assert lj.load(tmp_path / ours)[0].loop.halting == ours
    finally:
        looped.loop = saved


@pytest.mark.parametrize(
    "edit,text",
    [
        (lambda t: t.pop("reasoning.gate.A_log"), "missing tensor.*reasoning.gate.A_log"),
        (
            lambda t: t.__setitem__("reasoning.layers.3.mlp.up_proj.weight", np.zeros((48, 32), np.float32)),
            "unexpected tensor.*reasoning.layers.3",
        ),
        (lambda t: t.__setitem__("q_head.1.weight", np.zeros((2, 32), np.float32)), "q_head.1.weight has shape"),
    ],
)
def test_lds_reader_names_the_bad_key(looped, tmp_path, edit, text):
    lj.save(looped, tmp_path / "m", format="lds")
    _rewrite(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "model.safetensors", edit)
    with pytest.raises(lj.LoopusError, match=text):
        lj.load(tmp_path / "m")


def test_native_format_holds_looped_models(looped, tmp_path, batch):
    lj.save(looped, tmp_path / "n")
    back, _ = lj.load(tmp_path / "n")
    a, b = _params(looped), _params(back)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a) and back.loop == looped.loop


REFERENCE = os.environ.get("LOOPUS_REFERENCE_REPO")


@pytest.mark.skipif(not REFERENCE, reason="set LOOPUS_REFERENCE_REPO to a checkout of Thrillcrazyer/LoopUS to check interop")
def test_authors_code_loads_our_lds_and_ours_loads_theirs(looped, tmp_path, batch):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, REFERENCE)
    from models.configuration_lds import LDSConfig

    LDSConfig.has_no_defaults_at_init = True  # offline: no default base model from the hub
    from models.modeling_lds import LDSForCausalLM

    ids, _ = batch
    lj.save(looped, tmp_path / "ours", format="lds")
    ref = LDSForCausalLM.from_pretrained(str(tmp_path / "ours"), tokenizer=object()).eval()
    ref.halting_strategy, ref.q_threshold = "threshold", 2.0  # q <= 1 never exceeds: fixed depth
    for n in (1, 3):
        ref.N = n
        with torch.no_grad():
            theirs = ref(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(np.asarray(lj.forward(looped, ids, n_recursion=n).logits), theirs, atol=1e-5)
    ref.tokenizer = None
    ref.save_pretrained(str(tmp_path / "theirs"))
    back, _ = lj.load(tmp_path / "theirs")
    np.testing.assert_allclose(
        np.asarray(lj.forward(back, ids, n_recursion=3).logits),
        np.asarray(lj.forward(looped, ids, n_recursion=3).logits),
        atol=1e-6,
    )
