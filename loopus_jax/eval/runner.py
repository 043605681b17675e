"""Evaluate a model on tasks: read documents, score every request in one batched pass, aggregate.

The result is a JSON-ready dict: per-task metrics with standard errors (lm-eval's definitions), group
scores (MMLU), per-document samples (each request's log-likelihood, greedy flag and exit depth) and,
for looped models with halting, the mean exit depth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flax import nnx

from loopus_jax.eval.requests import Loglikelihood, Rolling
from loopus_jax.eval.scorer import Scorer, mean_exit_depth
from loopus_jax.eval.tasks import Group, Task

HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "perplexity": False, "word_perplexity": False}
HIGHER_IS_BETTER |= {"byte_perplexity": False, "bits_per_byte": False}


def _leaves(tasks: list[Task | Group]) -> list[Task]:
    return [leaf for t in tasks for leaf in (t.leaves if isinstance(t, Group) else [t])]


def evaluate(
    model: nnx.Module,
    tokenizer: Any,
    tasks: list[Task | Group],
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 100000,
    show_progress: bool = True,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> dict:
    """Run `tasks` (from `loopus_jax.eval.tasks.resolve`) on the first `limit` documents of each
    (per subject for MMLU, as lm-eval); looped-model `options` are n_recursion, halting, q_threshold, ...
    With `cache_dir`, scores are saved as batches finish and a rerun reuses them (see `Scorer`)."""
    from loopus_jax.errors import LoopusError

    if limit is not None and limit < 1:
        raise LoopusError(f"--limit must be at least 1, got {limit}")
    scorer = Scorer(
        model, tokenizer, batch_size=batch_size, max_length=max_length, show_progress=show_progress,
        cache_dir=cache_dir, **options,
    )
    leaves = _leaves(tasks)
    docs = {t.name: t.docs(Path(data_dir), limit) for t in leaves}  # every file is read (and checked) first
    requests, spans = [], {}
    for t in leaves:
        spans[t.name] = []
        for d in docs[t.name]:
            reqs = t.requests(d)
            spans[t.name].append((len(requests), reqs))
            requests += reqs
    # One scoring call per request type, as lm-eval makes them: the same batches, so the adapter's
    # numbers equal these to the last bit (batch shapes change float rounding).
    scores: list = [None] * len(requests)
    for kind in (Loglikelihood, Rolling):
        at = [i for i, r in enumerate(requests) if isinstance(r, kind)]
        for i, sc in zip(at, scorer.score([requests[i] for i in at]) if at else []):
            scores[i] = sc

    def scores_of(names: list[str]) -> list:
        return [s for n in names for start, reqs in spans[n] for s in scores[start : start + len(reqs)]]

    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for t in leaves:
        per_doc, recs = [], []
        for i, (d, (start, reqs)) in enumerate(zip(docs[t.name], spans[t.name])):
            sc = scores[start : start + len(reqs)]
            m = t.process(d, sc)
            per_doc.append(m)
            recs.append(
                {
                    "doc_id": i,
                    "target": d.get("gold", d.get("target")),
                    "requests": [
                        {
                            **_request_dict(r),
                            "loglikelihood": s.loglikelihood,
                            "is_greedy": s.is_greedy,
                            "exit_depth": s.exit_depth,
                        }
                        for r, s in zip(reqs, sc)
                    ],
                    "metrics": m,
                }
            )
        results[t.name] = {
            **t.aggregate(per_doc, bootstrap_iters),
            "n_docs": len(per_doc),
            "mean_exit_depth": mean_exit_depth(scores_of([t.name])),
        }
        samples[t.name] = recs

    groups = {}
    for g in tasks:
        if isinstance(g, Group):
            sizes = {leaf.name: results[leaf.name]["n_docs"] for leaf in g.leaves}
            members = {g.name: list(sizes), **g.subgroups}
            for name, r in g.aggregate(results, sizes).items():
                groups[name] = {
                    **r,
                    "n_docs": sum(sizes[m] for m in members[name]),
                    "mean_exit_depth": mean_exit_depth(scores_of(members[name])),
                }
    return {
        "results": results,
        "groups": groups,
        "samples": samples,
        "mean_exit_depth": mean_exit_depth(scores),
        "config": {
            "tasks": [t.name for t in tasks],
            "limit": limit,
            "batch_size": batch_size,
            "max_length": scorer.max_length,
            "bootstrap_iters": bootstrap_iters,
            **{k: v for k, v in scorer.options.items()},
        },
    }


def _request_dict(r: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(r)


def primary_metrics(task_result: dict) -> dict[str, float]:
    return {k: v for k, v in task_result.items() if k in HIGHER_IS_BETTER and v is not None}


def format_table(out: dict) -> str:
    """A markdown table like lm-eval's: task, metric, direction, value, stderr (groups first)."""
    lines = ["|Tasks|Metric| |Value| |Stderr|", "|---|---|---|---:|---|---:|"]
    rows = list(out["groups"].items()) + [
        (k, v) for k, v in out["results"].items() if not (out["groups"] and k.startswith("mmlu_"))
    ]
    for name, r in rows:
        first = True
        for metric, value in primary_metrics(r).items():
            err = r.get(f"{metric}_stderr")
            arrow = "↑" if HIGHER_IS_BETTER[metric] else "↓"
            err_s = "N/A" if err is None or (isinstance(err, float) and math.isnan(err)) else f"{err:.4f}"
            lines.append(f"|{name if first else ''}|{metric}|{arrow}|{value:.4f}|±|{err_s}|")
            first = False
    if out.get("mean_exit_depth") is not None:
        lines.append(f"\nmean exit depth: {out['mean_exit_depth']:.3f}")
    return "\n".join(lines)
