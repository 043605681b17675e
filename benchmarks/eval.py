"""Task scoring throughput: our jitted, bucketed scorer against lm-evaluation-harness's HF backend.

SmolLM2-135M (the embedded GGUF, float32) on the first --docs documents of a multiple-choice task:
HellaSwag when `hellaswag/hellaswag_val.jsonl` is under --data-dir, else the first present of piqa,
arc_challenge, openbookqa, winogrande (said in the output). Both sides score the same (context,
continuation) requests built by `loopus_jax.eval.tasks` (lm-eval's prompts): ours with
`loopus_jax.eval.scorer.Scorer` (rows per length bucket chosen for the free memory), lm-eval with
`HFLM(...).loglikelihood` (torch on the same 2 pinned cores, the same weights through our HF export
`loopus_jax.save(model, dir, format="hf")`), at its default batch size 1 and at the others in --hf-batches. Both
include tokenization. Documents/s are medians of --runs timed runs after one warm-up (ours: the
warm-up compiles). acc / acc_norm come from each side's log-likelihoods through the same metric code
and must agree.

    python benchmarks/eval.py [--data-dir ../shared/data] [--task T] [--docs 500] [--runs 2] [--hf-batches 1,16]

`--task` measures another task (results in `eval_T.json`): ARC-Challenge's four choices share their
question as HellaSwag's four endings share their context, which our scorer packs into one row.

Full-split zero-shot scores are long runs of `loopus eval tasks --model default --tasks T --data-dir D --out DIR/T`
(one task per run); `--collect DIR` turns their results.json files into the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine_info, machine_label, pin_to_cpus, write_section

FALLBACKS = ("hellaswag", "piqa", "arc_challenge", "openbookqa", "winogrande")


def pick_task(data_dir: Path) -> tuple[str, str]:
    from loopus_jax.eval.tasks import TASKS

    for name in FALLBACKS:
        if all((data_dir / f).is_file() for f in TASKS[name].files):
            note = "" if name == "hellaswag" else f"HellaSwag is not under {data_dir}; measured on {name} instead"
            return name, note
    raise SystemExit(f"none of {', '.join(FALLBACKS)} is under {data_dir}")


def timed(fn, runs: int) -> tuple[float, list[float], object, dict]:
    from forward import CpuMeter

    times, others, out = [], [], None
    for _ in range(runs):
        with CpuMeter() as m:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        others.append(round(m.foreign, 3))
    return statistics.median(times), times, out, {"cpu_taken_by_others": others}


def accuracy(task, docs, lls: list[float]) -> dict:
    from loopus_jax.eval.scorer import Score

    per_doc, i = [], 0
    for d in docs:
        n = len(task.requests(d))
        per_doc.append(task.process(d, [Score(x, False) for x in lls[i : i + n]]))
        i += n
    return {m: sum(p[m] for p in per_doc) / len(per_doc) for m in task.metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--task", help="task to measure (default: HellaSwag, else the first present fallback)")
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--hf-batches", default="1,16", help="lm-eval HF batch sizes to measure (1 is its default)")
    ap.add_argument("--out", help="result JSON (default: results/eval.json, results/eval_T.json with --task T)")
    ap.add_argument("--collect", help="folder of `loopus eval tasks --out` runs (one subfolder per task) to tabulate")
    a = ap.parse_args()
    if a.collect:
        return collect(Path(a.collect))
    pinning = pin_to_cpus()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    import numpy as np
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import loopus_jax as lj
    from loopus_jax.eval.requests import Loglikelihood
    from loopus_jax.eval.scorer import Scorer
    from loopus_jax.eval.tasks import TASKS

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = Path(a.data_dir)
    name, note = (a.task, "") if a.task else pick_task(data)
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    out = Path(a.out) if a.out else RESULTS / ("eval.json" if not a.task else f"eval_{name}.json")
    if note:
        print(note)
    task = TASKS[name]
    docs = task.docs(data, a.docs)
    reqs = [r for d in docs for r in task.requests(d)]
    model, tok = lj.load(lj.default_model_path())
    info = machine_info(pinning)

    scorer = Scorer(model, tok, show_progress=False)
    t = time.perf_counter()
    scorer.score(reqs)  # warm-up: compiles each bucket's shape once
    first = time.perf_counter() - t
    ours_s, ours_times, ours_scores, ours_cpu = timed(lambda: scorer.score(reqs), a.runs)
    ours_ll = [s.loglikelihood for s in ours_scores]
    print(
        f"ours: {len(docs) / ours_s:.2f} docs/s (runs {[round(t, 1) for t in ours_times]} s, first with compile {first:.1f} s)",
        flush=True,
    )
    # What packing a context's continuations into one row gives: the same scorer with every pair in its own row.
    unpacked = Scorer(model, tok, show_progress=False, pack=False)
    unpacked.score(reqs)
    flat_s, flat_times, flat_scores, flat_cpu = timed(lambda: unpacked.score(reqs), a.runs)
    pack_diff = max(abs(x.loglikelihood - y) for x, y in zip(flat_scores, ours_ll))
    print(f"ours, unpacked: {len(docs) / flat_s:.2f} docs/s (packing: {flat_s / ours_s:.2f}x, max |ll diff| {pack_diff:.1e})")

    hf_rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        lj.save(model, tmp, format="hf", tokenizer=tok)
        del model
        instances = [
            Instance("loglikelihood", {}, (r.context, r.continuation), i)
            for i, r in enumerate(reqs)
            if isinstance(r, Loglikelihood)
        ]
        for bs in [int(x) for x in a.hf_batches.split(",")]:
            hf = HFLM(pretrained=tmp, device="cpu", dtype="float32", batch_size=bs)
            hf.loglikelihood(instances[: 4 * bs], disable_tqdm=True)  # warm-up
            s, times, res, cpu = timed(lambda hf=hf: hf.loglikelihood(instances, disable_tqdm=True), a.runs)
            hf_rows[bs] = {"median_s": s, "times_s": times, "lls": [x[0] for x in res], **cpu}
            print(f"lm-eval HF bs={bs}: {len(docs) / s:.2f} docs/s (runs {[round(t, 1) for t in times]} s)", flush=True)
            del hf

    ours_acc = accuracy(task, docs, ours_ll)
    rows, table = [], [("", "docs/s", "median s", "acc", "acc_norm", "max |ll diff|", "CPU taken by others")]
    table.append(
        (
            "ours",
            f"{len(docs) / ours_s:.2f}",
            f"{ours_s:.1f}",
            *(f"{ours_acc.get(m, float('nan')):.4f}" for m in ("acc", "acc_norm")),
            "-",
            str(ours_cpu["cpu_taken_by_others"]),
        )
    )
    result = {
        "task": name,
        "note": note,
        "docs": len(docs),
        "requests": len(reqs),
        "ours": {
            "median_s": ours_s,
            "times_s": ours_times,
            "first_run_s_with_compile": first,
            "docs_per_s": len(docs) / ours_s,
            "accuracy": ours_acc,
            **ours_cpu,
        },
        "ours_unpacked": {
            "median_s": flat_s,
            "times_s": flat_times,
            "docs_per_s": len(docs) / flat_s,
            "packing_speedup": flat_s / ours_s,
            "max_abs_ll_diff_vs_packed": pack_diff,
            **flat_cpu,
        },
        "hf": {},
        "machine": info,
    }
    for bs, r in hf_rows.items():
        acc = accuracy(task, docs, r["lls"])
        diff = float(np.max(np.abs(np.array(r["lls"]) - np.array(ours_ll))))
        agree = all(acc[m] == ours_acc[m] for m in acc)
        ratio = r["median_s"] / ours_s
        dps = len(docs) / r["median_s"]
        busy = max(ours_cpu["cpu_taken_by_others"] + r["cpu_taken_by_others"])
        result["hf"][str(bs)] = {
            "median_s": r["median_s"],
            "times_s": r["times_s"],
            "docs_per_s": dps,
            "accuracy": acc,
            "max_abs_ll_diff": diff,
            "accuracy_agrees": agree,
            "ours_speedup": ratio,
            "cpu_taken_by_others": r["cpu_taken_by_others"],
        }
        accs = [f"{acc.get(m, float('nan')):.4f}" for m in ("acc", "acc_norm")]
        table.append(
            (f"lm-eval HF bs={bs}", f"{dps:.2f}", f"{r['median_s']:.1f}", *accs, f"{diff:.1e}", str(r["cpu_taken_by_others"]))
        )
        rows.append(
            [info["date"][:10], machine_label(info), name, str(len(docs)), f"{len(docs) / ours_s:.2f}", str(bs), f"{dps:.2f}"]
            + [
                f"{ratio:.2f}x",
                f"{ours_acc['acc']:.4f} / {acc['acc']:.4f}",
                "yes" if agree else "NO",
                f"{diff:.1e}",
                f"{busy:.0%}",
            ]
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"ours: first run with compilation {first:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    write_section(
        "## task scoring (SmolLM2-135M, float32, CPU): ours vs lm-eval's HF backend",
        f"`python benchmarks/eval.py --docs {a.docs} --runs {a.runs}`: the same (context, continuation) requests "
        "(lm-eval's prompts) scored by our jitted bucketed scorer and by lm-eval 0.4.13's `HFLM.loglikelihood` (torch, "
        f"same weights via our HF export, same 2 pinned cores); median of {a.runs} timed runs after a warm-up, "
        "tokenization included. Ratio = ours / HF docs/s. acc from each side's log-likelihoods through the same metric "
        "code. " + (note + ". " if note else "") + f"Latest run ({name}): ours {len(docs) / ours_s:.2f} docs/s with a context's "
        f"continuations packed into one row, {len(docs) / flat_s:.2f} without (each pair its own row; packing "
        f"{flat_s / ours_s:.2f}x). Details: `benchmarks/results/{out.name}`.",
        [
            "date",
            "machine",
            "task",
            "docs",
            "ours docs/s",
            "HF batch",
            "HF docs/s",
            "ratio",
            "acc ours / HF",
            "acc agree",
            "max abs ll diff",
            "CPU taken by others",
        ],
        rows,
        key_columns=6,
    )


def collect(folder: Path) -> None:
    """BENCHMARKS.md rows for full-split runs: one per task (and group) with each metric and stderr."""
    info = machine_info("as run by `loopus eval tasks` (not pinned)")
    rows, raw = [], {}
    for f in sorted(folder.glob("*/results.json")):
        res = json.loads(f.read_text())
        timing = (f.parent / "seconds.txt").read_text().strip() if (f.parent / "seconds.txt").exists() else "?"
        raw[f.parent.name] = {**res, "wall_seconds": timing}
        shown = {**res["groups"], **{k: v for k, v in res["results"].items() if not (res["groups"] and k.startswith("mmlu_"))}}
        for task, r in shown.items():
            for m in ("acc", "acc_norm", "perplexity", "word_perplexity"):
                if r.get(m) is not None:
                    err = r.get(f"{m}_stderr")
                    err_s = "N/A" if err is None else f"{err:.4f}"
                    rows.append([info["date"][:10], machine_label(info), task, m, f"{r[m]:.4f}", err_s, str(r["n_docs"]), timing])
    for r in rows:
        print(" | ".join(r))
    path = RESULTS / "eval_full_splits.json"  # earlier runs' tasks stay: one task per run, runs on different days
    kept = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**kept, **raw}, indent=1))
    write_section(
        "## zero-shot scores, full splits (SmolLM2-135M-Instruct GGUF, base model, float32, CPU)",
        "`loopus eval tasks --model default --tasks T --data-dir ../shared/data --out DIR/T`, one task per run, then "
        "`python benchmarks/eval.py --collect DIR`. lm-eval 0.4.13's task definitions (zero-shot, acc_norm by characters, "
        "LAMBADA perplexity stderr by 100000 seeded bootstrap resamples, MMLU size-weighted over its subjects with the "
        "pooled stderr). Wall seconds include loading the model, on a machine shared with other jobs. "
        "Details: `benchmarks/results/eval_full_splits.json`.",
        ["date", "machine", "task", "metric", "value", "stderr", "docs", "wall s"],
        rows,
        key_columns=4,
    )


if __name__ == "__main__":
    main()
