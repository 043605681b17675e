"""Scores kept on disk as they are computed, so an interrupted evaluation resumes where it stopped.

A full MMLU split is an hour of a CPU and a long run on an accelerator: a kill, a pre-emption or
Ctrl-C must not throw the finished batches away. The scorer appends each batch's scores to a JSON-lines
file named by a fingerprint of everything that decides them (the weights, the model config, the looped
run options, the context window), so a rerun of the same command reuses them and any change of model or
option starts a file of its own. A pair is keyed by its token ids. Scores come back bit for bit; the
pairs still to do are batched among themselves, so their float32 rounding can differ from an
uninterrupted run's by ~1e-5 (batch shapes change summation order, as anywhere in the scorer).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Entry = tuple[float, bool, "float | None"]  # (log-likelihood, is_greedy, exit depth)


def pair_key(context: list[int], continuation: list[int]) -> str:
    """A token pair's identity: its ids, with the split between context and continuation."""
    ids = np.asarray([len(context), *context, *continuation], np.int64)
    return hashlib.sha1(ids.tobytes()).hexdigest()


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    """Per array: sum, sum of squares and a position-weighted sum (a permutation changes the last)."""

    def sums(x: jax.Array) -> jax.Array:
        v = x.reshape(-1).astype(jnp.float32)
        w = (jnp.arange(v.shape[0], dtype=jnp.int32) % 251).astype(jnp.float32)
        return jnp.stack([jnp.sum(v), jnp.sum(v * v), jnp.sum(v * w)])

    return jnp.stack([sums(x) for x in leaves]) if leaves else jnp.zeros((0, 3))


def _numeric(x: Any) -> bool:
    """Arrays of numbers or booleans (not PRNG keys, which cannot be summed), with at least one element."""
    if not hasattr(x, "dtype") or not x.size:
        return False
    return bool(jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_))


def weights_digest(model: nnx.Module) -> str:
    """A digest of every array in the model, computed where the arrays live (no host copy of the weights)."""
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    arrays = [(jax.tree_util.keystr(p), x) for p, x in flat if _numeric(x)]
    h = hashlib.sha1()
    for name, x in arrays:
        h.update(f"{name}:{x.shape}:{x.dtype};".encode())
    h.update(np.asarray(_leaf_sums([x for _, x in arrays])).tobytes())
    return h.hexdigest()


def run_fingerprint(model: nnx.Module, run: Any, max_length: int) -> str:
    """Everything that decides a pair's score: weights, config, run options (their repr), window."""
    parts = [type(model).__name__, repr(model.config), repr(run), str(max_length), weights_digest(model)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:20]


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class ScoreCache:
    """`folder/<fingerprint>.jsonl`: one line per scored pair, appended and flushed after each batch."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.path = Path(folder) / f"{fingerprint}.jsonl"
        self._entries: dict[str, Entry] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        self._entries[r["k"]] = (float(r["ll"]), bool(r["g"]), r["d"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short when the run was killed: that pair is scored again
        self._file = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def put(self, items: list[tuple[str, Entry]]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:  # end the killed run's half line, or the first new entry would be glued to it
                self._file.write("\n")
        for key, (ll, greedy, depth) in items:
            self._entries[key] = (ll, greedy, depth)
            self._file.write(json.dumps({"k": key, "ll": ll, "g": greedy, "d": depth}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def report_resume(self, reused: int, total: int) -> None:
        if reused:
            print(f"resuming: {reused} of {total} scores from {self.path}", file=sys.stderr)

    def report_interrupt(self) -> None:
        print(f"{len(self)} scores are kept in {self.path}: the same command resumes from them", file=sys.stderr)
