"""Training data: documents from `datasets` (hub streaming or local files), tokenized into fixed-shape
rows by a `grain` pipeline with seeded shuffling, per-process sharding and a checkpointable iterator.

Rows are dicts of int32 numpy arrays `input_ids`, `attention_mask`, `labels` of length max_length;
a batch stacks them to [B, T] (what `train_step` takes). Three row modes:
- `pad` (the authors' pretraining rows): each document (stripped of surrounding whitespace, as the
  authors do) tokenized with the tokenizer's special tokens,
  truncated to max_length, right-padded with the pad token (EOS when there is none); labels are the
  ids with -100 on padding.
- `pack`: documents tokenized the same way, each followed by EOS, concatenated into one stream and
  cut into rows of exactly max_length (no padding; a document may span two rows).
- `chat` (SFT): `messages` rendered with the tokenizer's chat template; labels are -100 except on the
  tokens of each assistant turn as the template renders it (from the end of the generation prompt
  through the content and the EOS token that closes the turn), truncated and padded like `pad`.

Order and sharding. Local files (and the builtin corpus) are random-access: the held-out documents
are the first `eval.docs`; the rest are shuffled globally with the seed (a new permutation per
epoch, repeated forever) and process p of P takes elements p, p+P, p+2P, ... of that sequence, so
each process reads only its own documents and the processes' shards are disjoint with the whole
epoch as their union. Hub datasets stream: each process reads its share of the files
(`datasets.distributed.split_dataset_by_node`), shuffled within windows of `shuffle_buffer`
documents; the held-out documents are the first ones of the unsplit stream and are filtered out of
training by content. Every iterator's `get_state()` is a small JSON-able dict; `set_state()` resumes
exactly at the next batch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from loopus_jax.errors import LoopusError
from loopus_jax.train.config import DataSection, TrainConfig, data_format
from loopus_jax.train.losses import IGNORE

READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


# --------------------------------------------------------------------------------------------------
# Rows


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else EOS (as the authors do), else 0."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise LoopusError("data.mode 'pack' needs a tokenizer with an EOS token to separate documents; use mode 'pad'")
    return int(tokenizer.eos_token_id)


def tokenize_document(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document with the tokenizer's own special tokens (BOS for Llama-style ones)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def pad_row(ids: list[int], labels: list[int] | None, max_length: int, pad: int) -> dict[str, np.ndarray]:
    """Truncate to max_length and right-pad; labels default to the ids; -100 on padding."""
    ids = list(ids[:max_length])
    lab = list(ids if labels is None else labels[: len(ids)])
    n = len(ids)
    out_ids = np.full((max_length,), pad, np.int32)
    out_ids[:n] = ids
    mask = np.zeros((max_length,), np.int32)
    mask[:n] = 1
    out_lab = np.full((max_length,), IGNORE, np.int32)
    out_lab[:n] = lab
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_lab}


def packed_row(ids: list[int]) -> dict[str, np.ndarray]:
    arr = np.asarray(ids, np.int32)
    return {"input_ids": arr, "attention_mask": np.ones_like(arr), "labels": arr.copy()}


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, missing template
        raise LoopusError(f"cannot render the chat template: {type(e).__name__}: {str(e)[:200]}") from None


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans of the assistant turns in it).

    A turn's span starts where the rendering of the conversation before it plus the generation
    prompt ends (so it covers whatever the model would generate: a reasoning block, the content) and
    ends after the content and, when the template puts it there, the EOS token closing the turn.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise LoopusError("data.mode 'chat' needs a tokenizer with a chat template; this tokenizer has none")
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    eos = tokenizer.eos_token or ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        if i and not full.startswith(_render(tokenizer, messages[:i], True)):
            raise LoopusError("the chat template renders a conversation's prefix differently from the whole; cannot mask labels")
        content = str(m.get("content") or "")
        pos = full.find(content, start) if content else start
        if pos < 0:
            raise LoopusError(f"assistant message {i} does not appear in the rendered conversation; cannot mask labels")
        end = pos + len(content)
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return full, spans


def chat_row(tokenizer: Any, messages: list[dict], max_length: int, pad: int) -> dict[str, np.ndarray]:
    """Assistant-only labels: a token is labelled when its characters lie inside an assistant span."""
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if b > a and any(s <= a and b <= e for s, e in spans) else IGNORE for t, (a, b) in zip(ids, enc["offset_mapping"])
    ]
    return pad_row(ids, labels, max_length, pad)


# --------------------------------------------------------------------------------------------------
# Documents


def _document_key(dc: DataSection) -> str:
    return dc.messages_field if dc.mode == "chat" else dc.text_field


def _is_document(dc: DataSection) -> Callable[[dict], bool]:
    key = _document_key(dc)
    if dc.mode == "chat":
        return lambda r: isinstance(r.get(key), list) and len(r[key]) > 0
    return lambda r: isinstance(r.get(key), str) and bool(r[key].strip())


def open_documents(cfg: TrainConfig) -> Any:
    """The source as a `datasets.Dataset` (random access) or `IterableDataset` (streaming),
    reduced to the one column the mode reads and to non-empty documents."""
    import datasets

    dc = cfg.data
    fmt = data_format(dc)
    stream = (fmt == "hub") if dc.streaming is None else dc.streaming
    key = _document_key(dc)
    try:
        if fmt == "builtin":
            from pydoc_data.topics import topics

            ds = datasets.Dataset.from_dict({key: [topics[k] for k in sorted(topics)]})
        elif fmt == "hub":
            ds = datasets.load_dataset(dc.source, dc.name, split=dc.split, streaming=stream)
        else:
            kw = {"sample_by": dc.sample_by} if fmt == "text" else {}
            ds = datasets.load_dataset(fmt, data_files=str(cfg.resolve(dc.source)), split="train", streaming=stream, **kw)
    except LoopusError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError, ...)
        raise LoopusError(f"cannot open data.source {dc.source!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    columns = ds.column_names
    if columns is not None and key not in columns:
        field = "data.messages_field" if dc.mode == "chat" else "data.text_field"
        raise LoopusError(f"data.source {dc.source!r} has no column {key!r} ({field}); its columns: {', '.join(columns)}")
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([key])
    return ds.filter(_is_document(dc))


@dataclasses.dataclass
class RowEncoder:
    """Document record -> row (pad, chat) or token list (pack)."""

    cfg: DataSection
    tokenizer: Any

    def __call__(self, record: dict) -> Any:
        dc, tok = self.cfg, self.tokenizer
        if dc.mode == "chat":
            return chat_row(tok, record[dc.messages_field], dc.max_length, pad_id(tok))
        ids = tokenize_document(tok, record[dc.text_field].strip())
        if dc.mode == "pack":
            return np.asarray([*ids, eos_id(tok)], np.int32)
        return pad_row(ids, None, dc.max_length, pad_id(tok))


# --------------------------------------------------------------------------------------------------
# grain pieces with exact checkpoint state


class _PackIterator(grain.DatasetIterator):
    """Concatenate token lists and emit rows of exactly `length` tokens; state = parent + carry."""

    def __init__(self, parent: grain.DatasetIterator, length: int):
        super().__init__(parent)
        self._length = length
        self._carry: list[int] = []

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._carry) < self._length:
            self._carry.extend(int(t) for t in next(self._parent))
        row, self._carry = self._carry[: self._length], self._carry[self._length :]
        return packed_row(row)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "carry": list(self._carry)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._carry = [int(t) for t in state["carry"]]


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._length)


class _StreamIterator(grain.DatasetIterator):
    """A `datasets.IterableDataset` as a grain iterator, repeated forever (reshuffled per epoch by
    `set_epoch`); state = (epoch, the dataset's own `state_dict()`)."""

    def __init__(self, make: Callable[[], Any]):
        super().__init__()
        self._make = make
        self._epoch = 0
        self._start(None)

    def _start(self, hf_state: dict | None) -> None:
        self._ds = self._make()
        self._ds.set_epoch(self._epoch)
        if hf_state is not None:
            self._ds.load_state_dict(copy.deepcopy(hf_state))
        self._it = iter(self._ds)
        self._empty = hf_state is None

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                rec = next(self._it)
                self._empty = False
                return rec
            except StopIteration:
                if self._empty:
                    break
                self._epoch += 1
                self._start(None)
        raise LoopusError("the data stream holds no training documents for this process")

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "hf": copy.deepcopy(self._ds.state_dict())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._start(state["hf"])


class StreamDataset(grain.IterDataset):
    def __init__(self, make: Callable[[], Any]):
        super().__init__()
        self._make = make

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self._make)


class _Records:
    """Random access to a `datasets.Dataset` for `grain.MapDataset.source` (records by index)."""

    def __init__(self, ds: Any):
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        return self._ds[int(i)]


def _doc_hash(record: dict) -> str:
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Pipelines


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise LoopusError(f"process index {pi} is not in 0..{pc - 1}")
    return pi, pc


def local_batch_size(cfg: TrainConfig, process_count: int) -> int:
    b = cfg.train.batch_size
    if b % process_count:
        raise LoopusError(f"train.batch_size {b} must be divisible by the number of processes ({process_count})")
    return b // process_count


def train_dataset(
    cfg: TrainConfig, tokenizer: Any, *, process_index: int | None = None, process_count: int | None = None, docs: Any = None
) -> grain.IterDataset:
    """This process's batches ([batch_size / processes, max_length] each), an endless grain IterDataset."""
    import datasets

    pi, pc = _process(process_index, process_count)
    bs = local_batch_size(cfg, pc)
    dc, held = cfg.data, cfg.eval.docs
    if dc.mode == "pack":
        eos_id(tokenizer)  # fail here, not later inside a reader thread
    if dc.mode == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise LoopusError("data.mode 'chat' needs a tokenizer with a chat template; this tokenizer has none")
    docs = open_documents(cfg) if docs is None else docs
    encode = RowEncoder(dc, tokenizer)
    if isinstance(docs, datasets.Dataset):
        ds = grain.MapDataset.source(_Records(docs))[held:]
        if len(ds) < pc:
            raise LoopusError(
                f"data.source {dc.source!r} has {len(docs)} documents; with eval.docs={held} held out, "
                f"{len(ds)} are left for {pc} process(es)"
            )
        if dc.shuffle:
            ds = ds.shuffle(cfg.seed)
        ds = ds.repeat(None)[pi::pc].map(encode)
        if dc.mode != "pack":
            return ds.batch(bs, drop_remainder=True).to_iter_dataset(READ)
        return PackIterDataset(ds.to_iter_dataset(READ), dc.max_length).batch(bs, drop_remainder=True)

    heldout = {_doc_hash(r) for r in docs.take(held)} if held else set()

    def make() -> Any:
        from datasets.distributed import split_dataset_by_node

        s = split_dataset_by_node(docs, rank=pi, world_size=pc) if pc > 1 else docs
        return s.filter(lambda r: _doc_hash(r) not in heldout) if heldout else s

    it: grain.IterDataset = StreamDataset(make)
    if dc.shuffle:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=dc.shuffle_buffer, seed=cfg.seed)
    it = it.map(encode)
    if dc.mode == "pack":
        it = PackIterDataset(it, dc.max_length)
    return it.batch(bs, drop_remainder=True)


def heldout_rows(cfg: TrainConfig, tokenizer: Any, docs: Any = None) -> dict[str, np.ndarray] | None:
    """Validation rows [R, max_length] from the first `eval.docs` documents (the same on every process)."""
    import datasets

    n = cfg.eval.docs
    if n == 0:
        return None
    docs = open_documents(cfg) if docs is None else docs
    records = docs.select(range(min(n, len(docs)))) if isinstance(docs, datasets.Dataset) else docs.take(n)
    encode = RowEncoder(cfg.data, tokenizer)
    rows: list[dict[str, np.ndarray]] = []
    if cfg.data.mode == "pack":
        stream: list[int] = []
        for r in records:
            stream.extend(encode(r).tolist())
        length = cfg.data.max_length
        rows = [packed_row(stream[i : i + length]) for i in range(0, len(stream) - length + 1, length)]
    else:
        rows = [encode(r) for r in records]
    rows = rows[: cfg.eval.rows]
    if not rows:
        raise LoopusError(f"the {n} held-out documents (eval.docs) give no validation row of {cfg.data.max_length} tokens")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
