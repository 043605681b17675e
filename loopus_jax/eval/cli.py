"""`loopus eval tasks` and `loopus eval sweep` (registered on the `eval` subcommand by `register_eval`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS_HELP = """Zero-shot evaluation with lm-evaluation-harness's task definitions (prompts, choices, metrics,
standard errors) on the public release files under --data-dir. Tasks: arc_easy, arc_challenge, hellaswag,
piqa, winogrande, openbookqa, lambada_openai, wikitext, mmlu (or mmlu_<subject>).

Prints a table like lm-eval's (--json: the metrics as JSON); --out DIR writes results.json (metrics,
configuration, mean exit depth) and samples_<task>.jsonl (per-document requests, log-likelihoods,
greedy flags, exit depths and metrics). With --out, scores are also kept in DIR/score_cache as batches
finish: rerunning an interrupted command resumes there (a changed model or option starts afresh; delete
the folder to score everything again)."""

SWEEP_HELP = """Evaluate a looped model at several recursion depths N and plot each task's score against N
(and, with --halting, against the mean exit depth); --base PATH adds the base model's score as a
reference line. Every exit criterion is accepted (--halting NAME, its threshold with --halting-threshold,
other parameters with --halting-param NAME=VALUE). Writes sweep.json and sweep.png to --out; scores are
kept in --out's score_cache as they finish, so an interrupted sweep resumes when rerun."""


CACHE_FOLDER = "score_cache"  # under --out: scores saved as batches finish (loopus_jax.eval.score_cache)


def _common(p: argparse.ArgumentParser) -> None:
    from loopus_jax.cli import _model_arg
    from loopus_jax.loop.criteria import add_cli_flags

    _model_arg(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. arc_challenge,piqa,mmlu")
    p.add_argument("--data-dir", required=True, help="folder with the release files, laid out as <task folder>/<file>")
    p.add_argument("--limit", type=int, help="evaluate only the first K documents of each task (of each subject for mmlu)")
    add_cli_flags(p)
    p.add_argument("--batch-size", type=int, help="rows per jitted batch (default: chosen per length bucket for the free memory)")
    p.add_argument("--max-length", type=int, help="context window in tokens (default: the model's max_position_embeddings)")
    p.add_argument(
        "--bootstrap-iters", type=int, default=100000, help="bootstrap resamples for perplexity stderr (default 100000)"
    )
    p.add_argument("--mesh", help="device mesh spec, e.g. data=-1,fsdp=1,tensor=1 (batches are split along data/fsdp)")


def register_eval(evs: argparse._SubParsersAction) -> None:
    t = evs.add_parser(
        "tasks",
        help="zero-shot task accuracy / perplexity",
        description=TASKS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(t)
    t.add_argument("--n-recursion", type=int, help="looped models: recursion depth N (default: the checkpoint's)")
    t.add_argument("--out", help="output directory for results.json and samples_<task>.jsonl")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    t.set_defaults(fn=cmd_eval_tasks)

    s = evs.add_parser(
        "sweep",
        help="task scores against the recursion depth",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(s)
    s.add_argument("--n-recursion", required=True, help="depths to evaluate, e.g. 1,2,4,8,16")
    s.add_argument("--base", help="base model checkpoint whose score is drawn as a reference line")
    s.add_argument("--out", default="sweep_out", help="output directory (default sweep_out)")
    s.set_defaults(fn=cmd_eval_sweep)


def _load(path: str, mesh: str | None):
    import loopus_jax as lj
    from loopus_jax.cli import _resolve
    from loopus_jax.tokenizer import require_tokenizer

    src = _resolve(path)
    model, tok = lj.load(src, mesh=mesh)
    return model, require_tokenizer(tok, src)


def _check_data_dir(path: str) -> Path:
    from loopus_jax.errors import LoopusError
    from loopus_jax.eval.tasks import layout_help

    d = Path(path)
    if not d.is_dir():
        raise LoopusError(f"data directory {d} does not exist; expected a folder laid out as:\n{layout_help()}")
    return d


def _options(a: argparse.Namespace) -> dict:
    from loopus_jax.loop.criteria import params_from_flags

    return {
        "limit": a.limit,
        "batch_size": a.batch_size,
        "bootstrap_iters": a.bootstrap_iters,
        "halting": a.halting,
        "q_threshold": a.q_threshold,
        "halting_params": params_from_flags(a.halting_threshold, a.halting_param),
        **({"max_length": a.max_length} if a.max_length else {}),
    }


def cmd_eval_tasks(a: argparse.Namespace) -> None:
    from loopus_jax.cli import output_dir
    from loopus_jax.eval.runner import evaluate, format_table
    from loopus_jax.eval.tasks import resolve

    tasks = resolve(a.tasks)
    data = _check_data_dir(a.data_dir)
    out = output_dir(a.out) if a.out else None
    for t in tasks:  # read (and check) every file before loading the model
        for leaf in getattr(t, "leaves", [t]):
            leaf.docs(data, a.limit)
    model, tok = _load(a.model, a.mesh)
    opts = _options(a)
    max_length = opts.pop("max_length", None)
    cache = None if out is None else out / CACHE_FOLDER
    res = evaluate(model, tok, tasks, data, n_recursion=a.n_recursion, max_length=max_length, cache_dir=cache, **opts)
    res["config"]["model"] = a.model
    if out is not None:
        write_results(res, out)
    if a.json:
        print(json.dumps({k: res[k] for k in ("results", "groups", "mean_exit_depth", "config")}))
    else:
        print(format_table(res))
        if out is not None:
            print(f"wrote {out / 'results.json'} and samples_<task>.jsonl")


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({k: res[k] for k in ("results", "groups", "mean_exit_depth", "config")}, indent=1)
    )
    for task, recs in res["samples"].items():
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")


def cmd_eval_sweep(a: argparse.Namespace) -> None:
    from loopus_jax.cli import output_dir
    from loopus_jax.eval.sweep import parse_depths, sweep, write_sweep
    from loopus_jax.eval.tasks import resolve

    tasks = resolve(a.tasks)
    depths = parse_depths(a.n_recursion)
    data = _check_data_dir(a.data_dir)
    out = output_dir(a.out)
    for t in tasks:
        for leaf in getattr(t, "leaves", [t]):
            leaf.docs(data, a.limit)
    model, tok = _load(a.model, a.mesh)
    base = _load(a.base, a.mesh) if a.base else None
    opts = _options(a)
    halting, q_thr, params = opts.pop("halting"), opts.pop("q_threshold"), opts.pop("halting_params")
    res = sweep(
        model, tok, tasks, data, depths, base=base, halting=halting, q_threshold=q_thr, halting_params=params,
        cache_dir=out / CACHE_FOLDER, **opts,
    )
    res["model"], res["base_model"] = a.model, a.base
    js, png = write_sweep(res, out)
    for r in res["runs"]:
        depth = "" if r["mean_exit_depth"] is None else f" (mean exit depth {r['mean_exit_depth']:.2f})"
        scores = "; ".join(
            f"{t} " + ", ".join(f"{m} {v:.4f}" for m, v in ms.items() if not m.endswith("_stderr"))
            for t, ms in r["scores"].items()
        )
        print(f"N={r['n_recursion']}{depth}: {scores}")
    print(f"wrote {js} and {png}")
