"""The batched scorer against one-request-at-a-time scoring, rolling windows against lm-eval's, bad
inputs, and `loopus eval sweep` against `loopus eval tasks`.

The reference for a request is computed independently: its row (context + continuation, left-truncated
to max_length + 1, last token dropped) alone through `loopus_jax.forward` (right-padded to one width), log-softmax
in float64 NumPy.
Tolerance 1e-4 absolute: float32 logits move by ~1e-6 with batch shape and padding; sums of <= 64 terms.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_eval_lm_eval import tiny_eval_model, write_arc_easy, write_wikitext

import loopus_jax as lj
from loopus_jax.cli import main
from loopus_jax.errors import LoopusError
from loopus_jax.eval.requests import Encoder, Loglikelihood, Rolling
from loopus_jax.eval.runner import evaluate
from loopus_jax.eval.scorer import Scorer, length_buckets
from loopus_jax.eval.tasks import resolve


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_eval_model(tmp_path_factory)


@pytest.fixture(scope="module")
def base(model_dir):
    return lj.load(model_dir)


@pytest.fixture(scope="module")
def looped(base):
    from loopus_jax.loop.model import loop_model

    return loop_model(base[0], "0", "2-", n_recursion=3, seed=1), base[1]


def _naive(model, pairs, max_length, **options):
    """(ll, greedy, exit depth) of each (context ids, continuation ids), one row at a time: the row
    right-padded to a fixed width (one compiled shape; padding after a causal row changes nothing)."""
    out = []
    for ctx, cont in pairs:
        row = (ctx + cont)[-(max_length + 1) :][:-1]
        ids, mask = np.zeros((1, max_length), np.int32), np.zeros((1, max_length), np.int32)
        ids[0, : len(row)], mask[0, : len(row)] = row, 1
        o = lj.forward(model, ids, mask, **options)
        logits = np.asarray(o.logits[0, : len(row)], np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        pos = np.arange(len(row) - len(cont), len(row))
        ll = float(logp[pos, cont].sum())
        greedy = bool((logits[pos].argmax(-1) == np.array(cont)).all())
        out.append((ll, greedy, None if o.exit_depth is None else int(o.exit_depth[0])))
    return out


def _pairs(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Mixed lengths: short, long (beyond max_length 64: left-truncated), shared-context one-token choices,
    and contexts with several multi-token continuations (packed into one row where each row runs to a
    fixed depth): one whose segments overflow max_length (two rows), one of a single token (no shared prefix)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, vocab) for _ in range(n)]
    pairs = [(tok(rng.randint(1, 90)), tok(rng.randint(1, 20))) for _ in range(22)]
    shared = tok(40)
    pairs += [(shared, [t]) for t in tok(4)]  # MMLU-like: one forward pass serves all four
    pairs += [(tok(3), tok(64))]  # a continuation of exactly max_length tokens
    many = tok(20)
    pairs += [(many, c) for c in (tok(5), tok(12), tok(1), tok(30), tok(9))]  # 19 + 57 > 64 tokens: two rows
    one = tok(1)
    pairs += [(one, tok(7)), (one, tok(2))]
    return pairs


def _structure(row) -> tuple[int, int]:
    """(documents, segments) of a scorer row, read off its mask values (odd shared, even segment)."""
    docs = segments = prev = 0
    for v in row.segments:
        docs += v % 2 == 1 and prev % 2 == 0
        segments += v % 2 == 0 and v != prev
        prev = v
    return docs, segments


@pytest.mark.parametrize("which", ["base", "looped_halting", "looped_fixed"])
def test_bucketed_batches_equal_one_request_at_a_time(base, looped, which):
    model, tok = base if which == "base" else looped
    options = {} if which == "base" else {"n_recursion": 3, "halting": "threshold", "q_threshold": 0.5}
    if which == "looped_fixed":
        options = {"n_recursion": 2, "halting": "none"}
    pairs = _pairs(model.config.vocab_size)
    if which != "base":  # fewer length buckets (compiles) for the slower looped model; the base run covers them all
        pairs = [(c[-30:], k[:10]) for c, k in pairs[:26:2] + pairs[26:]]
    ctx = pairs[0][0][-30:]  # a continuation that is the model's own argmax, so is_greedy is True once
    pairs.append((ctx, [int(lj.forward(model, np.array([ctx]), **options).logits[0, -1].argmax())]))
    want = _naive(model, pairs, 64, **options)
    # Rows per bucket chosen for the memory (base), or a fixed 3 that leaves partial batches (looped).
    scorer = Scorer(model, tok, batch_size=None if which == "base" else 3, show_progress=False, **options)
    got = scorer.score_pairs(pairs)
    # (documents, segments) per row. Packed: the 20-token context's five continuations in one document
    # (3 + 2 where they overflow max_length), the one-token context's two in one that starts its row, and
    # on one device several documents per row. Under halting every pair (or one-token group) is alone.
    shapes = [_structure(r) for r in scorer._rows(pairs)]
    if which == "looped_halting":
        assert {s for _, s in shapes} == {0} and len(shapes) == 20
    else:
        assert {(0, 2), *([(1, 3), (1, 2)] if which == "base" else [(1, 5)])} <= set(shapes)
        assert max(d for d, _ in shapes) >= 2
    for (ll, greedy, depth), s in zip(want, got):
        assert s.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert s.is_greedy == greedy
        assert s.exit_depth == depth
    if which == "looped_halting":
        assert len({d for *_, d in want}) > 1  # halting really differs per row, so batching could have mixed them up
    assert any(g for _, g, _ in want) and not all(g for _, g, _ in want)


def test_rolling_windows_are_lm_evals():
    lm_utils = pytest.importorskip("lm_eval.utils")
    from loopus_jax.eval.requests import disjoint, rolling_token_windows

    rng = random.Random(0)
    for n in (0, 1, 5, 63, 64, 65, 200, 513):
        tokens = [rng.randrange(100) for _ in range(n)]
        for max_len in (2, 16, 64):
            want = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 7, max_len, 1)]
            assert [disjoint(w) for w in rolling_token_windows(tokens, 7, max_len, 1)] == want
            assert [t for _, c in want for t in c] == tokens  # every token predicted exactly once


def test_encoder_moves_trailing_spaces_and_splits_the_whole_encoding(base):
    _, tok = base
    enc = Encoder(tok)
    ctx, cont = enc.pair("Question: the river  ", "flows")
    whole = tok.encode("Question: the river  flows")
    assert ctx == tok.encode("Question: the river") and ctx + cont == whole
    assert enc.pair("", " flows") == ([tok.bos_token_id], tok.encode(" flows", add_special_tokens=False))


def test_rolling_request_sums_its_windows(base):
    model, tok = base
    text = " ".join(["the river and the mountain engine"] * 30)  # ~180 tokens: 3 windows of 64
    sc = Scorer(model, tok, show_progress=False)
    (r,) = sc.score([Rolling(text)])
    windows = Encoder(tok).rolling_windows(text, 64)
    assert len(windows) == 3
    assert r.loglikelihood == pytest.approx(sum(ll for ll, *_ in _naive(model, windows, 64)), abs=3e-4)  # 3 sums of 1e-4
    (single,) = sc.score([Loglikelihood("the river", " and the")])
    assert single.loglikelihood == pytest.approx(_naive(model, [Encoder(tok).pair("the river", " and the")], 64)[0][0], abs=1e-4)


def test_length_buckets_are_few_and_cover():
    b = length_buckets(8193)
    assert b[:9] == [16, 20, 24, 28, 32, 40, 48, 56, 64] and b[-1] == 8193 and len(b) <= 40
    assert all(y <= 1.25 * x for x, y in zip(b, b[1:-1]))


# Bad inputs: one clear LoopusError naming the expected layout.
HS_ROW = '{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": "e", "label": 0}\n'
OBQA_ROW = '{"question": {"stem": "s", "choices": [{"text": "t", "label": "A"}]}, "answerKey": "B"}\n'
BAD_FILES = {  # task: (file, content, what the message must say)
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl", '{"id": 1, "question": {"stem": "q"}}\n', "question.choices"),
    "piqa": ("piqa/valid.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b"}\nnot json\n', "not JSON"),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", HS_ROW, "endings"),
    "winogrande": ("winogrande/dev.jsonl", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n', "blank"),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl", '{"txt": "a b"}\n', "'text'"),
    "mmlu_anatomy": ("mmlu/test/anatomy_test.csv", "q,a,b,c,d,E\n", "not one of A, B, C, D"),
    "openbookqa": ("openbookqa/test.jsonl", OBQA_ROW, "answerKey"),
}


@pytest.mark.parametrize("task", sorted(BAD_FILES))
def test_malformed_file_is_a_clear_error(tmp_path, task):
    rel, content, why = BAD_FILES[task]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text(content)
    if task == "piqa":
        (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    (t,) = resolve(task)
    with pytest.raises(LoopusError) as e:
        t.docs(tmp_path)
    msg = str(e.value)
    assert why in msg and "expected" in msg and rel in msg


def test_piqa_label_count_mismatch_and_missing_file(tmp_path):
    (t,) = resolve("piqa")
    with pytest.raises(LoopusError, match=r"piqa/valid.jsonl not found; expected piqa/valid.jsonl \(one \{goal, sol1, sol2\}"):
        t.docs(tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(LoopusError, match="2 labels for 1 rows"):
        t.docs(tmp_path)


def test_unknown_task_and_missing_data_dir_on_the_command_line(tmp_path, capsys):
    with pytest.raises(LoopusError, match=r"unknown task 'arc_hard'; known tasks: arc_easy, arc_challenge, .*mmlu"):
        resolve("arc_easy,arc_hard")
    assert main(["eval", "tasks", "--model", "default", "--tasks", "arc_hard", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loopus: error: unknown task 'arc_hard'") and len(err.splitlines()) == 1
    assert main(["eval", "tasks", "--model", "default", "--tasks", "piqa", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "data directory" in err and "piqa/valid.jsonl (one {goal, sol1, sol2}" in err
    assert main(["eval", "tasks", "--model", "default", "--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
    assert "piqa/valid.jsonl not found; expected" in capsys.readouterr().err


def test_looped_options_on_a_base_model_are_an_error(base):
    with pytest.raises(LoopusError, match="apply to looped models only"):
        Scorer(*base, n_recursion=4)


# `loopus eval sweep` on a tiny looped model against `loopus eval tasks` at each N.
def test_sweep_equals_eval_tasks_at_each_depth(tmp_path_factory, looped, base):
    tmp = tmp_path_factory.mktemp("sweep")
    data = tmp / "data"
    write_arc_easy(data / "arc_easy/ARC-Easy-Test.jsonl", n=3)
    write_wikitext(data / "wikitext-2-raw/wiki.test.raw", pages=1)
    ckpt, base_ckpt = tmp / "looped", tmp / "base"
    lj.save(looped[0], ckpt, tokenizer=looped[1])
    lj.save(base[0], base_ckpt, tokenizer=base[1])
    common = ["--tasks", "arc_easy,wikitext", "--data-dir", str(data), "--limit", "3"]
    assert main(["eval", "sweep", "--model", str(ckpt), *common, "--n-recursion", "1,2", "--base", str(base_ckpt),
                 "--halting", "threshold", "--q-threshold", "0.5", "--out", str(tmp / "sw")]) == 0  # fmt: skip
    sw = json.loads((tmp / "sw/sweep.json").read_text())
    png = (tmp / "sw/sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert [r["n_recursion"] for r in sw["runs"]] == [1, 2]
    for run in sw["runs"]:
        out = tmp / f"tasks_{run['n_recursion']}"
        argv = ["eval", "tasks", "--model", str(ckpt), *common, "--n-recursion", str(run["n_recursion"])]
        assert main([*argv, "--halting", "threshold", "--q-threshold", "0.5", "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())
        assert run["mean_exit_depth"] == res["mean_exit_depth"]
        for task in ("arc_easy", "wikitext"):
            for metric, value in run["scores"][task].items():
                assert value == res["results"][task][metric], (run["n_recursion"], task, metric)
    assert sw["runs"][0]["mean_exit_depth"] == 1.0 and 1.0 <= sw["runs"][1]["mean_exit_depth"] <= 2.0
    want_base = evaluate(base[0], base[1], resolve("arc_easy,wikitext"), data, limit=3, show_progress=False)
    assert sw["base"]["scores"]["wikitext"]["word_perplexity"] == want_base["results"]["wikitext"]["word_perplexity"]
    with pytest.raises(LoopusError, match="comma-separated integers"):
        from loopus_jax.eval.sweep import parse_depths

        parse_depths("1,two")


MESH_SCRIPT = """
import json, sys
import numpy as np
import loopus_jax as lj
from loopus_jax.eval.scorer import Scorer
from loopus_jax.api import place_batch

path, pairs_file, out = sys.argv[1:]
pairs = json.load(open(pairs_file))
sharded, tok = lj.load(path, mesh="data=4,fsdp=1,tensor=1")
single, _ = lj.load(path)
res = {}
for name, m in (("mesh", sharded), ("single", single)):
    res[name] = [s.loglikelihood for s in Scorer(m, tok, batch_size=3, show_progress=False).score_pairs(pairs)]
ids = np.array([p[0][:8] for p in pairs[:4]], np.int32)
res["devices"] = len(place_batch(sharded, ids)[0].sharding.device_set)  # how the scorer places each batch
json.dump(res, open(out, "w"))
"""


def test_scoring_on_a_data_parallel_mesh_matches_one_device(tmp_path, model_dir, base):
    """4 fake CPU devices (a subprocess: the device count is fixed when JAX starts); batch size 3 is
    rounded up to a multiple of the data axis; scores equal one device's within 1e-4."""
    import os
    import subprocess
    import sys

    pairs = [p for p in _pairs(base[0].config.vocab_size) if len(p[0]) + len(p[1]) < 60][:10]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "run.py").write_text(MESH_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = [sys.executable, str(tmp_path / "run.py"), str(model_dir), str(tmp_path / "pairs.json"), str(tmp_path / "res.json")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["devices"] == 4
    np.testing.assert_allclose(res["mesh"], res["single"], atol=1e-4)


def test_packed_segments_positions_and_visibility_by_hand(base):
    """`make_context`'s packing convention written out by hand: odd values are shared tokens, even ones
    segments that see their document's shared tokens and themselves, at positions continuing from the
    shared tokens; a shared token after a segment starts a new document. A 0/1 mask (with a hole) is
    the plain causal mask."""
    from loopus_jax.models import layers as L

    mask = np.array(
        [
            [0, 0, 1, 1, 1, 2, 2, 4, 4, 4],  # left padding, one context, two continuations
            [1, 1, 2, 2, 1, 2, 4, 4, 0, 0],  # two documents, right padding
            [1, 1, 0, 1, 1, 1, 1, 1, 1, 1],  # plain, with a hole
        ],
        np.int32,
    )
    positions = [[0, 0, 0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 0, 1, 1, 2], [0, 1, 1, 2, 3, 4, 5, 6, 7, 8]]
    sees = [
        {2: [2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 3, 4, 5], 6: [2, 3, 4, 5, 6], 7: [2, 3, 4, 7], 8: [2, 3, 4, 7, 8]},
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [4], 5: [4, 5], 6: [4, 6], 7: [4, 6, 7]},
        {q: [k for k in range(q + 1) if k != 2] for q in range(10) if q != 2},
    ]
    sees[0][9] = [2, 3, 4, 7, 8, 9]
    got_pos = np.asarray(L.positions_from_mask(mask))
    got_mask = np.asarray(L.make_context(base[0].config, mask).mask)[:, 0]
    for r in range(3):
        real = sorted(sees[r])
        np.testing.assert_array_equal(got_pos[r, real] if r == 1 else got_pos[r], positions[r])
        for q, keys in sees[r].items():
            want = np.zeros(10, bool)
            want[keys] = True
            np.testing.assert_array_equal(got_mask[r, q], want, err_msg=f"row {r}, query {q}")
    np.testing.assert_array_equal(np.asarray(L.last_valid_index(mask)), [9, 7, 9])


def test_interrupted_scoring_resumes_from_its_cache(tmp_path, base):
    """Ctrl-C after two batches keeps those batches' scores on disk, bit for bit; a rerun scores only the
    rest (in batches of their own: within the module's 1e-4 of the uninterrupted run) and survives a
    line cut short by a kill."""
    model, tok = base
    pairs = _pairs(model.config.vocab_size)
    want = Scorer(model, tok, batch_size=2, show_progress=False).score_pairs(pairs)

    first = Scorer(model, tok, batch_size=2, show_progress=False, cache_dir=tmp_path)
    real_run, calls = first._run, []

    def interrupted(chunk, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append([i for row in chunk for i, _, _ in row.pairs])
        return real_run(chunk, *args)

    first._run = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.score_pairs(pairs)
    done = sorted(i for c in calls for i in c)
    lines = first.cache.path.read_text().splitlines()
    assert len(lines) == len(done) > 0
    with open(first.cache.path, "a") as f:
        f.write('{"k": "0123')  # the half-written line of a killed run

    second = Scorer(model, tok, batch_size=2, show_progress=False, cache_dir=tmp_path)
    assert second.cache.path == first.cache.path and len(second.cache) == len(done)
    real_run2, rescored = second._run, []
    second._run = lambda chunk, *a: (rescored.extend(r for row in chunk for r in row.pairs), real_run2(chunk, *a))[1]
    got = second.score_pairs(pairs)
    assert len(rescored) == len(pairs) - len(done)
    for i, (w, g) in enumerate(zip(want, got)):
        if i in done:  # the interrupted run batched exactly as the uninterrupted one did
            assert (g.loglikelihood, g.is_greedy) == (w.loglikelihood, w.is_greedy)
        assert g.loglikelihood == pytest.approx(w.loglikelihood, abs=1e-4) and g.is_greedy == w.is_greedy

    third = Scorer(model, tok, batch_size=2, show_progress=False, cache_dir=tmp_path)
    third._run = None  # everything is cached now: nothing may run
    assert [s.loglikelihood for s in third.score_pairs(pairs)] == [s.loglikelihood for s in got]


def test_score_cache_is_per_model_and_option(tmp_path, base, looped):
    """A changed weight, recursion depth, threshold or context window gets a file of its own."""
    from flax import nnx

    from loopus_jax.eval.score_cache import weights_digest

    model, tok = base
    path = lambda m, **kw: Scorer(m, tok, show_progress=False, cache_dir=tmp_path, **kw).cache.path
    assert path(model) == path(model)
    assert path(model) != path(model, max_length=32)
    before = weights_digest(model)
    changed = nnx.clone(model)
    w = changed.embed[...]
    changed.embed[...] = w.at[5, 3].add(1e-3)
    assert weights_digest(changed) != before and weights_digest(model) == before
    lm = looped[0]
    names = {path(lm, n_recursion=2), path(lm, n_recursion=3), path(lm, n_recursion=3, halting="threshold", q_threshold=0.5)}
    names.add(path(lm, n_recursion=3, halting="threshold", q_threshold=0.6))
    assert len(names) == 4


def test_eval_tasks_rerun_resumes_from_out(tmp_path, model_dir, capsys):
    """`loopus eval tasks --out` keeps its scores: the same command again scores nothing and writes the same results."""
    data = tmp_path / "data"
    write_arc_easy(data / "arc_easy/ARC-Easy-Test.jsonl", n=3)
    argv = ["eval", "tasks", "--model", str(model_dir), "--tasks", "arc_easy", "--data-dir", str(data)]
    argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 0
    first = json.loads((tmp_path / "o/results.json").read_text())
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming: 12 of 12 scores" in capsys.readouterr().err
    assert json.loads((tmp_path / "o/results.json").read_text()) == first
