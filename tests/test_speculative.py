"""Self-speculative decoding against plain decoding: greedy tokens, the sampling distribution (chi-square
against the exact distribution, enumerated with full forwards), and the caches after every round.

Tolerances: the verification runs k + 1 tokens in one pass where plain decoding runs them one by one;
float32 sums in a different order agree to ~1e-6 on these tiny models (O(1) logits), so logits and
cached keys/values are compared at 1e-5, as in test_decode.py. Tokens and masks must be equal.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_hf
from flax import nnx
from scipy.stats import chi2
from test_decode import N, _cli, _rows, base, batch, looped, tiny_checkpoint  # noqa: F401  (fixtures)
from test_loop import _randomize

import loopus_jax as lj
from loopus_jax.config import ModelConfig
from loopus_jax.decode import engine as E
from loopus_jax.decode import generation as G
from loopus_jax.decode import speculative as S
from loopus_jax.decode.sampling import Sampler
from loopus_jax.errors import LoopusError
from loopus_jax.loop.model import loop_model
from loopus_jax.models.transformer import Transformer

NEW = 12
SPEC = {"draft_depth": 2, "draft_tokens": 3}


def _assert_same_output(spec, plain):
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    real = np.arange(plain.tokens.shape[1])[None] < plain.lengths[:, None]
    np.testing.assert_allclose(spec.logits[real], plain.logits[real], atol=1e-5)
    np.testing.assert_array_equal(spec.exit_depth, np.where(real, N, 0))


def test_greedy_equals_plain_decoding(looped, batch):  # noqa: F811
    ids, mask = batch
    common = dict(max_new_tokens=NEW, return_logits=True)
    plain = lj.generate(looped, ids, mask, halting="none", stop_tokens=[], **common)
    _assert_same_output(lj.generate(looped, ids, mask, speculative=SPEC, stop_tokens=[], **common), plain)
    # Row 2 repeats token 29: as a stop token it ends that row in the middle of a round.
    plain_stop = lj.generate(looped, ids, mask, halting="none", stop_tokens=[29], **common)
    assert 1 < plain_stop.lengths[2] < NEW and (plain_stop.lengths[:2] == NEW).all()
    _assert_same_output(lj.generate(looped, ids, mask, speculative=SPEC, stop_tokens=[29], **common), plain_stop)

    # One row at a time every draft counts: drafts are accepted and rejected within a run. (A row's
    # plain output is its row of the batch: test_decode checks batch == each prompt alone.)
    drafted = accepted = 0
    for b, row in enumerate(_rows(ids, mask)):
        spec = lj.generate(looped, row[None], speculative=SPEC, stop_tokens=[], **common)
        np.testing.assert_array_equal(spec.tokens[0], plain.tokens[b])
        np.testing.assert_allclose(spec.logits[0], plain.logits[b], atol=1e-5)
        drafted, accepted = drafted + spec.timings["drafted"], accepted + spec.timings["accepted"]
        assert spec.timings["rounds"] + spec.timings["accepted"] == NEW - 1  # each round: its kept drafts + 1
    assert 0 < accepted < drafted

    # Drafting at full depth is the verification itself: every draft is accepted, 4 tokens a round.
    full = lj.generate(looped, ids, mask, speculative={"draft_depth": N, "draft_tokens": 3}, stop_tokens=[], **common)
    _assert_same_output(full, plain)
    assert full.timings["acceptance_rate"] == 1.0 and full.timings["rounds"] == -(-(NEW - 1) // 4)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _round(graphdef, plan, state, dstate, buf, dyn):
    model = nnx.merge(graphdef, state)
    return S.run_round(model, plan, E.block_weights(model, plan), dstate, buf, dyn)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _feed(graphdef, plan, state, dstate, token, t, dyn):
    model = nnx.merge(graphdef, state)
    weights = E.block_weights(model, plan)
    return E.step_cached(model, plan, weights, dstate, token, t, jnp.ones(token.shape, bool), dyn.thr)[0]


def _assert_same_caches(a: E.CacheState, b: E.CacheState):
    np.testing.assert_array_equal(np.asarray(a.keys.mask), np.asarray(b.keys.mask))
    for name in a.blocks:
        for x, y in ((a.blocks[name].k, b.blocks[name].k), (a.blocks[name].v, b.blocks[name].v)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, err_msg=name)
    if a.valid is not None:
        np.testing.assert_array_equal(np.asarray(a.valid), np.asarray(b.valid))


@pytest.mark.parametrize("fill", ["latest", "skip"])
def test_caches_after_each_round_equal_plain_decoding_of_the_kept_tokens(fill, looped, batch):  # noqa: F811
    """After every round (rejections included), every cache (encoder, each depth, decoder), the key
    mask and the per-depth validity equal plain decoding's after feeding the same tokens one by one;
    slots a rejected draft wrote are empty again."""
    ids, mask = batch
    row, row_mask = ids[1:2], mask[1:2]  # left-padded; with these weights it accepts some drafts, not all
    run, p0, p1 = looped.options(halting="none")
    plan = E.Plan(run, True, False, fill, "float32", NEW, Sampler(True), False, (2, 3))
    dyn = G.Dynamic(
        E.Thresholds(jnp.float32(p0), jnp.float32(p1)),
        jnp.float32(1.0),
        jnp.float32(1.0),
        jax.random.key(0),
        jnp.full((4,), -1, jnp.int32),
        jnp.int32(0),
    )
    p_ids, p_mask, _ = G._left_pad(row, row_mask, G.bucket(int(row_mask.sum())))
    graphdef, state = nnx.split(looped)
    dstate, buf = G._prefill_jit(graphdef, plan, state, jnp.asarray(p_ids), jnp.asarray(p_mask), dyn)
    ref, fed = dstate, 0
    partial = 0
    while int(buf.t) < NEW:
        t0 = int(buf.t)
        dstate, buf = _round(graphdef, plan, state, dstate, buf, dyn)
        kept = int(buf.t) - t0 - 1  # drafts kept this round
        partial += 0 < kept < 3
        while fed < int(buf.t) - 1:  # plain decoding feeds token `fed` with t = fed + 1
            ref = _feed(graphdef, plan, state, ref, buf.tokens[:, fed], jnp.int32(fed + 1), dyn)
            fed += 1
        _assert_same_caches(dstate, ref)
    assert partial > 0, "no round rejected a draft after accepting one; the test did not exercise that case"


# --- sampling: the exact distribution ---------------------------------------------------------------

V = 12
TEMPERATURE, TOP_K = 0.7, 8


@pytest.fixture(scope="module")
def small_vocab():
    cfg = ModelConfig("llama", V, 32, 48, 4, 4, 2, 8, rms_norm_eps=1e-5)
    plain = Transformer(cfg, rngs=nnx.Rngs(1))
    _randomize(plain, 0)
    m = loop_model(plain, "0", "3-", n_recursion=3, seed=3)
    _randomize(m.gate, 1)
    _randomize(m.q_head, 2)
    return m


def _sampler_probs(logits: np.ndarray) -> np.ndarray:
    """Temperature, then top-k, then softmax, in float64 (the distribution plain sampling draws from)."""
    x = logits.astype(np.float64) / TEMPERATURE
    x = np.where(x < np.sort(x, -1)[..., -TOP_K][..., None], -np.inf, x)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _exact_pair_distribution(model, prompt: np.ndarray, n: int) -> np.ndarray:
    """P(generated tokens 1 and 2) [V, V] at depth n, summing over token 0: every continuation enumerated."""
    last = lambda seqs: _sampler_probs(np.asarray(lj.forward(model, seqs, n_recursion=n, halting="none").logits)[:, -1])
    p0 = last(prompt)[0]
    s1 = np.concatenate([np.repeat(prompt, V, 0), np.arange(V)[:, None]], 1)
    s2 = np.concatenate([np.repeat(s1, V, 0), np.tile(np.arange(V), V)[:, None]], 1)
    return np.einsum("a,ab,abc->bc", p0, last(s1), last(s2).reshape(V, V, V))


def _chi_square(pairs: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(statistic, 0.999 quantile of its null distribution); cells expecting < 5 samples are pooled."""
    counts = np.zeros((V, V))
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    e, c = p.ravel() * len(pairs), counts.ravel()
    small = e < 5
    e, c = np.append(e[~small], e[small].sum()), np.append(c[~small], c[small].sum())
    return float(((c - e) ** 2 / e).sum()), float(chi2.ppf(0.999, len(e) - 1))


def _pairs(model, prompt, rows, seeds, **kw) -> tuple[np.ndarray, dict]:
    out, stats = [], {"drafted": 0, "accepted": 0}
    for seed in range(seeds):
        sampling = dict(temperature=TEMPERATURE, top_k=TOP_K, seed=seed)
        g = lj.generate(model, np.repeat(prompt, rows, 0), max_new_tokens=3, stop_tokens=[], **sampling, **kw)
        out.append(g.tokens[:, 1:3])
        for k in stats:
            stats[k] += g.timings.get(k, 0)
    return np.concatenate(out), stats


def test_sampling_follows_the_full_depth_distribution(small_vocab):
    """Tokens 1 and 2 (drafted at depth 1 of 3, two drafts per round) against their exact joint
    distribution at full depth, by a chi-square test at significance 0.001 over 2,400 samples (fixed
    seeds, so the outcome is deterministic). The same test passes plain sampling and rejects sampling
    from the draft depth alone, which shows it can tell the two distributions apart."""
    prompt = np.array([[3, 7, 1, 9, 4]])
    exact = _exact_pair_distribution(small_vocab, prompt, 3)
    spec, stats = _pairs(small_vocab, prompt, 8, 300, speculative={"draft_depth": 1, "draft_tokens": 2})
    stat, limit = _chi_square(spec, exact)
    assert stat < limit, (stat, limit)
    assert 0 < stats["accepted"] < stats["drafted"]
    plain, _ = _pairs(small_vocab, prompt, 48, 50, halting="none")
    stat, limit = _chi_square(plain, exact)
    assert stat < limit, (stat, limit)
    draft, _ = _pairs(small_vocab, prompt, 48, 50, n_recursion=1, halting="none")
    stat, limit = _chi_square(draft, exact)
    assert stat > 5 * limit, (stat, limit)


def test_bad_speculative_options_are_clear_errors(base, looped, batch):  # noqa: F811
    ids, mask = batch
    go = functools.partial(lj.generate, looped, ids, mask, max_new_tokens=2)
    cases = [
        (dict(speculative={"draft_depth": 0, "draft_tokens": 2}), "draft_depth must be an integer in [1, n_recursion=4]"),
        (dict(speculative={"draft_depth": 5, "draft_tokens": 2}), "draft_depth must be an integer in [1, n_recursion=4]"),
        (dict(speculative={"draft_depth": 1, "draft_tokens": 0}), "draft_tokens must be a positive integer"),
        (dict(speculative={"draft_depth": 1}), 'speculative must be a dict {"draft_depth": d, "draft_tokens": k}'),
        (dict(speculative=SPEC, halting="cdf"), "verifies every token at full depth"),
        (dict(speculative=SPEC, cache=False), "drop cache=False"),
    ]
    for kw, text in cases:
        with pytest.raises(LoopusError) as err:
            go(**kw)
        assert text in str(err.value)
    with pytest.raises(LoopusError, match="needs a looped model"):
        lj.generate(base, ids, mask, max_new_tokens=2, speculative=SPEC)


def test_cli_speculative_equals_plain_greedy(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from test_cli import VOCAB, _tokenizer

    hf, _ = make_tiny_hf("llama", tmp_path / "hf", vocab_size=len(VOCAB), num_hidden_layers=4)
    model, _ = lj.load(hf)
    path = lj.save(loop_model(model, "0", "3-", n_recursion=3, seed=1), tmp_path / "looped", tokenizer=_tokenizer())
    args = ["--prompt", "the cat sat on", "--max-new-tokens", 8, "--json"]
    plain = json.loads(_cli(capsys, "--model", path, *args, "--halting", "none")[1])
    spec = json.loads(_cli(capsys, "--model", path, *args, "--draft-depth", 1, "--draft-tokens", 3)[1])
    assert spec["results"][0]["tokens"] == plain["results"][0]["tokens"]
    assert 0 <= spec["acceptance_rate"] <= 1 and "acceptance_rate" not in plain
    short = ["--prompt", "x", "--max-new-tokens", 4, "--draft-depth", 1]
    code, _, err = _cli(capsys, "--model", path, *short)
    assert code == 2 and "needs both --draft-depth D and --draft-tokens K" in err
    code, _, err = _cli(capsys, "--model", tiny_checkpoint, *short, "--draft-tokens", 2)
    assert code == 2 and "needs a looped model" in err
