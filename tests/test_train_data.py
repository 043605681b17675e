"""The training data pipeline: pad / pack / chat rows against hand-built arrays, seeded shuffling,
per-process shards, held-out documents, and exact resume from a saved iterator state.

The tokenizer is word-level (`w<i>` -> id 9 + i, BOS prepended like Llama's), so every expected
array is written down by hand from the documents.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from loopus_jax.train import data as D
from loopus_jax.train.config import load_config

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
WORDS = SPECIAL + [f"w{i}" for i in range(92)]  # 101 ids: the vocabulary of conftest's tiny models
PAD, BOS, EOS = 0, 1, 2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def w(i: int) -> int:
    return len(SPECIAL) + i


def word_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Word-level: 'w3 w7' -> [BOS, w(3), w(7)]; with `chat`, a ChatML template whose turns end in EOS '<|im_end|>'."""
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        tok.chat_template = CHATML
        tok.eos_token = "<|im_end|>"
    return tok


def words(ix) -> str:
    return " ".join(f"w{i}" for i in ix)


def word_model(root: Path, layers: int, n_docs: int, doc_words: tuple[int, int], first_word: int = 0, name: str = "docs.txt"):
    """A tiny random Llama (conftest's) saved with the word tokenizer, plus `n_docs` random documents of
    `doc_words` words (from `w<first_word>` up) in one blank-line-separated text file.
    Returns (model dir, its torch model, text file)."""
    from conftest import make_tiny_hf

    model_dir, torch_model = make_tiny_hf("llama", root / "model", num_hidden_layers=layers)
    word_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    n_words = len(WORDS) - len(SPECIAL)
    docs = [words(rng.randrange(first_word, n_words) for _ in range(rng.randrange(*doc_words))) for _ in range(n_docs)]
    (root / name).write_text("\n\n".join(docs) + "\n")
    return model_dir, torch_model, root / name


def write_docs(path: Path, docs: list[str], kind: str = "jsonl") -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "other": 1}) + "\n" for d in docs))
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


def config(source: Path, **data):
    sections = {k: data.pop(k) for k in ("train", "eval", "seed") if k in data}
    tree = {"data": {"source": str(source), **data}, "train": {"batch_size": 2}, "eval": {"docs": 0}}
    tree.update(sections)
    return load_config(data=tree)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# Ten documents of 1..10 words: doc k = w(10k) .. w(10k + k), k = 0..9 (ids stay below 101).
DOCS = [words(range(10 * (k % 9), 10 * (k % 9) + k + 1)) for k in range(10)]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("data") / "docs.jsonl", DOCS)


def test_pad_rows_truncate_right_pad_and_ignore_padding(tmp_path, tok):
    # A text file with blank-line separated paragraphs (a stray blank paragraph is dropped).
    src = write_docs(tmp_path / "d.txt", ["w3 w4", "w5 w6 w7 w8 w9 w10 w11", "w1\nw2 w3"], kind="txt")
    it = iter(D.train_dataset(config(src, max_length=5, shuffle=False, train={"batch_size": 3}), tok))
    b = next(it)
    ids = [
        [BOS, w(3), w(4), PAD, PAD],
        [BOS, w(5), w(6), w(7), w(8)],  # truncated to max_length
        [BOS, w(1), w(2), w(3), PAD],  # a paragraph's line break is whitespace
    ]
    mask = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    labels = [[BOS, w(3), w(4), -100, -100], [BOS, w(5), w(6), w(7), w(8)], [BOS, w(1), w(2), w(3), -100]]
    assert {k: v.dtype for k, v in b.items()} == {"input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32}
    np.testing.assert_array_equal(b["input_ids"], ids)
    np.testing.assert_array_equal(b["attention_mask"], mask)
    np.testing.assert_array_equal(b["labels"], labels)
    np.testing.assert_array_equal(next(it)["input_ids"], ids)  # the next epoch (unshuffled) starts over


def test_pack_concatenates_documents_with_eos_and_cuts_rows(tmp_path, tok):
    src = write_docs(tmp_path / "d.jsonl", ["w1 w2", "w3", "w4 w5 w6 w7 w8"])
    it = iter(D.train_dataset(config(src, max_length=4, mode="pack", shuffle=False, train={"batch_size": 1}), tok))
    stream = [BOS, w(1), w(2), EOS, BOS, w(3), EOS, BOS, w(4), w(5), w(6), w(7), w(8), EOS]
    stream = stream + stream  # the second epoch continues the stream
    for r in range(6):
        b = next(it)
        np.testing.assert_array_equal(b["input_ids"], [stream[4 * r : 4 * r + 4]])
        np.testing.assert_array_equal(b["labels"], b["input_ids"])
        np.testing.assert_array_equal(b["attention_mask"], np.ones((1, 4)))


def _expected_chat(tok, messages) -> tuple[list[int], list[int]]:
    """Independent labels: split the rendered ChatML text at the assistant turns with a regex; each
    assistant turn's content and its closing <|im_end|> are labelled, everything else is not."""
    text = tok.apply_chat_template(messages, tokenize=False)
    ids, labels, pos = [], [], 0
    for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S):
        for piece, labelled in ((text[pos : m.start(1)], False), (m.group(1), True)):
            t = tok(piece, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if labelled else [-100] * len(t)
        pos = m.end(1)
    t = tok(text[pos:], add_special_tokens=False)["input_ids"]
    return ids + t, labels + [-100] * len(t)


def test_chat_labels_only_the_assistant_turns():
    tok = word_tokenizer(chat=True)
    messages = [
        {"role": "system", "content": "w1 w2"},
        {"role": "user", "content": "w3 w4 w5"},
        {"role": "assistant", "content": "w6 w7"},
        {"role": "user", "content": "w8"},
        {"role": "assistant", "content": "w9 w10 w11"},
    ]
    ids, labels = _expected_chat(tok, messages)
    assert sum(x != -100 for x in labels) == 2 + 1 + 3 + 1  # two contents and their two <|im_end|>
    row = D.chat_row(tok, messages, 40, PAD)
    n = len(ids)
    np.testing.assert_array_equal(row["input_ids"][:n], ids)
    np.testing.assert_array_equal(row["labels"][:n], labels)
    np.testing.assert_array_equal(row["input_ids"][n:], PAD)
    np.testing.assert_array_equal(row["labels"][n:], -100)
    np.testing.assert_array_equal(row["attention_mask"], [1] * n + [0] * (40 - n))
    assert tok.convert_ids_to_tokens([int(t) for t in row["labels"] if t != -100]) == [
        *"w6 w7 <|im_end|> w9 w10 w11 <|im_end|>".split()
    ]
    # Truncation keeps the labels aligned with the ids.
    short = D.chat_row(tok, messages, 14, PAD)
    np.testing.assert_array_equal(short["input_ids"], ids[:14])
    np.testing.assert_array_equal(short["labels"], labels[:14])


def test_chat_pipeline_reads_messages(tmp_path):
    tok = word_tokenizer(chat=True)
    conv = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": []}) + "\n")
    b = next(iter(D.train_dataset(config(src, mode="chat", max_length=16, shuffle=False, train={"batch_size": 1}), tok)))
    ids, labels = _expected_chat(tok, conv)
    np.testing.assert_array_equal(b["labels"][0, : len(ids)], labels)


def _first_epoch_docs(batches: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t, m in zip(r, mk) if m) for b in batches for r, mk in zip(b["input_ids"], b["attention_mask"])]


def test_seeded_shuffle_is_reproducible_and_seeds_differ(docs_file, tok):
    def order(seed: int) -> list:
        it = iter(D.train_dataset(config(docs_file, max_length=16, seed=seed), tok))
        return _first_epoch_docs(take(it, 5))

    a, b, c = order(1), order(1), order(2)
    assert a == b
    assert a != c
    everything = sorted(tuple(tok(d)["input_ids"]) for d in DOCS)
    assert sorted(a) == everything and sorted(c) == everything  # each epoch is a permutation of the documents


@pytest.mark.parametrize("streaming", [False, True])
def test_two_processes_get_disjoint_shards_covering_the_data(tmp_path, tok, streaming):
    files = [write_docs(tmp_path / f"part{i}.jsonl", DOCS[5 * i : 5 * i + 5]) for i in range(2)]
    # A shuffle window of one shard's size: a stream's first window is exactly its first epoch.
    cfg = config(files[0], max_length=16, streaming=streaming, shuffle_buffer=5)
    cfg.data.source = str(tmp_path / "part*.jsonl")
    cfg.data.format = "json"
    shards = []
    for p in range(2):
        it = iter(D.train_dataset(cfg, tok, process_index=p, process_count=2))
        shards.append(_first_epoch_docs(take(it, 5)))  # batch 2 over 2 processes: 1 row each, 5 rows = half the docs
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(tuple(tok(d)["input_ids"]) for d in DOCS)


@pytest.mark.parametrize("streaming", [False, True])
def test_heldout_documents_are_not_trained_on(docs_file, tok, streaming):
    cfg = config(docs_file, max_length=16, streaming=streaming, shuffle_buffer=4, eval={"docs": 3, "rows": 8})
    held = D.heldout_rows(cfg, tok)
    np.testing.assert_array_equal(
        held["input_ids"], [D.pad_row(tok(d)["input_ids"], None, 16, PAD)["input_ids"] for d in DOCS[:3]]
    )
    trained = _first_epoch_docs(take(iter(D.train_dataset(cfg, tok)), 7))  # 14 rows: two epochs of the 7 others
    assert sorted(set(trained)) == sorted(tuple(tok(d)["input_ids"]) for d in DOCS[3:])


@pytest.mark.parametrize("mode", ["pad", "pack"])
@pytest.mark.parametrize("streaming", [False, True])
def test_restored_iterator_yields_exactly_the_remaining_batches(docs_file, tok, mode, streaming):
    cfg = config(docs_file, max_length=6, mode=mode, streaming=streaming, shuffle_buffer=4, seed=3)
    it = iter(D.train_dataset(cfg, tok))
    take(it, 4)  # mid-epoch (and, packing, mid-document)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 9)  # crosses an epoch boundary
    again = iter(D.train_dataset(cfg, tok))
    again.set_state(state)
    for a, b in zip(rest, take(again, 9)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    fresh = take(iter(D.train_dataset(cfg, tok)), 13)[4:]  # and they are the batches an uninterrupted pass gives
    np.testing.assert_array_equal(np.stack([b["input_ids"] for b in fresh]), np.stack([b["input_ids"] for b in rest]))


def test_missing_column_is_a_clear_error(docs_file, tok):
    from loopus_jax import LoopusError

    cfg = config(docs_file, text_field="body")
    with pytest.raises(LoopusError, match="no column 'body'.*columns: text, other"):
        D.train_dataset(cfg, tok)
