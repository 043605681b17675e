"""Batched, jitted scoring of (context, continuation) token pairs: what every task and the lm-eval adapter use.

A pair's model input is `(context + continuation)[-(max_length + 1):][:-1]` (lm-eval's left
truncation), left-padded so every continuation ends at the last column: the model sees exactly
lm-eval's input and a looped model's halting judges the same last token. Rows are sorted by length
and padded to a few length buckets; each bucket has one batch shape (rows chosen for the memory at
hand) and one continuation-tail width, so it compiles once.

Pairs that share a context share its computation. Where each row runs to a fixed depth (base models,
looped models without halting), a context's continuations are packed into one document: the context
once, then per continuation a segment (the context's last token and the continuation) that attends
to the context and itself only, at the positions it would have alone (`layers.make_context`): the
same numbers for a fraction of the tokens (ARC: 2.7x fewer). On one device, documents are then packed
best-fit into rows of up to PACK_LENGTH tokens, so little is padding and most rows share one shape.
Under halting a row exits as a whole, so only one-token continuations of the same input (MMLU's
" A"/" B"/...) share a row.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from loopus_jax.errors import LoopusError
from loopus_jax.eval.requests import Encoder, Loglikelihood, Request, Rolling
from loopus_jax.eval.score_cache import ScoreCache, pair_key, run_fingerprint
from loopus_jax.eval.scoring import quarter_octave, score_tokens
from loopus_jax.progress import progress
from loopus_jax.sharding import model_mesh

MIN_BUCKET = 16
MAX_ROWS = 256
ROW_MULTIPLE = 8  # rows per batch and logit tails round up to this (fewer shapes than exact counts)
TOKENS_PER_BATCH_CAP = 8192  # beyond this, bigger batches stop paying off (and fill memory with logits)
PACK_LENGTH = 128  # rows of several documents reach this many tokens (256 was slower on CPU: attention over more keys)


@dataclasses.dataclass
class Score:
    """One request's result; `exit_depth` is the mean over its rows (rolling texts have several)."""

    loglikelihood: float
    is_greedy: bool
    exit_depth: float | None = None


def length_buckets(max_len: int) -> list[int]:
    """16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (four per octave: at most 1.25x padding), ending at
    `max_len`. Padding is work thrown away on a compute-bound forward; a shape more costs one compile."""
    out = [MIN_BUCKET]
    while out[-1] < max_len:
        out.append(quarter_octave(out[-1] + 1))
    return [*out[:-1], max_len] if out[-1] > max_len or len(out) == 1 else out


def _available_bytes(model: nnx.Module) -> int:
    dev = model.embed[...].devices().pop() if hasattr(model.embed[...], "devices") else None
    stats = dev.memory_stats() if dev is not None and dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 4 << 30
    return int(pages)


def auto_rows(model: nnx.Module, length: int, tail: int, data_parallel: int = 1) -> int:
    """Rows per batch for a bucket: a quarter of free memory over a rough per-row footprint
    (activations of one layer kept live, attention scores, float32 logits of the tail, log-softmax)."""
    cfg = model.config
    per_row = 4 * (
        length * (cfg.hidden_size * 12 + cfg.intermediate_size * 3)
        + cfg.num_heads * length * length * 2
        + 3 * (tail + 1) * cfg.vocab_size
    )
    rows = max(1, min(MAX_ROWS, _available_bytes(model) // 4 // per_row, max(1, TOKENS_PER_BATCH_CAP // length)))
    return max(data_parallel, rows // data_parallel * data_parallel)


@dataclasses.dataclass
class _Row:
    tokens: list[int]  # the model's input
    segments: list[int]  # its attention-mask values (see `layers.make_context`)
    targets: list[int]  # per column, the token it predicts (-1: none)
    pairs: list[tuple[int, int, int]]  # (pair index, column of its first target, continuation length)
    last_only: bool = False  # one-token pairs of the same input: scored from the last column's distribution

    @property
    def tail(self) -> int:
        """Columns from the first scored one to the end."""
        return len(self.tokens) - min(c for _, c, _ in self.pairs)

    def extend(self, other: _Row) -> None:
        off = len(self.tokens)
        self.tokens += other.tokens
        self.segments += other.segments
        self.targets += other.targets
        self.pairs += [(i, c + off, k) for i, c, k in other.pairs]


def _plain(i: int, whole: list[int], k: int, last_only: bool = False) -> _Row:
    """One pair's row: `whole` minus its last token as input, scoring the last k columns."""
    n = len(whole) - 1
    return _Row(whole[:-1], [1] * n, [-1] * (n - k) + whole[-k:], [(i, n - k, k)], last_only)


class Scorer:
    """Scores requests with a model and its tokenizer; looped options apply to every call.

    `batch_size` fixes the rows per batch (None: chosen per bucket for the memory at hand).
    `max_length` defaults to the model's `max_position_embeddings`, as lm-eval's HF backend.
    `pack=False` gives every continuation its own row even where packing applies (see the module doc).
    `cache_dir` keeps scores on disk as batches finish, so a rerun after an interruption resumes
    (`loopus_jax.eval.score_cache`).
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Any,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        show_progress: bool = True,
        pack: bool = True,
        cache_dir: str | Path | None = None,
        **options: Any,
    ):
        from loopus_jax.loop.model import LoopedLM

        if batch_size is not None and batch_size < 1:
            raise LoopusError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.encoder = model, Encoder(tokenizer)
        self.batch_size = batch_size
        self.max_length = int(max_length or model.config.max_position_embeddings)
        if self.max_length < 2:
            raise LoopusError(f"max_length must be at least 2, got {self.max_length}")
        self.looped = isinstance(model, LoopedLM)
        self.options = {k: v for k, v in options.items() if v is not None}
        self.pack = pack
        run = None
        if self.looped:
            run = model.options(**self.options)  # validate now, not in the middle of a run
            self.pack = pack and run[0].halting == "none"
        elif self.options:
            raise LoopusError(
                f"option(s) {sorted(self.options)} apply to looped models only; this is a base {model.config.architecture}"
            )
        mesh = model_mesh(model)
        self.data_parallel = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        # Several documents per row need the LM head on scattered columns: one device only (see score_tokens).
        self.lines = self.pack and mesh is None
        self.show_progress = show_progress
        self.cache = None if cache_dir is None else ScoreCache(cache_dir, run_fingerprint(model, run, self.max_length))

    # Public API -----------------------------------------------------------------------------------

    def score(self, requests: list[Request]) -> list[Score]:
        """Scores in request order; a Rolling request's log-likelihood sums its windows."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, r in enumerate(requests):
            if isinstance(r, Loglikelihood):
                pairs.append(self.encoder.pair(r.context, r.continuation))
                owner.append(i)
            elif isinstance(r, Rolling):
                for w in self.encoder.rolling_windows(r.text, self.max_length):
                    pairs.append(w)
                    owner.append(i)
            else:
                raise TypeError(f"not a request: {r!r}")
        scored = self.score_pairs(pairs)
        ll = np.zeros(len(requests))
        greedy = np.ones(len(requests), bool)
        depth_sum, depth_n = np.zeros(len(requests)), np.zeros(len(requests))
        for o, s in zip(owner, scored):
            ll[o] += s.loglikelihood
            greedy[o] &= s.is_greedy
            if s.exit_depth is not None:
                depth_sum[o] += s.exit_depth
                depth_n[o] += 1
        return [
            Score(float(ll[i]), bool(greedy[i]), float(depth_sum[i] / depth_n[i]) if depth_n[i] else None)
            for i in range(len(requests))
        ]

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        """Token-level entry point: (context ids, continuation ids) -> Score, in input order. With a
        `cache_dir`, pairs scored by an earlier run come from its file and each batch is saved as it ends."""
        if self.cache is None:
            return self._score(pairs, lambda done: None)
        cache = self.cache
        keys = [pair_key(*p) for p in pairs]
        out: list[Score | None] = [None if (e := cache.get(k)) is None else Score(*e) for k in keys]
        todo = [i for i, s in enumerate(out) if s is None]
        cache.report_resume(len(pairs) - len(todo), len(pairs))

        def save(done: list[tuple[int, Score]]) -> None:
            cache.put([(keys[todo[j]], (s.loglikelihood, s.is_greedy, s.exit_depth)) for j, s in done])

        try:
            for j, s in enumerate(self._score([pairs[i] for i in todo], save) if todo else []):
                out[todo[j]] = s
        except KeyboardInterrupt:
            cache.report_interrupt()
            raise
        finally:
            cache.close()
        return out  # type: ignore[return-value]

    def _score(self, pairs: list[tuple[list[int], list[int]]], on_batch) -> list[Score]:
        """Scores `pairs`; `on_batch` gets each batch's (pair index, Score) list as soon as it is done."""
        rows = self._rows(pairs)
        out: list[Score | None] = [None] * len(pairs)
        by_bucket: dict[int, list[_Row]] = defaultdict(list)
        buckets = length_buckets(self.max_length)
        for row in rows:
            by_bucket[next(b for b in buckets if b >= len(row.tokens))].append(row)
        plan = []
        for length in sorted(by_bucket, reverse=True):
            brows = by_bucket[length]
            longest = max(r.tail for r in brows)  # logits only where some row's continuation is
            tail = min(length, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)
            n = self.batch_size or auto_rows(self.model, length, tail, self.data_parallel)
            if not self.batch_size:  # the bucket's rows split evenly over its batches: filler rows are wasted work
                even = -(-len(brows) // -(-len(brows) // n))
                step = min(ROW_MULTIPLE, 1 << (even - 1).bit_length())  # 1, 2, 4 for the smallest buckets
                n = min(n, -(-even // step) * step)
            n = -(-n // self.data_parallel) * self.data_parallel
            plan += [(length, tail, n, brows[i : i + n]) for i in range(0, len(brows), n)]
        bar = progress(plan, desc="scoring", total=len(plan), unit="batch") if self.show_progress else plan
        for length, tail, n, chunk in bar:
            self._run(chunk, length, tail, n, pairs, out)
            on_batch([(i, out[i]) for row in chunk for i, _, _ in row.pairs])
        return out  # type: ignore[return-value]

    # Internals ------------------------------------------------------------------------------------

    def _rows(self, pairs: list[tuple[list[int], list[int]]]) -> list[_Row]:
        rows: list[_Row] = []
        docs: list[_Row] = []  # rows of one context and its continuations, ending in a segment: packable
        last_only: dict[tuple[int, ...], _Row] = {}

        def alone(i: int, whole: list[int], k: int) -> None:
            if k == 1:  # rows that only differ in the one target token share one forward pass
                key = tuple(whole[:-1])
                if key in last_only:
                    last_only[key].pairs.append((i, len(key) - 1, 1))
                    return
                last_only[key] = _plain(i, whole, 1, last_only=True)
                rows.append(last_only[key])
            else:
                rows.append(_plain(i, whole, k))

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise LoopusError(f"request {i} has an empty {'context' if not ctx else 'continuation'} after tokenization")
            if len(cont) > self.max_length:
                raise LoopusError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            if self.pack and len(ctx) + len(cont) <= self.max_length + 1:  # untruncated: its context can be shared
                groups[tuple(ctx)].append(i)
            else:
                alone(i, (ctx + cont)[-(self.max_length + 1) :], len(cont))
        for ctx, members in groups.items():
            if all(len(pairs[i][1]) == 1 for i in members):
                for i in members:
                    alone(i, list(ctx) + pairs[i][1], 1)
                continue
            doc = None
            for i in members:
                cont = pairs[i][1]
                segment = [ctx[-1], *cont[:-1]]  # the context's last token predicts the first target
                if doc is None or len(doc.tokens) + len(segment) > self.max_length:
                    doc = _Row(list(ctx[:-1]), [1] * (len(ctx) - 1), [-1] * (len(ctx) - 1), [])
                    docs.append(doc)
                value = 2 * (len(doc.pairs) + 1)  # even: a segment; neighbours differ
                doc.extend(_Row(segment, [value] * len(segment), cont, [(i, 0, len(cont))]))
        rows += self._lines(docs) if self.lines else docs
        rows.sort(key=lambda r: (-len(r.tokens), tuple(r.tokens)))
        return rows

    def _lines(self, docs: list[_Row]) -> list[_Row]:
        """Documents packed best-fit-decreasing into rows of up to PACK_LENGTH tokens: the padding up to a
        length bucket goes, and most rows share one shape (one compile)."""
        cap = min(PACK_LENGTH, self.max_length)
        lines: list[_Row] = []
        room: list[tuple[int, int]] = []  # (tokens left, line index), sorted
        for doc in sorted(docs, key=lambda r: -len(r.tokens)):
            n = len(doc.tokens)
            j = bisect.bisect_left(room, (n, -1))  # the fullest row it fits in
            if n <= cap and j < len(room) and doc.segments[0] == 1:  # (no shared tokens: it can only start a row)
                left, li = room.pop(j)
                lines[li].extend(doc)
                left -= n
            else:
                lines.append(doc)
                left, li = cap - n, len(lines) - 1
            if left > 0:
                bisect.insort(room, (left, li))
        return lines

    def _run(self, chunk: list[_Row], length: int, tail: int, n: int, pairs, out: list) -> None:
        ids = np.zeros((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        targets = np.full((n, tail), -1, np.int32)  # -1: not scored
        for r, row in enumerate(chunk):
            ids[r, length - len(row.tokens) :] = row.tokens
            mask[r, length - len(row.tokens) :] = row.segments
            targets[r, tail - row.tail :] = row.targets[len(row.tokens) - row.tail :]
        for r in range(len(chunk), n):  # filler rows keep the compiled shape; nothing in them is scored
            ids[r], mask[r] = ids[0], mask[0]
        # Batches with one-token rows need the last column's whole distribution (a variant compiled apart).
        last_only = any(r.last_only for r in chunk)
        s = score_tokens(self.model, ids, mask, targets=targets, want_last=last_only, **self.options)
        lp = s.logprobs.astype(np.float64)
        for r, row in enumerate(chunk):
            depth = None if s.exit_depth is None else float(s.exit_depth[r])
            if row.last_only:
                last = s.last_logprobs[r]
                best = int(np.argmax(last))
                for i, _, _ in row.pairs:
                    tok = pairs[i][1][0]
                    out[i] = Score(float(last[tok]), best == tok, depth)
                continue
            for i, col, k in row.pairs:
                c = tail - len(row.tokens) + col
                out[i] = Score(float(lp[r, c : c + k].sum()), bool(s.greedy[r, c : c + k].all()), depth)


def mean_exit_depth(scores: list[Score]) -> float | None:
    depths = [s.exit_depth for s in scores if s.exit_depth is not None]
    return float(math.fsum(depths) / len(depths)) if depths else None
