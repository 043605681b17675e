"""`loopus eval ppl` and `loopus_jax.eval.perplexity` against the same definition computed with torch.

Definition (see `loopus eval ppl --help`): tokenize the text without special tokens, prepend BOS, cut
into consecutive non-overlapping windows of max_length tokens (the last may be shorter), score each
window on its own (its first token is not predicted), ppl = exp(total NLL / predicted tokens).

The tiny model uses a word-level tokenizer built here, so the token ids of a text are known exactly
and the windowing arithmetic can be checked by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import loopus_jax as lj
from loopus_jax.errors import LoopusError
from loopus_jax.eval.perplexity import perplexity, perplexity_of_ids, tokenize_for_ppl

LOOPUS = [sys.executable, "-m", "loopus_jax"]
WORDS = "the a cat dog sat on mat and ran to house big small red blue is was it of in".split()
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
BOS = VOCAB["<s>"]
MAX_LEN = 16


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LOOPUS, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def _text(n_words: int, seed: int) -> tuple[str, list[int]]:
    """A text of n_words vocabulary words (extra spaces and newlines included) and its token ids."""
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    seps = rng.choice([" ", "  ", "\n"], size=n_words - 1)
    text = words[0] + "".join(s + w for s, w in zip(seps, words[1:])) + "\n"
    return text, [VOCAB[w] for w in words]


def _torch_ppl(model: torch.nn.Module, ids: list[int], max_length: int) -> tuple[int, float, float]:
    """The definition, independently: each window alone through the HF model, float64 sums."""
    total, count = 0.0, 0
    for start in range(0, len(ids), max_length):
        w = ids[start : start + max_length]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1)
        total -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        count += len(w) - 1
    return count, total, math.exp(total / count)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ppl") / "tiny_llama"
    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=BOS,
        eos_token_id=VOCAB["</s>"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # far from uniform predictions, so the NLL depends on every weight and position
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            else:
                torch.nn.init.normal_(p, std=1.0 if "embed" in name else 2 * p.shape[-1] ** -0.5)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def loaded(tiny):
    return lj.load(tiny[0])


def test_tokenizer_is_found_and_tokenizes_as_built(loaded):
    _, tok = loaded
    assert tok is not None and tok.bos_token_id == BOS
    text, ids = _text(20, seed=1)
    assert tokenize_for_ppl(tok, text) == [BOS, *ids]


@pytest.mark.parametrize(
    "n_words, windows",
    [
        (52, [16, 16, 16, 5]),  # 53 tokens with BOS: last window shorter (not a multiple of max_length)
        (63, [16, 16, 16, 16]),  # exactly 4 windows
        (48, [16, 16, 16, 1]),  # a 1-token last window predicts nothing
        (9, [10]),  # one window shorter than max_length
    ],
)
def test_api_matches_torch(tiny, loaded, n_words, windows):
    _, hf = tiny
    model, tok = loaded
    text, ids = _text(n_words, seed=n_words)
    full = [BOS, *ids]
    assert [len(full[i : i + MAX_LEN]) for i in range(0, len(full), MAX_LEN)] == windows
    count, nll, ppl = _torch_ppl(hf, full, MAX_LEN)
    assert count == sum(w - 1 for w in windows)
    for bs in (1, 3, 8):
        r = perplexity(model, tok, text, max_length=MAX_LEN, batch_size=bs)
        assert r.tokens == count, bs
        assert r.nll == pytest.approx(nll, rel=1e-4), bs
        assert r.ppl == pytest.approx(ppl, rel=1e-4), bs
        assert r.ppl == pytest.approx(math.exp(r.nll / r.tokens), rel=1e-12)
    assert 1.5 < ppl < 1e4  # random weights, but not uniform: ppl != vocab size
    assert abs(ppl - len(VOCAB)) > 1


def test_batch_sizes_agree_closely(loaded):
    model, tok = loaded
    text, _ = _text(100, seed=7)  # 101 tokens: windows 6 x 16 + 5; batch 3 pads the last batch with copies
    rs = [perplexity(model, tok, text, max_length=MAX_LEN, batch_size=bs) for bs in (1, 2, 3, 7, 16)]
    assert len({r.tokens for r in rs}) == 1 and rs[0].tokens == 6 * 15 + 4
    for r in rs[1:]:
        assert r.nll == pytest.approx(rs[0].nll, rel=1e-5)


def test_windows_are_scored_independently(tiny, loaded):
    """A whole-sequence score differs from the windowed one: the windows really restart context."""
    _, hf = tiny
    model, _ = loaded
    _, ids = _text(40, seed=3)
    full = [BOS, *ids]
    one_window = perplexity_of_ids(model, full, max_length=len(full))
    windowed = perplexity_of_ids(model, full, max_length=MAX_LEN)
    assert one_window.tokens == len(full) - 1
    assert windowed.tokens == len(full) - 3  # 41 tokens -> windows 16, 16, 9
    assert one_window.nll == pytest.approx(_torch_ppl(hf, full, len(full))[1], rel=1e-4)
    assert abs(one_window.nll / one_window.tokens - windowed.nll / windowed.tokens) > 1e-3


def test_cli_matches_torch(tiny):
    """--json with batch 3 (the last batch padded with copies) and the plain line with batch 1."""
    path, hf = tiny
    text, ids = _text(52, seed=52)
    f = path.parent / "text52.txt"
    f.write_text(text, encoding="utf-8")
    count, nll, ppl = _torch_ppl(hf, [BOS, *ids], MAX_LEN)
    assert count == 49  # 53 tokens: windows 16, 16, 16, 5
    common = ("eval", "ppl", "--model", str(path), "--text-file", str(f), "--max-length", str(MAX_LEN))
    proc = _run(*common, "--batch-size", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"tokens", "nll", "ppl"}
    assert out["tokens"] == count
    assert out["nll"] == pytest.approx(nll, rel=1e-4)
    assert out["ppl"] == pytest.approx(ppl, rel=1e-4)

    proc = _run(*common, "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"perplexity (\S+) over (\d+) predicted tokens \(nll (\S+)\)\n", proc.stdout)
    assert m, proc.stdout
    assert int(m[2]) == count
    assert float(m[1]) == pytest.approx(ppl, rel=1e-4)
    assert float(m[3]) == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_bad_max_length(loaded, max_length):
    model, tok = loaded
    with pytest.raises(LoopusError, match="max_length must be at least 2"):
        perplexity(model, tok, "the cat", max_length=max_length)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(loaded, batch_size):
    model, tok = loaded
    with pytest.raises(LoopusError, match="batch_size"):
        perplexity(model, tok, "the cat sat on the mat and the dog ran", max_length=4, batch_size=batch_size)


def test_too_short_text(loaded):
    model, tok = loaded
    with pytest.raises(LoopusError, match="fewer than 2 tokens"):
        perplexity(model, tok, "   ")  # BOS alone


ENGLISH = """\
The old lighthouse stood at the end of a narrow spit of rock, and for more than a hundred years it had
warned ships away from the shoals that lay hidden beneath the grey water. The keeper lived alone in a small
stone cottage at its foot. Every evening he climbed the spiral stairs, trimmed the wick, polished the great
lens and watched the beam sweep out across the sea.

In the spring the village below the cliffs came back to life. Fishermen repaired their nets on the harbour
wall, children ran along the beach looking for crabs in the pools, and the baker opened his shop before
dawn so that the smell of fresh bread drifted up the hill. The keeper walked down once a week to buy
flour, coffee and oil for the lamp, and he always stopped to talk with the harbour master about the
weather and the boats that had come in.

One summer a young woman arrived with a notebook and a camera. She was writing a book about the
lighthouses of the coast, she said, and she wanted to know how the light had been kept burning through
storms, wars and long winters. The keeper was not used to visitors, but he showed her the logbooks that
his predecessors had filled with careful handwriting: the dates of every storm, the names of the ships
that had passed, and the small repairs that had kept the old machinery running.

She stayed for three days. When she left, she promised to send him a copy of the book. A year later a
parcel arrived at the cottage. Inside was the book, and on the first page she had written a short note
thanking him for his patience and his stories. He placed it on the shelf beside the logbooks, where it
remained for the rest of his life.

Today the light is automatic, and nobody lives in the cottage anymore. But visitors still walk out along
the rocks in the evening to watch the beam turn slowly over the water, just as it has always done.
"""


@pytest.mark.slow
def test_default_model_ppl_is_sane(tmp_path):
    """SmolLM2-135M-Instruct on plain English prose.

    A working 135M model gets a perplexity of roughly 5-30 on simple narrative English. The bounds are
    wide on purpose but still catch real breakage: a uniform guess over its 49152-token vocabulary is
    49152, and a mis-converted model (wrong RoPE, unpermuted q/k, a dropped norm) lands in the hundreds
    or thousands; below 2 would mean the targets leak into the context (an off-by-one in scoring).
    """
    assert 280 <= len(ENGLISH.split()) <= 400
    f = tmp_path / "english.txt"
    f.write_text(ENGLISH, encoding="utf-8")
    proc = _run("eval", "ppl", "--model", "default", "--text-file", str(f), "--max-length", "256", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = json.loads(proc.stdout)
    assert 300 < out["tokens"] < 700
    assert 2 < out["ppl"] < 60, out
    assert out["ppl"] == pytest.approx(math.exp(out["nll"] / out["tokens"]), rel=1e-9)


def test_looped_perplexity_records_each_windows_q(loaded):
    """The perplexity pass hands back the q its forward computed, window by window ([windows, N]), so the
    demo calibrates its exit threshold without a second forward: each row equals `forward`'s q of that
    window alone (checked for the full windows). Tolerance 1e-6: the same float32 q, computed in a batch
    with other (padded) windows; rows are independent, so only rounding can differ. The demo's threshold
    is the median over the full windows only, the last (shorter) one left out."""
    from loopus_jax.demo import median_q
    from loopus_jax.loop.model import loop_model

    base, _ = loaded
    _, words_ = _text(52, seed=52)
    full = [BOS, *words_]  # windows of 16, 16, 16, 5; batches of 3: the second is the short window and 2 copies
    base_ppl = perplexity_of_ids(base, full, max_length=MAX_LEN, batch_size=3)
    assert base_ppl.q is None and "q" not in base_ppl.to_dict()
    looped = loop_model(base, "none", "1-", n_recursion=3, seed=0)
    got = perplexity_of_ids(looped, full, max_length=MAX_LEN, batch_size=3, n_recursion=3, halting="none")
    rows = np.asarray(full[: 3 * MAX_LEN]).reshape(3, 1, MAX_LEN)  # the full windows, one forward each
    alone = np.concatenate([np.asarray(lj.forward(looped, r, n_recursion=3, halting="none").q) for r in rows])
    assert got.q.shape == (4, 3) and np.all((got.q > 0) & (got.q < 1))
    np.testing.assert_allclose(got.q[:3], alone, atol=1e-6)
    assert "q" not in got.to_dict()
    assert np.ptp(alone) > 1e-3 and abs(np.median(got.q) - np.median(alone)) > 1e-6  # leaving the short one out matters
    assert median_q(got, len(full), MAX_LEN) == pytest.approx(float(np.median(alone)), abs=1e-6)
