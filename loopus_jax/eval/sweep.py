"""Depth sweep: the same tasks at several recursion depths N (and, with halting, against the mean exit
depth), with the base model's score as a reference line; JSON + PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flax import nnx

from loopus_jax.errors import LoopusError
from loopus_jax.eval.runner import HIGHER_IS_BETTER, evaluate, primary_metrics
from loopus_jax.eval.tasks import Group, Task


def parse_depths(spec: str | list[int]) -> list[int]:
    try:
        depths = [int(x) for x in spec.split(",") if x.strip()] if isinstance(spec, str) else [int(x) for x in spec]
    except ValueError:
        raise LoopusError(f"cannot parse depths {spec!r}; expected comma-separated integers such as 1,2,4,8,16") from None
    if not depths or min(depths) < 1:
        raise LoopusError(f"depths must be integers >= 1, got {spec!r}")
    return sorted(set(depths))


def _scores(out: dict) -> dict[str, dict[str, float]]:
    rows = {**out["groups"], **{k: v for k, v in out["results"].items() if not (out["groups"] and k.startswith("mmlu_"))}}
    return {name: {**primary_metrics(r), **{k: v for k, v in r.items() if k.endswith("_stderr")}} for name, r in rows.items()}


def sweep(
    model: nnx.Module,
    tokenizer: Any,
    tasks: list[Task | Group],
    data_dir: str | Path,
    depths: list[int],
    *,
    base: tuple[nnx.Module, Any] | None = None,
    halting: str | None = None,
    q_threshold: float | None = None,
    halting_params: dict | None = None,
    **kw: Any,
) -> dict:
    """`evaluate` at each N in `depths` (looped `model`), plus once on `base` when given. `halting` is
    any exit criterion (`loopus_jax.loop.criteria`), `halting_params` its parameters by name."""
    from loopus_jax.loop.model import LoopedLM

    if not isinstance(model, LoopedLM):
        raise LoopusError("sweep needs a looped model (convert one with loopus convert --encoder/--decoder)")
    runs = []
    for n in depths:
        halt = dict(halting=halting, q_threshold=q_threshold, halting_params=halting_params)
        out = evaluate(model, tokenizer, tasks, data_dir, n_recursion=n, **halt, **kw)
        runs.append({"n_recursion": n, "mean_exit_depth": out["mean_exit_depth"], "scores": _scores(out)})
    ref = None
    if base is not None:
        ref = {"scores": _scores(evaluate(base[0], base[1], tasks, data_dir, **kw))}
    return {
        "depths": depths,
        "halting": halting or model.loop.halting,
        "q_threshold": q_threshold,
        "halting_params": halting_params,
        "runs": runs,
        "base": ref,
    }


def plot_sweep(result: dict, path: str | Path) -> Path:
    """One panel per (task, metric): the score against N; with halting also against the mean exit depth;
    the base model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    panels = [(t, m) for t, ms in runs[0]["scores"].items() for m in ms if m in HIGHER_IS_BETTER]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    halting = result["halting"] != "none" and any(r["mean_exit_depth"] is not None for r in runs)
    for ax, (task, metric) in zip(axes.flat, panels):
        ns = [r["n_recursion"] for r in runs]
        ys = [r["scores"][task][metric] for r in runs]
        ax.plot(ns, ys, "o-", label="vs N (max depth)")
        if halting:
            ax.plot([r["mean_exit_depth"] for r in runs], ys, "s--", label="vs mean exit depth")
        if result.get("base"):
            ax.axhline(result["base"]["scores"][task][metric], color="gray", ls=":", label="base model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xlabel("recursion depth")
        values = [*ys, *([result["base"]["scores"][task][metric]] if result.get("base") else [])]
        if "perplexity" in metric and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")  # perplexities spanning decades; otherwise a linear axis reads better
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    title = f"depth sweep (halting: {result['halting']})"
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "sweep.json"
    js.write_text(json.dumps(result, indent=1))
    return js, plot_sweep(result, out_dir / "sweep.png")
