"""Layer-wise representation dynamics on calibration text, and the split they suggest.

Per layer l (the transition h_l -> h_{l+1} that layer l performs; h_0 is the embedding):
  update:  mean over tokens of ||h_{l+1} - h_l|| / ||h_l||       (relative update norm)
  cosine:  mean over tokens of cos(h_l, h_{l+1})                 (consecutive similarity)
  to_last: mean over tokens of cos(h_{l+1}, h_L)                 (similarity to the final state)

Split rule (documented in `propose_split`): the middle of the network makes small, similar updates
(the stretch that tolerates repetition); the encoder is the leading run of layers whose relative
update exceeds `factor` times the median update, the decoder the trailing run, each at least one
layer, and the reasoning block keeps at least half of the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopus_jax.loop.spec import LayerSplit, make_split
from loopus_jax.models import layers as L


@dataclasses.dataclass
class Dynamics:
    update: np.ndarray  # [L]
    cosine: np.ndarray  # [L]
    to_last: np.ndarray  # [L]
    tokens: int

    def to_dict(self) -> dict:
        return {
            "update": self.update.tolist(),
            "cosine": self.cosine.tolist(),
            "to_last": self.to_last.tolist(),
            "tokens": self.tokens,
        }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_stats(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
    """Per-layer sums over valid tokens of the three metrics (float32)."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    ctx = L.make_context(cfg, mask)
    h0 = model.embed_tokens(ids)

    def body(h, p):
        h2 = L.decoder_layer(p, h, ctx, cfg)
        return h2, h2

    h_last, hs = jax.lax.scan(body, h0, model.layers.arrays())
    prev = jnp.concatenate([h0[None], hs[:-1]], axis=0).astype(jnp.float32)
    hs = hs.astype(jnp.float32)
    last = h_last.astype(jnp.float32)[None]
    w = mask.astype(jnp.float32)[None]
    norm = lambda x: jnp.linalg.norm(x, axis=-1)
    eps = 1e-12  # only guards zero vectors; larger would bias small-norm (embedding) states
    update = norm(hs - prev) / (norm(prev) + eps)
    cosine = jnp.sum(hs * prev, -1) / (norm(hs) * norm(prev) + eps)
    to_last = jnp.sum(hs * last, -1) / (norm(hs) * norm(last) + eps)
    return tuple(jnp.sum(x * w, axis=(1, 2)) for x in (update, cosine, to_last))


def measure_dynamics(model: nnx.Module, ids: list[int], *, window: int = 512, batch_size: int = 4) -> Dynamics:
    """Mean metrics over the tokens of `ids`, cut into windows of `window` tokens."""
    from loopus_jax.progress import progress

    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    width = max(len(w) for w in windows)
    graphdef, state = nnx.split(model)
    sums = np.zeros((3, model.config.num_layers))
    count = 0
    for s in progress(range(0, len(windows), batch_size), desc="analyze", unit="batch"):
        chunk = windows[s : s + batch_size]
        arr = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros_like(arr)
        for r, w in enumerate(chunk):
            arr[r, : len(w)], mask[r, : len(w)] = w, 1
        out = _layer_stats(graphdef, state, jnp.asarray(arr), jnp.asarray(mask))
        sums += np.stack([np.asarray(x, np.float64) for x in out])
        count += int(mask.sum())
    m = sums / count
    return Dynamics(update=m[0], cosine=m[1], to_last=m[2], tokens=count)


def propose_split(update: np.ndarray, *, factor: float = 1.5) -> LayerSplit:
    """Encoder = leading layers with update > factor * median, decoder = trailing such layers.

    Each block gets at least one layer and at most a quarter of the layers, so the reasoning block
    keeps at least half of the network.
    """
    n = len(update)
    cut = factor * float(np.median(update))
    big = update > cut
    cap = max(1, n // 4)
    e = 1
    while e < cap and big[e]:
        e += 1
    d = 1
    while d < cap and big[n - 1 - d]:
        d += 1
    return make_split(tuple(range(e)), tuple(range(n - d, n)), n)


def plot_dynamics(dyn: Dynamics, split: LayerSplit, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(dyn.update))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a1.plot(x, dyn.update, "o-", label="relative update ||h(l+1)-h(l)|| / ||h(l)||")
    a1.axhline(1.5 * np.median(dyn.update), ls=":", c="gray", label="1.5 x median (split rule)")
    a1.set_ylabel("relative update (log)")
    a1.set_yscale("log")
    a2.plot(x, dyn.cosine, "o-", label="cos(h(l), h(l+1))")
    a2.plot(x, dyn.to_last, "s-", label="cos(h(l+1), h(L)) (to final state)")
    a2.set_ylabel("cosine similarity")
    a2.set_xlabel("layer l")
    for ax in (a1, a2):
        ax.axvspan(-0.5, len(split.encoder) - 0.5, color="tab:green", alpha=0.12, label="encoder")
        ax.axvspan(
            split.num_layers - len(split.decoder) - 0.5, split.num_layers - 0.5, color="tab:red", alpha=0.12, label="decoder"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    a1.set_title(title or f"representation dynamics; proposed {split.flags()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze(
    model: nnx.Module, tokenizer: Any, text: str, out: Path, *, max_tokens: int = 4096, window: int = 512
) -> tuple[Dynamics, LayerSplit]:
    from loopus_jax.eval.perplexity import tokenize_for_ppl

    out.mkdir(parents=True, exist_ok=True)
    ids = tokenize_for_ppl(tokenizer, text)[:max_tokens]
    dyn = measure_dynamics(model, ids, window=window)
    split = propose_split(dyn.update)
    report = {
        **dyn.to_dict(),
        "encoder": list(split.encoder),
        "decoder": list(split.decoder),
        "flags": split.flags(),
        "rule": "encoder/decoder = leading/trailing layers with update > 1.5 x median, 1..L/4 each",
    }
    (out / "dynamics.json").write_text(json.dumps(report, indent=2))
    plot_dynamics(dyn, split, out / "dynamics.png")
    return dyn, split
