"""Training metrics: one JSON line per step (and per validation), and PNG curves drawn from them.

Train line (`"kind": "train"`): `step` (batches done), the mean over the batch's supervised steps of
`loss` (= lm + beta * mono + q), `lm`, `mono`, `q`, `token_acc` and `q_hat` (mean sigmoid of the q
logit); `supervised` (the depth indices that were supervised) and `by_depth` (the same losses per
supervised index, aligned with `supervised`); `updates` (optimizer updates so far), `lr` (the
learning rate of the latest update), `grad_norm` (global L2 norm of the gradient an optimizer update
applied, the mean over the batch's updates; null when the batch made none, e.g. grad_accum spanning
batches; with `update: per_batch` the batch's mean supervised gradient, with micro-batches too),
`update_norm` (L2 norm of the change of the trained parameters over the batch, all its updates
together; null when disabled), `param_norm`, `tokens` (non-padding tokens in the global batch),
`seconds` and `tokens_per_s`.

Eval line (`"kind": "eval"`): `step`, `tokens` (predicted tokens), `nll` and `ppl` per recursion
depth (keys are the depths as strings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("lm", "mono", "q", "total", "token_acc", "q_hat")


def train_record(step: int, losses: Any, supervised: np.ndarray, **extra: Any) -> dict:
    """A train line from StepLosses [N] (host arrays, zeros at unsupervised steps) and the [N] mask."""
    sup = np.asarray(supervised, bool)
    idx = np.flatnonzero(sup)
    per = {f: np.asarray(getattr(losses, f), np.float64)[idx] for f in FIELDS}
    rec: dict[str, Any] = {"kind": "train", "step": int(step)}
    for f in FIELDS:
        rec["loss" if f == "total" else f] = float(per[f].mean())
    rec["supervised"] = [int(i) for i in idx]
    rec["by_depth"] = {("loss" if f == "total" else f): [float(x) for x in per[f]] for f in FIELDS}
    rec.update(extra)
    return rec


class MetricsLog:
    """Append-only JSONL; each line flushed, so a killed run loses at most a partial last line."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def reset(self, keep_through_step: int) -> list[dict]:
        """Keep (and return) the complete lines up to `keep_through_step`: a resume rewinds to its checkpoint."""
        if not self.enabled:
            return []
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= keep_through_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete JSON lines of a metrics file (a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _ema(x: np.ndarray, span: int) -> np.ndarray:
    if len(x) < 3 or span <= 1:
        return x
    a, out, acc = 2.0 / (span + 1), np.empty_like(x), x[0]
    for i, v in enumerate(x):
        acc = a * v + (1 - a) * acc
        out[i] = acc
    return out


def plot(path: str | Path, out: str | Path) -> Path:
    """Four panels: losses, accuracy and mean q, learning rate and gradient norm, validation
    perplexity per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = read_jsonl(path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    steps = np.array([r["step"] for r in train])
    span = max(1, len(train) // 20)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    for key, style in (("loss", "-"), ("lm", "-"), ("mono", "--"), ("q", ":")):
        y = np.array([r[key] for r in train])
        if len(y):
            ax[0, 0].plot(steps, y, style, alpha=0.25, lw=0.8)
            ax[0, 0].plot(steps, _ema(y, span), style, label=key, color=ax[0, 0].lines[-1].get_color())
    ax[0, 0].set(title="training losses (mean over supervised steps; thin: raw)", xlabel="step")
    for key in ("token_acc", "q_hat"):
        y = np.array([r[key] for r in train])
        if len(y):
            ax[0, 1].plot(steps, _ema(y, span), label=key)
    ax[0, 1].set(title="next-token accuracy and mean q", xlabel="step", ylim=(0, 1))
    ax[1, 0].plot(steps, [r.get("lr", math.nan) for r in train], label="lr")
    ax[1, 0].set(title="learning rate and gradient norm", xlabel="step", ylabel="lr")
    gn = np.array([math.nan if r.get("grad_norm") is None else r["grad_norm"] for r in train], float)
    if np.isfinite(gn).any():
        twin = ax[1, 0].twinx()
        twin.plot(steps, gn, ".-", color="tab:red", alpha=0.6, lw=0.8, ms=3, label="grad norm")
        twin.set_ylabel("gradient L2 norm", color="tab:red")
    if evals:
        depths = sorted({int(d) for r in evals for d in r["ppl"]})
        for d in depths:
            pts = [(r["step"], r["ppl"][str(d)]) for r in evals if str(d) in r["ppl"]]
            ax[1, 1].plot(*zip(*pts), "o-", label=f"N={d}")
        ax[1, 1].set_yscale("log")
        ax[1, 1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax[1, 1].yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax[1, 1].set(title="validation perplexity by recursion depth", xlabel="step")
    for a in ax.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
