"""Aggregations and standard errors, with lm-evaluation-harness's definitions.

- mean with the sample standard error (Bessel-corrected stddev / sqrt(n));
- LAMBADA perplexity exp(-mean ll) with lm-eval's seeded bootstrap stderr: resample chunk c (of
  min(1000, iters) draws) with Python's `random.Random(c).choices`, reproduced here with NumPy from
  the same Mersenne Twister state, so the value is identical and fast;
- weighted perplexities (WikiText) with no stderr;
- group scores (MMLU) as the size-weighted mean of the leaf tasks and the pooled stderr.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def sample_stddev(xs: Sequence[float]) -> float:
    mu = mean(xs)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float | None:
    return sample_stddev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-mean(lls))


def weighted_perplexity(pairs: Sequence[tuple[float, int]]) -> float:
    return math.exp(-math.fsum(a for a, _ in pairs) / sum(b for _, b in pairs))


def bits_per_byte(pairs: Sequence[tuple[float, int]]) -> float:
    return -math.fsum(a for a, _ in pairs) / sum(b for _, b in pairs) / math.log(2)


def _mt_uniforms(seed: int, count: int) -> np.ndarray:
    """The first `count` values of `random.Random(seed).random()`, from the same MT19937 state."""
    state = random.Random(seed).getstate()[1]
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.asarray(state[:624], np.uint32), state[624]))
    return rs.random_sample(count)


def bootstrap_perplexity_stderr(lls: Sequence[float], iters: int = 100000) -> float | None:
    """lm-eval's bootstrap stderr of exp(-mean ll): iters // chunk resample chunks, chunk = min(1000, iters)."""
    if iters <= 0 or len(lls) < 2:
        return None
    xs = np.asarray(lls, np.float64)
    n, chunk = len(xs), min(1000, iters)
    stats = []
    for c in range(iters // chunk):
        idx = np.floor(_mt_uniforms(c, chunk * n) * n).astype(np.int64).reshape(chunk, n)
        stats.append(np.exp(-xs[idx].mean(axis=1)))
    res = np.concatenate(stats)
    return float(np.std(res, ddof=1))


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """Pooled standard error of a size-weighted mean of subtask means (lm-eval's group stderr)."""
    var = math.fsum((n - 1) * s**2 * n for n, s in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    return math.fsum(v * n for v, n in zip(values, sizes)) / sum(sizes)
