"""Decoding against independent references: a recomputation of the whole prefix (no cache), a naive
decoder written here from the method's equations (per-position exit depths with the `latest` / `skip`
fill rules, no cache), each prompt alone, transformers' `generate`, and the sampling distribution.

Tolerances: tiny float32 models with O(1) logits; cached and recomputed paths sum the same float32
terms in a different order (attention over a preallocated cache vs the prompt itself), so they agree
to ~1e-6; we allow 1e-5. The naive decoder runs in float64 NumPy: float32 rounding of ours, ~1e-6
on these logits, also within 1e-5. Against PyTorch (a different kernel library) we allow 1e-4 on the
tiny model (seen: 1e-6) and 1e-2 on SmolLM2 (30 layers, logits ~20; seen: 1e-4).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from conftest import make_tiny_hf
from flax import nnx
from test_loop import _np_gate, _np_q, _randomize

import loopus_jax as lj
from loopus_jax import cli
from loopus_jax.config import ModelConfig
from loopus_jax.loop.model import Q_SOURCES, loop_model
from loopus_jax.models.transformer import Transformer

CFG = ModelConfig("llama", 101, 32, 48, 5, 4, 2, 8, rms_norm_eps=1e-5)
N = 4
NEW = 8
# cdf halting on the random q head: these thresholds spread exits over depths 1..4, within rows too;
# at 0.48 the prompt's depth loop stops at depth 3 (every row halted) and later tokens run depth 4,
# where they see the prompt only through the `latest` fill done after the loop.
# test_early_exit_equals_naive_decoder asserts all of this.
CDF_THRESHOLDS = (0.48, 0.65)


@pytest.fixture(scope="module")
def base() -> Transformer:
    m = Transformer(CFG, rngs=nnx.Rngs(1))
    _randomize(m, 0)
    return m


@pytest.fixture(scope="module")
def looped(base) -> nnx.Module:
    m = loop_model(base, "0", "4-", n_recursion=N, seed=3)
    _randomize(m.gate, 1)
    _randomize(m.q_head, 2)
    return m


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """Three prompts of lengths 9, 6, 6: row 1 left-padded, row 2 right-padded (generate re-packs any padding)."""
    ids = np.random.RandomState(0).randint(3, CFG.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    return ids, mask


def _rows(ids, mask):
    return [ids[b][mask[b].astype(bool)] for b in range(ids.shape[0])]


# --- fixed depth: cached == recomputed ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "looped"])
def test_fixed_depth_cache_equals_recompute(which, base, looped, batch):
    model = base if which == "base" else looped
    ids, mask = batch
    cached = lj.generate(model, ids, mask, max_new_tokens=NEW, stop_tokens=[], return_logits=True)
    full = lj.generate(model, ids, mask, max_new_tokens=NEW, stop_tokens=[], return_logits=True, cache=False)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, atol=1e-5)
    # Temperature 0 is greedy: every token is the argmax of the logits it was chosen from.
    np.testing.assert_array_equal(cached.tokens, cached.logits.argmax(-1))
    # The first token's logits are `forward`'s at each row's last real token.
    fwd = np.asarray(lj.forward(model, ids, mask).logits)
    last = [np.flatnonzero(m)[-1] for m in mask]
    np.testing.assert_allclose(cached.logits[:, 0], fwd[np.arange(3), last], atol=1e-5)
    assert (cached.exit_depth == (0 if which == "base" else N)).all()
    assert cached.tokens.shape == (3, NEW) and (cached.lengths == NEW).all() and cached.timings["prompt_bucket"] == 16


# --- early exit: cached == a naive decoder without cache -------------------------------------------


def _rms(x, w, eps=CFG.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos):
    """HF's half-split rotary embedding (default type, every channel), x [T, heads, hd]."""
    hd = x.shape[-1]
    ang = pos[:, None] * CFG.rope_theta ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    return x * cos + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin


def _layer(p, h, given=None, hidden=None):
    """One pre-norm Llama layer over a whole row h [T, D] in float64. `given` = (k, v, which): positions
    `which` use these keys/values instead of their own; `hidden` [T]: positions no other position may
    attend to. Returns (h, (k, v) as used)."""
    t = h.shape[0]
    x = _rms(h, p["attn_norm"])
    pos = np.arange(t)
    q = _rope(np.einsum("td,dhk->thk", x, p["wq"]), pos)
    k = _rope(np.einsum("td,dhk->thk", x, p["wk"]), pos)
    v = np.einsum("td,dhk->thk", x, p["wv"])
    if given is not None:
        gk, gv, which = given
        k, v = np.where(which[:, None, None], gk, k), np.where(which[:, None, None], gv, v)
    allowed = np.tril(np.ones((t, t), bool))
    if hidden is not None:
        allowed &= ~hidden[None, :] | np.eye(t, dtype=bool)
    g = q.shape[1] // k.shape[1]
    s = np.einsum("thd,shd->hts", q, np.repeat(k, g, axis=1)) / np.sqrt(q.shape[-1])
    w = np.exp(np.where(allowed[None], s, -np.inf) - s.max(-1, keepdims=True))
    a = np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), np.repeat(v, g, axis=1))
    h = h + np.einsum("thk,hkd->td", a, p["wo"])
    x = _rms(h, p["mlp_norm"])
    gate = x @ p["w_gate"]
    return h + (gate / (1 + np.exp(-gate)) * (x @ p["w_up"])) @ p["w_down"], (k, v)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _layers_of(stack):
    arrays = _np(stack.arrays())
    return [{k: v[i] for k, v in arrays.items()} for i in range(stack.num_layers)]


def naive_decoder(model, seq, exits, fill):
    """Logits of the last position [V] and its q per depth [N] by q source (the pre-gate update, or the
    post-gate state, at the last position) for one row `seq` [T], recomputed from
    scratch in float64 NumPy. Position i runs the reasoning block at depths 1..exits[i] and then keeps
    its state; at a deeper depth j its keys/values are, with fill `latest`, the ones it had at depth
    exits[i] in every reasoning layer, and with `skip` it is invisible to the other positions."""
    assert CFG.rope_type == "default" and not (CFG.qkv_bias or CFG.qk_norm or CFG.o_bias)
    h = np.asarray(model.embed[...], np.float64)[np.asarray(seq)]
    for p in _layers_of(model.encoder):
        h, _ = _layer(p, h)
    reasoning, gate, qh = _layers_of(model.reasoning), model.gate.arrays(), model.q_head.arrays()
    exits = np.asarray(exits)
    kv_at = {}  # (depth, layer) -> (k, v) [T, Hkv, hd]
    qs = []
    for j in range(1, N + 1):
        frozen = exits < j
        x = h
        for i, p in enumerate(reasoning):
            given = hidden = None
            if fill == "latest" and frozen.any():
                own = [kv_at[(e if e < j else j - 1, i)] for e in exits]  # each frozen position's keys at its exit depth
                given = (np.stack([o[0][r] for r, o in enumerate(own)]), np.stack([o[1][r] for r, o in enumerate(own)]), frozen)
            elif fill == "skip":
                hidden = frozen
            x, kv_at[(j, i)] = _layer(p, x, given, hidden)
        gated = _np_gate(gate, x, h)
        qs.append([_np_q(qh, x[-1] - h[-1]), _np_q(qh, gated[-1])])
        h = np.where(frozen[:, None], h, gated)
    for p in _layers_of(model.decoder):
        h, _ = _layer(p, h)
    logits = _rms(h[-1], np.asarray(model.final_norm[...], np.float64)) @ np.asarray(model.lm_head[...], np.float64)
    return logits, dict(zip(Q_SOURCES, 1 / (1 + np.exp(-np.array(qs).T))))


def cdf_exit(qs, thr):
    """The `cdf` rule by hand: exit at the first depth where 1 - prod(1 - q) > thr, else N."""
    surv = np.cumprod(1 - np.asarray(qs, np.float64))
    hit = np.flatnonzero(1 - surv > thr)
    return int(hit[0]) + 1 if hit.size else N


# (fill rule, cdf threshold, q source) of the early-exit runs; the thresholds change no compiled shape.
EARLY_EXIT_RUNS = [(fill, thr, Q_SOURCES[0]) for fill in ("latest", "skip") for thr in CDF_THRESHOLDS]
EARLY_EXIT_RUNS.append(("latest", 0.66, Q_SOURCES[1]))


@pytest.fixture(scope="module")
def early_exit(looped, batch):
    ids, mask = batch
    kw = dict(max_new_tokens=NEW, stop_tokens=[], return_logits=True, halting="cdf")
    return {
        (fill, thr, src): lj.generate(looped, ids, mask, q_threshold=thr, cache_fill=fill, q_source=src, **kw)
        for fill, thr, src in EARLY_EXIT_RUNS
    }


@pytest.mark.parametrize("fill", ["latest", "skip"])
def test_early_exit_equals_naive_decoder(fill, looped, batch, early_exit):
    ids, mask = batch
    for run in [r for r in EARLY_EXIT_RUNS if r[0] == fill]:
        _, thr, src = run
        out = early_exit[run]
        for b, prompt in enumerate(_rows(ids, mask)):
            for t in range(NEW):
                # Recorded depths: the prompt's positions took exit_depth[b, 0]; generated token s exited at exit_depth[b, s + 1].
                seq = np.concatenate([prompt, out.tokens[b, :t]])
                exits = np.concatenate([np.full(len(prompt), out.exit_depth[b, 0]), out.exit_depth[b, 1 : t + 1]])
                logits, qs = naive_decoder(looped, seq, exits, fill)
                np.testing.assert_allclose(out.logits[b, t], logits, atol=1e-5, err_msg=f"{run} row {b} token {t}")
                assert out.tokens[b, t] == logits.argmax()
                # The exit decision itself: the naive q's under the cdf rule give the recorded depth.
                assert cdf_exit(qs[src], thr) == out.exit_depth[b, t], (run, b, t, qs[src])
    # The test needs exits spread over several depths and varying within rows, and a step whose depth
    # loop stopped early (every row halted) followed by a token that runs deeper.
    depths = np.stack([early_exit[(fill, thr, Q_SOURCES[0])].exit_depth for thr in CDF_THRESHOLDS])
    assert len(np.unique(depths)) >= 3, depths
    assert any(len(np.unique(row)) > 1 for d in depths for row in d), depths
    deepest = depths[0].max(axis=0)  # per step: the depth the loop ran to
    assert any(deepest[t2] > deepest[t1] for t1 in range(NEW) for t2 in range(t1 + 1, NEW)), depths[0]


def test_fill_rules_differ_and_naive_tells_them_apart(looped, batch, early_exit):
    """`latest` and `skip` give different continuations, and the naive decoder of the other rule does not match."""
    ids, mask = batch
    thr = CDF_THRESHOLDS[1]
    latest, skip = early_exit[("latest", thr, Q_SOURCES[0])], early_exit[("skip", thr, Q_SOURCES[0])]
    assert np.abs(latest.logits - skip.logits).max() > 1e-3
    b = int(np.argmax([len(np.unique(r)) for r in latest.exit_depth]))  # a row whose exits vary
    prompt = _rows(ids, mask)[b]
    worst = 0.0
    for t in range(1, NEW):
        seq = np.concatenate([prompt, latest.tokens[b, :t]])
        exits = np.concatenate([np.full(len(prompt), latest.exit_depth[b, 0]), latest.exit_depth[b, 1 : t + 1]])
        worst = max(worst, float(np.abs(naive_decoder(looped, seq, exits, "skip")[0] - latest.logits[b, t]).max()))
    assert worst > 1e-3


def test_batch_equals_each_prompt_alone(looped, batch, early_exit):
    """The batch (prompts of lengths 9, 6, 6, padded left and right) against each prompt alone, with
    per-sample early exit (the post-gate q run: the most varied exits)."""
    _, thr, src = EARLY_EXIT_RUNS[-1]
    together = early_exit[EARLY_EXIT_RUNS[-1]]
    for b, prompt in enumerate(_rows(*batch)):
        alone = lj.generate(
            looped, prompt, max_new_tokens=NEW, stop_tokens=[], return_logits=True, halting="cdf", q_threshold=thr, q_source=src
        )
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[b])
        np.testing.assert_array_equal(alone.exit_depth[0], together.exit_depth[b])
        np.testing.assert_allclose(alone.logits[0], together.logits[b], atol=1e-5)
    assert len(np.unique(together.exit_depth)) > 2


# --- sampling, stop tokens, errors ------------------------------------------------------------------


def test_sampling_follows_top_k_top_p_distribution_and_seed(base):
    """400 copies of one prompt, temperature 0.8, top_k 6, top_p 0.8: the first token's frequencies
    match the filtered, renormalised softmax; a seed reproduces its tokens, another seed does not."""
    prompt = np.tile(np.array([[5, 17, 33, 2, 99]]), (400, 1))
    kw = dict(max_new_tokens=3, stop_tokens=[], temperature=0.8, top_k=6, top_p=0.8, return_logits=True)
    a = lj.generate(base, prompt, seed=1, **kw)
    np.testing.assert_array_equal(a.tokens, lj.generate(base, prompt, seed=1, **kw).tokens)
    assert (a.tokens != lj.generate(base, prompt, seed=2, **kw).tokens).any()
    # The expected distribution, by hand: softmax(logits / T) over the 6 largest, then the smallest
    # prefix (by probability) whose mass reaches 0.8, renormalised.
    logits = a.logits[0, 0].astype(np.float64) / 0.8
    order = np.argsort(-logits)[:6]
    p = np.exp(logits[order] - logits[order].max())
    p /= p.sum()
    keep = np.concatenate([[True], np.cumsum(p)[:-1] < 0.8])
    want = np.zeros(CFG.vocab_size)
    want[order[keep]] = p[keep] / p[keep].sum()
    assert 2 <= keep.sum() < 6, "the filters should both cut"
    freq = np.bincount(a.tokens[:, 0], minlength=CFG.vocab_size) / 400
    assert set(np.flatnonzero(freq)) <= set(order[keep])
    # Binomial standard error of each frequency; 5 sigma keeps false failures below 1e-5.
    sigma = np.sqrt(want * (1 - want) / 400)
    assert (np.abs(freq - want) <= 5 * sigma + 1e-9).all(), (freq[order], want[order])
    # Later tokens are sampled too: the rows diverge.
    assert len({tuple(r) for r in a.tokens}) > 10


def test_stop_tokens_end_a_row_while_others_go_on(base, batch):
    ids, mask = batch
    free = lj.generate(base, ids, mask, max_new_tokens=NEW, stop_tokens=[], return_logits=True)
    # A stop token that row r first emits at step s > 0 and that some other row never emits.
    r, s, stop = next(
        (r, s, int(x))
        for r in range(3)
        for s, x in enumerate(free.tokens[r])
        if 0 < s < NEW - 1 and x not in free.tokens[r, :s] and any(x not in free.tokens[o] for o in range(3) if o != r)
    )
    out = lj.generate(base, ids, mask, max_new_tokens=NEW, stop_tokens=[stop], pad_token_id=7, return_logits=True)
    np.testing.assert_array_equal(out.tokens[r, : s + 1], free.tokens[r, : s + 1])
    assert (out.tokens[r, s + 1 :] == 7).all() and out.lengths[r] == s + 1 and (out.exit_depth[r, s + 1 :] == 0).all()
    for o in range(3):
        if stop not in free.tokens[o]:
            np.testing.assert_array_equal(out.tokens[o], free.tokens[o])
            assert out.lengths[o] == NEW
    # When every row stops, the loop ends and the output is cut at the longest row.
    firsts = list({int(t) for t in free.tokens[:, 0]})
    early = lj.generate(base, ids, mask, max_new_tokens=NEW, stop_tokens=firsts, return_logits=True)
    assert early.tokens.shape == (3, 1) and (early.lengths == 1).all()


def test_bad_inputs_are_clear_errors(base, looped, batch):
    ids, mask = batch
    long = np.ones((1, CFG.max_position_embeddings + 1), np.int32)
    for model, kw, text in [
        (base, dict(input_ids=long, attention_mask=None), "exceeds the model's context"),
        (base, dict(input_ids=long[:, :-8], attention_mask=None), "exceeds the model's context"),  # + 8 new does not fit
        (base, dict(n_recursion=2), "looped models only"),
        (looped, dict(cache_fill="deepest"), "unknown cache_fill"),
        (looped, dict(halting="sometimes"), "unknown halting strategy"),
        (base, dict(temperature=-1.0), "temperature must be"),
        (base, dict(top_p=1.5, temperature=1.0), "top_p must"),
        (base, dict(max_new_tokens=0), "max_new_tokens must be"),
        (base, dict(stop_tokens=[CFG.vocab_size]), "outside the vocabulary"),
        (base, dict(attention_mask=np.zeros_like(mask)), "at least one real token"),
    ]:
        args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW) | kw
        with pytest.raises(lj.LoopusError, match=text):
            lj.generate(model, **args)


# --- transformers' generate -------------------------------------------------------------------------


def _hf_greedy(hf, rows, new, pad):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = torch.as_tensor(np.asarray(r)), 1
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, width:].numpy()
    return tokens, np.stack([x.float().numpy() for x in out.logits], axis=1)


def _ours_greedy(model, rows, new, pad, stop, **kw):
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return lj.generate(model, ids, mask, max_new_tokens=new, stop_tokens=stop, pad_token_id=pad, return_logits=True, **kw)


def test_greedy_equals_transformers_on_tiny_model(tiny_hf):
    """Mistral with a sliding window of 4 (Llama weights otherwise): the window applies to cached keys too."""
    path, hf = tiny_hf("mistral")
    model, _ = lj.load(path)
    rows = [[5, 17, 33, 2, 99, 45, 8], [7, 64, 3], [12, 88, 21, 50, 60]]
    # HF stops a row at its config EOS (2) and pads it with pad_token_id: the same rule for ours.
    theirs, their_logits = _hf_greedy(hf, rows, NEW, pad=0)
    ours = _ours_greedy(model, rows, NEW, pad=0, stop=[2])
    np.testing.assert_array_equal(ours.tokens, theirs[:, : ours.tokens.shape[1]])
    assert (theirs[:, ours.tokens.shape[1] :] == 0).all()
    for b in range(len(rows)):
        n = ours.lengths[b]
        np.testing.assert_allclose(ours.logits[b, :n], their_logits[b, :n], atol=1e-4)


@pytest.mark.slow
def test_greedy_equals_transformers_on_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = lj.load(lj.default_model_path())
    lj.save(model, tmp_path / "hf", format="hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    rows = [tok("The capital of France is")["input_ids"], tok("def fibonacci(n):\n    ")["input_ids"]]
    theirs, their_logits = _hf_greedy(hf, rows, 16, pad=0)
    # The layer loop as a scan (the tiny-model tests run the default, unrolled on CPU): both paths are tested.
    ours = _ours_greedy(model, rows, 16, pad=0, stop=[hf.generation_config.eos_token_id], scan_layers=True)
    np.testing.assert_array_equal(ours.tokens, theirs[:, : ours.tokens.shape[1]])
    for b in range(len(rows)):
        n = ours.lengths[b]
        np.testing.assert_allclose(ours.logits[b, :n], their_logits[b, :n], atol=1e-2)


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama with the word-level tokenizer of test_cli (vocabulary 24)."""
    from test_cli import VOCAB, _tokenizer

    path, _ = make_tiny_hf("llama", tmp_path_factory.mktemp("gen") / "llama", vocab_size=len(VOCAB))
    _tokenizer().save_pretrained(path)
    return path


def _cli(capsys, *args):
    code = cli.main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_text_and_json(tiny_checkpoint, capsys, tmp_path):
    model, tok = lj.load(tiny_checkpoint)
    want = lj.generate(model, tok("the cat sat on")["input_ids"], max_new_tokens=6, stop_tokens=[tok.eos_token_id])
    code, out, err = _cli(capsys, "--model", tiny_checkpoint, "--prompt", "the cat sat on", "--max-new-tokens", 6, "--json")
    assert code == 0 and err == ""
    res = json.loads(out)
    r = res["results"][0]
    assert r["tokens"] == want.tokens[0, : want.lengths[0]].tolist()
    assert r["exit_depths"] == [0] * len(r["tokens"]) and res["mean_exit_depth"] == 0.0
    assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
    assert res["new_tokens"] == len(r["tokens"]) and res["tokens_per_s"] > 0
    code, out, err = _cli(capsys, "--model", tiny_checkpoint, "--prompt", "the cat sat on", "--max-new-tokens", 6)
    assert code == 0 and out == r["text"] + "\n"
    # A prompts file: one result per non-empty line (batches of 1: the shapes compiled above), same tokens for the same prompt.
    f = tmp_path / "prompts.txt"
    f.write_text("the cat sat on\n\na big red dog\n")
    code, out, _ = _cli(
        capsys, "--model", tiny_checkpoint, "--prompts-file", f, "--max-new-tokens", 6, "--batch-size", 1, "--json"
    )
    res2 = json.loads(out)
    assert code == 0 and [x["prompt"] for x in res2["results"]] == ["the cat sat on", "a big red dog"]
    assert res2["results"][0]["tokens"] == r["tokens"]


@pytest.mark.parametrize(
    "args,text",
    [
        (["--prompts-file", "/nonexistent/prompts.txt"], "does not exist"),
        (["--prompt", "the cat", "--prompts-file", "x.txt"], "exactly one of --prompt"),
        ([], "exactly one of --prompt"),
        (["--prompt", "the cat", "--chat"], "no chat template"),
        (["--prompt", "the cat", "--n-recursion", "3"], "apply to looped models"),
        (["--prompt", "the cat", "--temperature", "-1"], "temperature must be"),
        (["--prompt", "the cat", "--cache-fill", "deepest"], "unknown cache_fill"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tiny_checkpoint, capsys, args, text):
    code, out, err = _cli(capsys, "--model", tiny_checkpoint, "--max-new-tokens", 4, *args)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopus: error: ") and text in lines[0], err
