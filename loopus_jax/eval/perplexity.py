"""Perplexity of a text by consecutive non-overlapping windows (the `loopus eval ppl` definition).

Tokenize the whole text without special tokens, prepend the tokenizer's BOS if it has one, cut into
consecutive windows of `max_length` tokens (the last may be shorter), score each window on its own
(its first token is not predicted), and report ppl = exp(total NLL / number of predicted tokens).
Looped models take `forward`'s options; with halting each window exits as a whole (decided at its last
token), and `mean_exit_depth` is the mean over windows. The same pass records each window's q (the q
head's confidence at every depth), so a caller that also wants q needs no second forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from flax import nnx

from loopus_jax.errors import LoopusError
from loopus_jax.eval.scoring import score_tokens
from loopus_jax.progress import progress


@dataclasses.dataclass
class Perplexity:
    tokens: int  # predicted tokens
    nll: float  # total negative log-likelihood (nats)
    ppl: float
    mean_exit_depth: float | None = None  # looped models: mean over windows of the depth each exited at
    q: np.ndarray | None = dataclasses.field(default=None, repr=False)  # looped: [windows, N], NaN after an exit

    def to_dict(self) -> dict:
        """The summary numbers (JSON-ready; the per-window q array is left out)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "q"}
        if d["mean_exit_depth"] is None:  # base models, or looped without an exit record
            del d["mean_exit_depth"]
        return d


def tokenize_for_ppl(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def perplexity_of_ids(
    model: nnx.Module, ids: list[int], *, max_length: int = 1024, batch_size: int = 8, **options: Any
) -> Perplexity:
    """Windows are right-padded to `max_length` so every batch has one compiled shape; `options` are a
    looped model's `forward` options (n_recursion, halting, q_threshold, ...)."""
    if max_length < 2:
        raise LoopusError(f"max_length must be at least 2, got {max_length}")
    if batch_size < 1:
        raise LoopusError(f"batch_size must be at least 1, got {batch_size}")
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise LoopusError("the text has fewer than 2 tokens; nothing to score")
    width = min(max_length, max(len(w) for w in windows))
    total, count, depths, qs = 0.0, 0, [], []
    for start in progress(
        range(0, len(windows), batch_size), desc="perplexity", total=-(-len(windows) // batch_size), unit="batch"
    ):
        chunk = windows[start : start + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - rows) if len(windows) > batch_size else chunk
        arr = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros_like(arr)
        for r, w in enumerate(chunk):
            arr[r, : len(w)] = w
            mask[r, : len(w)] = 1
        s = score_tokens(model, arr, mask, **options)
        valid = mask[:rows, 1:].astype(bool)
        total -= float(s.logprobs[:rows][valid].astype(np.float64).sum())
        count += int(valid.sum())
        if s.exit_depth is not None:
            depths.extend(s.exit_depth[:rows].tolist())
        if s.q is not None:
            qs.append(s.q[:rows])
    mean_depth = float(np.mean(depths)) if depths else None
    q = np.concatenate(qs) if qs else None
    return Perplexity(tokens=count, nll=total, ppl=math.exp(total / count), mean_exit_depth=mean_depth, q=q)


def perplexity(
    model: nnx.Module, tokenizer: Any, text: str, *, max_length: int = 1024, batch_size: int = 8, **options: Any
) -> Perplexity:
    return perplexity_of_ids(model, tokenize_for_ppl(tokenizer, text), max_length=max_length, batch_size=batch_size, **options)
