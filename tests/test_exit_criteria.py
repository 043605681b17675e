"""Exit criteria (loopus_jax.loop.criteria) against hand computations and independent references.

- Each criterion along a hand-built trajectory (states and logits written here) exits at the depth
  worked out by hand in the comments, and at the depth a NumPy recomputation of its equation gives.
- Criteria on decoder logits see exactly the model's logits at each depth: a recording criterion
  registered here captures what it is shown and we compare with `forward(n_recursion=t)`.
- In `forward`, a batch gives each row's exit depth and logits alone, for every new criterion.
- Cached decoding with a logit criterion equals a naive float64 decoder without cache (test_decode's,
  written from the method's equations) with the criterion applied by hand to its logits at every
  depth; the uncached path (cache=False) agrees with it on the prompt. Later tokens differ by design
  between the two paths: cached positions keep their own exit depths (fill `latest`), the
  recomputation runs every position at the newest token's depth.

Tolerances: the tiny float32 models have O(1) logits; the watched-position decoder sums the same
float32 terms as the full decoder in another order (~1e-6), so 1e-5. Against the float64 naive
decoder, float32 rounding ~1e-6: 1e-5 (as test_decode).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import CFG, NEW, N, _rows, batch, naive_decoder, tiny_checkpoint  # noqa: F401 (fixtures)
from test_loop import _randomize

import loopus_jax as lj
from loopus_jax import cli
from loopus_jax.loop import criteria
from loopus_jax.loop import halting as H
from loopus_jax.loop.model import loop_model
from loopus_jax.models.transformer import Transformer

HUGINN = ("entropy-diff", "latent-diff", "kl", "minp-kl", "argmax-stability", "cosine")


# --- NumPy reference of every criterion, from its equation --------------------------------------


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def _entropy(x):
    p = _softmax(x)
    return -(p * np.log(p + 1e-10)).sum()


def _kl(p, q):
    return float((p * (np.log(p) - np.log(q))).sum())


def _minp(x, min_p):
    p = _softmax(x)
    p = np.where(p < min_p * p.max(), 1 / len(p), p)
    return p / p.sum()


def np_exit_depth(name, states, logits, thr, min_p=0.1, qs=None):
    """First depth t (1-based) whose criterion value passes; N = len(states) - 1 if none does.
    `states[0]` is the state before the first step, `logits[t-1]` the logits at `states[t]`."""
    n = len(states) - 1
    h = [np.asarray(s, np.float64) for s in states]
    run = 0
    surv = 1.0
    for t in range(1, n + 1):
        if name == "latent-diff":
            hit = np.linalg.norm(h[t] - h[t - 1]) / np.linalg.norm(h[t]) < thr
        elif name == "cosine":
            hit = 1 - h[t] @ h[t - 1] / (np.linalg.norm(h[t]) * np.linalg.norm(h[t - 1])) < thr
        elif name == "convergence":
            hit = np.linalg.norm(h[t] - h[t - 1]) < thr
        elif name == "threshold":
            hit = qs[t - 1] > thr
        elif name == "cdf":
            surv *= 1 - qs[t - 1]
            hit = 1 - surv > thr
        else:
            new = logits[t - 1]
            prev = np.zeros_like(new) if t == 1 else logits[t - 2]  # uniform before the first step
            if name == "entropy-diff":
                hit = abs(_entropy(new) - (100.0 if t == 1 else _entropy(prev))) < thr
            elif name == "kl":
                hit = _kl(_softmax(prev), _softmax(new)) < thr
            elif name == "minp-kl":
                hit = _kl(_minp(prev, min_p), _minp(new, min_p)) < thr
            elif name == "argmax-stability":
                run = run + 1 if t > 1 and np.argmax(new) == np.argmax(prev) else 0
                hit = run >= thr
        if hit:
            return t
    return n


def drive(name, states, logits=None, qs=None, **params):
    """Our criterion through `halting.advance` along one row's hand-built trajectory; its exit depth."""
    c = criteria.get(name)
    p = tuple(jnp.float32(v) for v in criteria.pack(c, criteria.resolve_params(c, params, None, None)))
    n = len(states) - 1
    h = jnp.asarray(states[0], jnp.float32)[None, None]  # [B=1, T=1, D]
    carry = H.init_carry(name, 1, 4)
    for i in range(n):

        # The constructed logits at depth i + 1; None for criteria on states (advance must not ask).
        watched = None if logits is None else lambda _h, i=i: jnp.asarray(logits[i], jnp.float32)[None]
        q = jnp.asarray([qs[i] if qs else 0.5], jnp.float32)
        gated = jnp.asarray(states[i + 1], jnp.float32)[None, None]
        active = jnp.ones((1,), bool)
        watch = jnp.zeros((1,), jnp.int32)
        step = jnp.int32(i)
        h, halt, carry = H.advance(name, p, step, n, q, h, gated, active, watch, carry, q_eval_interval=1, watched_logits=watched)
        if bool(halt[0]):
            return i + 1
    return n


# Logit trajectories over a vocabulary of 4 (depths 1..4); states for the logit criteria are unused.
FLAT = [[0.0, 0.0]] * 5
ENTROPY_LOGITS = [[2, 0, 0, 0], [3, 0, 0, 0], [3.001, 0, 0, 0], [3.001, 0, 0, 0]]
KL_LOGITS = [[2, 0, 0, 0], [2.5, 0, 0, 0], [2.52, 0, 0, 0], [2.52, 0, 0, 0]]
# Tokens 3 and 4 stay below 0.1 * max: min-p maps them (and token 2, p = 0.04 < 0.096) to 1/4, so only
# the renormalisation moves; the plain KL sees the tail move (e^-8 vs e^-3 at depth 3).
MINP_LOGITS = [[3, 0, -5, -5], [3.2, 0, -5, -5], [3.2, 0, -8, -3], [3.2, 0, -8, -3]]
ARGMAX_LOGITS = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 0, 0], [0, 3, 1, 0], [0, 3, 2, 0]]
LATENT_STATES = [[1, 0], [2, 0], [2, 0.2], [2, 0.24], [2, 0.24]]
COSINE_STATES = [[1, 0], [1, 1], [1, 1.1], [1, 1.12], [1, 1.12]]

# (criterion, states, logits, q, params, depth worked out by hand)
HAND = [
    # |H_t - H_t-1|: 99.08 (against 100), 0.389, 3.4e-4 -> below 1e-3 at depth 3; below 0.5 at depth 2.
    ("entropy-diff", FLAT, ENTROPY_LOGITS, None, {}, 3),
    ("entropy-diff", FLAT, ENTROPY_LOGITS, None, {"threshold": 0.5}, 2),
    # KL(p_t-1 || p_t): 0.454 (against uniform), 0.0238, 3.2e-5 -> below 5e-4 at 3; below 0.03 at 2.
    ("kl", FLAT, KL_LOGITS, None, {}, 3),
    ("kl", FLAT, KL_LOGITS, None, {"threshold": 0.03}, 2),
    # min-p KL: 0.198, 9.4e-6, 2.5e-7 -> below 1e-6 at 3; plain KL on the same logits: 3.41, 8.6e-4, 1.7e-3, 0 -> depth 4.
    ("minp-kl", FLAT, MINP_LOGITS, None, {}, 3),
    ("kl", FLAT, MINP_LOGITS, None, {"threshold": 1e-6}, 4),
    # argmax 0, 1, 1, 1, 1, 1: run 0, 0, 1, 2, 3, 4 -> reaches 2 at depth 4, never 5 (N = 6).
    ("argmax-stability", [[0.0]] * 7, ARGMAX_LOGITS, None, {"threshold": 2}, 4),
    ("argmax-stability", [[0.0]] * 7, ARGMAX_LOGITS, None, {}, 6),
    # ||dh|| / ||h_t||: 1/2, 0.2/2.01 = 0.0995, 0.04/2.014 = 0.0199 -> below 0.03 at 3; below 0.1 at 2.
    ("latent-diff", LATENT_STATES, None, None, {}, 3),
    ("latent-diff", LATENT_STATES, None, None, {"threshold": 0.1}, 2),
    # 1 - cos: 0.293, 1.13e-3, 4.0e-5 -> below 1e-3 at 3; below 0.3 at 1.
    ("cosine", COSINE_STATES, None, None, {}, 3),
    ("cosine", COSINE_STATES, None, None, {"threshold": 0.3}, 1),
    # LoopUS's rules on the same interface: ||dh|| 1, 0.2, 0.04 -> below 0.1 at 3; q 0.3, 0.5, 0.7 > 0.6 at 3;
    # cdf: 1 - 0.7 * 0.5 = 0.65 > 0.6 at 2.
    ("convergence", LATENT_STATES, None, None, {"threshold": 0.1}, 3),
    ("threshold", FLAT, None, [0.3, 0.5, 0.7, 0.9], {"threshold": 0.6}, 3),
    ("cdf", FLAT, None, [0.3, 0.5, 0.1, 0.1], {"threshold": 0.6}, 2),
]


@pytest.mark.parametrize("name,states,logits,qs,params,want", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_exit_depth_on_hand_built_trajectories(name, states, logits, qs, params, want):
    thr = params.get("threshold", dict(criteria.get(name).params)["threshold"])
    assert np_exit_depth(name, states, logits, thr, qs=qs) == want
    assert drive(name, states, logits, qs, **params) == want


def test_registry_metadata_and_errors(looped2):
    assert set(criteria.names()) == {"none", "threshold", "cdf", "convergence", *HUGINN}
    assert {c.name for c in criteria.REGISTRY.values() if c.needs_logits} == {"entropy-diff", "kl", "minp-kl", "argmax-stability"}
    # Huginn's default thresholds.
    defaults = {n: dict(criteria.get(n).params) for n in HUGINN}
    assert defaults["kl"]["threshold"] == 5e-4 and defaults["minp-kl"] == {"threshold": 1e-6, "min_p": 0.1}
    assert defaults["argmax-stability"]["threshold"] == 5 and defaults["latent-diff"]["threshold"] == 0.03
    assert defaults["entropy-diff"]["threshold"] == 1e-3 and defaults["cosine"]["threshold"] == 1e-3
    m = looped2
    assert m.options(halting="minp-kl", halting_params={"min_p": 0.2})[1:] == (pytest.approx(1e-6), pytest.approx(0.2))
    assert m.options(halting="cdf", q_threshold=0.4)[1:] == (pytest.approx(0.4), 0.0)
    assert m.options(halting="convergence")[1] == pytest.approx(m.loop.convergence_epsilon)
    for kw, text in [
        ({"halting": "entropy"}, "expected one of none, threshold, cdf, convergence, entropy-diff"),
        ({"halting": "kl", "halting_params": {"min_p": 0.1}}, r"no parameter\(s\) \['min_p'\]; its parameters: threshold"),
        ({"halting": "argmax-stability", "halting_params": {"threshold": 2.5}}, "integer >= 1"),
        ({"halting": "minp-kl", "halting_params": {"min_p": 1.5}}, r"min_p must lie in \(0, 1\)"),
        ({"halting": "kl", "halting_params": {"threshold": "x"}}, "not a number"),
        ({"halting": "cdf", "q_threshold": 0.5, "halting_params": {"threshold": 0.7}}, "disagree"),
        ({"halting": "kl", "halting_params": [("threshold", 1.0)]}, "must be a dict"),
    ]:
        with pytest.raises(lj.LoopusError, match=text):
            lj.forward(m, np.arange(5), **kw)
    with pytest.raises(lj.LoopusError, match="NAME=NUMBER"):
        criteria.params_from_flags(None, ["min_p"])
    assert criteria.params_from_flags(1e-3, ["min_p=0.2"]) == {"threshold": 1e-3, "min_p": 0.2}


def _count_vocab_matmuls(jaxpr, vocab) -> int:
    """dot_generals producing a vocab-sized last axis (the LM head), through nested jaxprs (loops)."""
    n = 0
    for eq in jaxpr.eqns:
        if eq.primitive.name == "dot_general" and eq.outvars[0].aval.shape[-1:] == (vocab,):
            n += 1
        for v in eq.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _count_vocab_matmuls(sub, vocab)
    return n


def test_decoder_runs_in_the_loop_only_for_logit_criteria(looped2):
    m = looped2
    ids, mask = jnp.asarray(np.arange(1, 7)[None]), jnp.ones((1, 6), jnp.int32)
    counts = {}
    for name in criteria.names():
        opts, a, b = m.options(halting=name)
        counts[name] = _count_vocab_matmuls(jax.make_jaxpr(lambda i, k: m(i, k, opts, a, b))(ids, mask).jaxpr, CFG.vocab_size)
    # One LM head for the output; logit criteria add one inside the depth loop (traced once, run per depth).
    assert counts == {n: 2 if criteria.get(n).needs_logits else 1 for n in criteria.names()}, counts


# --- the logits a criterion sees are the model's ------------------------------------------------


@pytest.fixture(scope="module")
def base() -> Transformer:
    m = Transformer(CFG, rngs=nnx.Rngs(1))
    _randomize(m, 0)
    return m


def _looped(base, decoder: str, n: int = N):
    m = loop_model(base, "0", decoder, n_recursion=n, seed=3)
    _randomize(m.gate, 1)
    _randomize(m.q_head, 2)
    return m


@pytest.fixture(scope="module")
def looped2(base):
    """Two decoder layers (3, 4): the watched position's last decoder layer needs every position's keys/values."""
    return _looped(base, "3-")


def _logits_by_depth(model, ids, mask, n):
    """[N, B, T, V]: the blocks at fixed depth 1..N (encoder, t gated reasoning steps, full decoder)."""
    graphdef, state = nnx.split(model)
    return _blocks_by_depth(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), n)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _blocks_by_depth(graphdef, state, ids, mask, n):
    model = nnx.merge(graphdef, state)
    h, ctx = model.encode(ids, mask, True)
    out = []
    for _ in range(n):
        h, _ = model.reason(h, ctx, True)
        out.append(model.decode(h, ctx, True))
    return jnp.stack(out)


def test_logit_criteria_see_the_models_logits_at_each_depth(looped2, batch):  # noqa: F811
    """A recording criterion (registered here) keeps what it is shown; row 0 halts at depth 2 to check
    that a frozen row keeps its state. The watched position is each row's last real token (rows padded
    left and right). Reference: the model's blocks at fixed depth t, whose last depth is `forward`'s."""
    ids, mask = batch
    model, n, q_source, decoder = looped2, N, "pre_gate_last_valid", "3-"
    seen = []

    def rule(d, p, stats):
        jax.debug.callback(lambda *a: seen.append(tuple(np.asarray(x) for x in a)), d.step, d.logits_prev, d.logits_new)
        return (d.step + 1 >= p["threshold"]) & (jnp.arange(d.q.shape[0]) == 0), stats

    name = f"test-record-{decoder}-{q_source}"  # its own name: a cached compile would call another test's `seen`
    criteria.register(criteria.Criterion(name, rule, (("threshold", 2.0),), "records", needs_logits=True))
    try:
        out = lj.forward(model, ids, mask, halting=name, q_source=q_source)
    finally:
        criteria.REGISTRY.pop(name)
    watch = [np.flatnonzero(r)[-1] for r in mask]
    by_depth = np.asarray(_logits_by_depth(model, ids, mask, n))  # [N, B, T, V]
    want = [np.zeros((3, CFG.vocab_size))] + [by_depth[t][np.arange(3), watch] for t in range(n)]
    assert sorted(int(s) for s, *_ in seen) == list(range(n))
    for step, prev, new in seen:
        step = int(step)
        for b in range(3):
            if b == 0 and step >= 2:  # row 0 exited at depth 2: frozen, its logits stay those of depth 2
                np.testing.assert_allclose(prev[b], want[2][b], atol=1e-5)
                np.testing.assert_allclose(new[b], want[2][b], atol=1e-5)
                continue
            np.testing.assert_allclose(prev[b], want[step][b], atol=1e-5)
            np.testing.assert_allclose(new[b], want[step + 1][b], atol=1e-5)
    assert np.asarray(out.exit_depth).tolist() == [2, n, n]
    v = mask[0].astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[0][v], by_depth[1][0][v], atol=1e-5)
    # The reference is the model at fixed depth: forward(n_recursion=N) with no halting gives its last entry.
    np.testing.assert_allclose(np.asarray(lj.forward(model, ids, mask).logits), by_depth[-1], atol=1e-5)


@pytest.fixture(scope="module")
def huginn_switch():
    """Huginn's six rules behind one traced index (a test-only criterion: the criterion is static in a
    compiled forward, so this lets one compile per shape serve all six). Parameters: the index into
    HUGINN and the threshold; min-p keeps its default 0.1. It runs the decoder for all (the state
    rules ignore the logits)."""
    rules = [criteria.get(n) for n in HUGINN]

    def branch(c, d, p, run):
        def f(_):
            params = {"threshold": p["threshold"], "min_p": jnp.float32(0.1)}
            if c.name == "argmax-stability":
                return c.rule(d, params, run)
            return c.rule(d, params, ())[0], run

        return f

    def rule(d, p, run):
        return jax.lax.switch(p["index"].astype(jnp.int32), [branch(c, d, p, run) for c in rules], None)

    name = "test-huginn-switch"
    init = lambda b: jnp.zeros((b,), jnp.int32)
    criteria.register(criteria.Criterion(name, rule, (("index", 0.0), ("threshold", 0.0)), "test", needs_logits=True, init=init))
    yield name
    criteria.REGISTRY.pop(name)


def _split_threshold(run, name):
    """A threshold at which the rows exit at different depths: bisection in log space from one that
    exits deepest (1e-6) towards one that exits shallowest (10); thresholds are traced, so every try
    reuses one compiled forward. argmax-stability counts steps: the most varied of 1..3."""
    depths = lambda thr: np.asarray(run(thr).exit_depth)
    if name == "argmax-stability":
        return max(((k, depths(k)) for k in (1, 2, 3)), key=lambda r: len(set(r[1].tolist())))
    lo, hi = 1e-6, 10.0
    deep = depths(lo).mean()
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        d = depths(mid)
        if len(set(d.tolist())) > 1:
            break
        lo, hi = (mid, hi) if d.mean() == deep else (lo, mid)
    return mid, d


@pytest.fixture(scope="module")
def batch6() -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 6 real tokens in 8 columns, padded left, right and both (alone: one shape to compile)."""
    ids = np.random.RandomState(1).randint(3, CFG.vocab_size, (3, 8))
    mask = np.zeros_like(ids)
    mask[0, 2:], mask[1, :6], mask[2, 1:7] = 1, 1, 1
    return ids, mask


@pytest.mark.parametrize("name", HUGINN)
def test_forward_batch_equals_each_row_alone(looped2, batch6, huginn_switch, name):
    ids, mask = batch6
    run = lambda thr, ids=ids, mask=mask: lj.forward(
        looped2, ids, mask, halting=huginn_switch, halting_params={"index": HUGINN.index(name), "threshold": thr}
    )
    thr, depths = _split_threshold(run, name)
    if name != "argmax-stability":  # (on this random model the argmax is as stable in every row)
        assert len(set(depths.tolist())) > 1, depths
    out = run(thr)
    for b in range(3):
        v = mask[b].astype(bool)
        alone = run(thr, ids[b : b + 1, v], mask[b : b + 1, v])
        assert int(np.asarray(alone.exit_depth)[0]) == depths[b]
        np.testing.assert_allclose(np.asarray(alone.logits)[0], np.asarray(out.logits)[b][v], atol=1e-5)
    if name == "kl":  # the switch is the registered criterion: same exits and logits as halting="kl"
        direct = lj.forward(looped2, ids, mask, halting="kl", halting_params={"threshold": thr})
        np.testing.assert_array_equal(np.asarray(direct.exit_depth), depths)
        np.testing.assert_allclose(np.asarray(direct.logits), np.asarray(out.logits), atol=1e-6)


# --- decoding ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def looped(base):
    return _looped(base, "4-")


def _kl_exit(logits_by_depth, thr):
    return np_exit_depth("kl", [[0.0]] * (len(logits_by_depth) + 1), logits_by_depth, thr)


def test_cached_decoding_with_kl_equals_naive_decoder(looped, batch):  # noqa: F811
    ids, mask = batch
    kw = dict(max_new_tokens=NEW, stop_tokens=[], return_logits=True, halting="kl")
    thresholds = (0.3, 0.1, 0.05, 0.03, 0.02, 0.01)  # traced: no recompile; keep the most varied exits
    runs = {thr: lj.generate(looped, ids, mask, halting_params={"threshold": thr}, **kw) for thr in thresholds}
    varied = lambda e: (len(np.unique(e)), sum(len(np.unique(r)) > 1 for r in e))
    thr, out = max(runs.items(), key=lambda r: varied(r[1].exit_depth))
    # Exits must differ between rows and within a row (later tokens attend to earlier ones' `latest` fill).
    assert varied(out.exit_depth)[0] >= 2 and varied(out.exit_depth)[1] >= 1, {t: r.exit_depth for t, r in runs.items()}
    for b, prompt in enumerate(_rows(ids, mask)):
        for t in range(NEW):
            seq = np.concatenate([prompt, out.tokens[b, :t]])
            # The newest position's logits if it exits at depth j: in prefill every prompt position runs
            # to j; later, the prompt at its recorded depth, generated tokens at theirs, the newest at j.
            by_depth = []
            for j in range(1, N + 1):
                if t == 0:
                    exits = np.full(len(seq), j)
                else:
                    exits = np.concatenate([np.full(len(prompt), out.exit_depth[b, 0]), out.exit_depth[b, 1:t], [j]])
                by_depth.append(naive_decoder(looped, seq, exits, "latest")[0])
            want_depth = _kl_exit(by_depth, thr)
            assert out.exit_depth[b, t] == want_depth, (b, t, [float(x) for x in by_depth[0][:3]])
            np.testing.assert_allclose(out.logits[b, t], by_depth[want_depth - 1], atol=1e-5, err_msg=f"row {b} token {t}")
            assert out.tokens[b, t] == by_depth[want_depth - 1].argmax()
    # The uncached path (cache=False) is `forward` on the window at each step: on the prompt both agree.
    # Later tokens differ by design: cached positions keep their own exit depths, the recomputation
    # runs every position at the newest token's depth.
    fwd = lj.forward(looped, ids, mask, halting="kl", halting_params={"threshold": thr})
    np.testing.assert_array_equal(np.asarray(fwd.exit_depth), out.exit_depth[:, 0])
    last = [np.flatnonzero(m)[-1] for m in mask]
    np.testing.assert_allclose(np.asarray(fwd.logits)[np.arange(3), last], out.logits[:, 0], atol=1e-5)


def test_cli_generate_takes_the_criterion_flags(tiny_checkpoint, capsys):  # noqa: F811
    """The flags reach `cmd_generate`: a malformed parameter is named, and on a base checkpoint every
    halting flag is refused; one line on stderr, exit 2 (nothing compiles)."""
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "the cat sat on", "--max-new-tokens", "4"]
    for flags, text in [
        (["--halting", "kl", "--halting-param", "threshold"], "NAME=NUMBER"),
        (["--halting-threshold", "1e-3", "--halting-param", "threshold=2e-3"], "disagree"),
        (["--halting-threshold", "1e-3"], "--halting-* apply to looped models"),
        (["--halting-param", "min_p=0.2"], "--halting-* apply to looped models"),
    ]:
        code = cli.main([*args, *flags])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and text in err, (flags, err)


def test_lm_eval_adapter_takes_criterion_parameters(tiny_checkpoint, looped2):  # noqa: F811
    """`halting_<name>` model arguments become the criterion's parameters (validated at construction)."""
    pytest.importorskip("lm_eval")
    from loopus_jax.eval.harness import LoopusLM

    _, tok = lj.load(tiny_checkpoint)
    lm = LoopusLM(model=looped2, tokenizer=tok, halting="minp-kl", halting_threshold="1e-3", halting_min_p=0.2)
    assert lm.scorer.options["halting"] == "minp-kl"
    assert lm.scorer.options["halting_params"] == {"threshold": "1e-3", "min_p": 0.2}
    assert looped2.options(**lm.scorer.options)[1:] == (pytest.approx(1e-3), pytest.approx(0.2))
    with pytest.raises(lj.LoopusError, match=r"no parameter\(s\) \['k'\]"):
        LoopusLM(model=looped2, tokenizer=tok, halting="minp-kl", halting_k=2)
