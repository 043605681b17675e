"""Requests and their tokenization, exactly as lm-evaluation-harness's HF backend builds them.

- (context, continuation): trailing spaces of the context move to the continuation; the whole string
  is encoded once and split at the context's token count; an empty context becomes the prefix token
  (BOS, else EOS). Strings are encoded with the tokenizer's own default for special tokens, except
  that a string already starting with the BOS text gets none added.
- Rolling log-likelihood of a text: its tokens cut into disjoint windows of `max_length` predicted
  tokens, the first conditioned on the prefix token, each later one on the tokens just before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Loglikelihood:
    """log p(continuation | context); `is_greedy` says whether every continuation token is the argmax."""

    context: str
    continuation: str


@dataclasses.dataclass(frozen=True)
class Rolling:
    """Log-likelihood of a whole text, in rolling windows (WikiText)."""

    text: str


Request = Loglikelihood | Rolling


class Encoder:
    """Token ids of request strings, with lm-eval's conventions (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eot_token_id = tokenizer.eos_token_id
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    def encode(self, text: str) -> list[int]:
        if self._prefix_text and text.startswith(self._prefix_text):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        n_ctx = len(self.encode(context))
        return whole[:n_ctx], whole[n_ctx:]

    def rolling_windows(self, text: str, max_length: int) -> list[tuple[list[int], list[int]]]:
        return [disjoint(w) for w in rolling_token_windows(self.encode(text), self.prefix_token_id, max_length, 1)]


def rolling_token_windows(
    tokens: list[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(input tokens, predicted tokens) windows covering every token once; lm-eval's definition."""
    if not tokens:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    yield [prefix_token, *tokens[: first - 1]], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        yield tokens[max(end - max_seq_len - 1, 0) : end - 1], tokens[end - n : end]
        done += n


def disjoint(window: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """The window's context without the tokens it predicts: (context, continuation) for scoring."""
    inp, pred = window
    return inp[: len(inp) - (len(pred) - 1)], pred
