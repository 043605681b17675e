"""Self-speculative decoding against plain cached decoding (issue 9), SmolLM2-looped, N = 8, CPU.

Model: the embedded SmolLM2-135M-Instruct looped as in benchmarks/exit_criteria.py,
`loop_model(base, "1", "29-", n_recursion=8)` with a pass-through gate (h = h_new: each depth applies
the reasoning layers again), or a trained looped checkpoint given with --model. Prompts: the first
sentences of the demo's held-out text (CPython's documentation topics), batch 1 each, greedy, no stop
token, --new tokens. Plain = cached decoding at full depth (`halting="none"`); speculative =
`generate(..., speculative={"draft_depth": d, "draft_tokens": k})` for every (d, k) asked. Greedy
speculative output must equal plain output token for token (checked). Timed runs alternate plain and
each speculative configuration (median of --runs); tokens/s = new tokens / (prefill + decode seconds),
compile excluded; speedup = speculative / plain tokens/s from the same run. Acceptance rate = drafts
kept / drafts made; tokens per round = tokens from rounds / rounds.
Why the speedup is small on CPU: a round costs k draft steps plus one verification of k + 1 tokens,
which pays off when a (k + 1)-token pass costs about what a one-token step does (accelerators, where a
step is bound by reading the weights). The script also times plain decoding at N = d (a draft step)
and derives what one verification costs in full-depth steps: (round s - k x draft step s) / step s.

    python benchmarks/speculative.py [--runs 3] [--new 64] [--depths 1,2,4,6] [--tokens 2,4] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import RESULTS, machine_info, machine_label, pin_to_cpus, write_section
from forward import CpuMeter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median reported)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=2, help="prompts (batch 1 each) per run")
    ap.add_argument("--n-recursion", type=int, default=8)
    ap.add_argument("--depths", default="1,2,4,6", help="draft depths d")
    ap.add_argument("--tokens", default="2,4", help="draft tokens k per round")
    ap.add_argument("--model", help="a trained looped checkpoint instead of the untrained SmolLM2-looped")
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args()
    pinning = pin_to_cpus()

    import jax.numpy as jnp
    import numpy as np

    import loopus_jax as lj
    from loopus_jax.demo import demo_texts
    from loopus_jax.loop.model import loop_model

    n = a.n_recursion
    if a.model:
        model, tok = lj.load(a.model)
        what = a.model
    else:
        base, tok = lj.load(lj.default_model_path())
        model = loop_model(base, "1", "29-", n_recursion=n)
        model.gate.A_log.set_value(jnp.full(model.gate.A_log[...].shape, -1e4))  # A_bar = 1: h = h_new
        del base
        what = 'SmolLM2-135M-Instruct, loop_model(base, "1", "29-", N=8), pass-through gate, untrained'
    _, held, _ = demo_texts()
    sentences = [s.strip() + "." for s in held.replace("\n", " ").split(". ") if len(s.split()) > 8]
    prompts = [np.asarray(tok(s)["input_ids"][:48], np.int32)[None] for s in sentences[: a.prompts]]
    configs = [None] + [(d, k) for d in map(int, a.depths.split(",")) if d < n for k in map(int, a.tokens.split(","))]

    def run(cfg):
        kw = {"halting": "none"} if cfg is None else {"speculative": {"draft_depth": cfg[0], "draft_tokens": cfg[1]}}
        depth = cfg[1] if cfg is not None and cfg[0] == "depth" else n
        if depth != n:
            kw = {"halting": "none"}
        outs = [lj.generate(model, p, max_new_tokens=a.new, stop_tokens=[], n_recursion=depth, **kw) for p in prompts]
        return outs

    draft_steps = [("depth", d) for d in sorted({c[0] for c in configs[1:]})]

    for cfg in configs + draft_steps:  # compile every configuration once (and check greedy exactness)
        run(cfg)
    reference = [o.tokens for o in run(None)]
    times: dict = {c: [] for c in configs}
    step_s: dict = {c: [] for c in [None, *configs[1:], *draft_steps]}  # decode s per token (plain), per round (spec)
    facts: dict = {}
    with CpuMeter() as meter:
        for r in range(a.runs):
            for cfg in configs + draft_steps:
                outs = run(cfg)
                decode = sum(o.timings["decode_s"] for o in outs)
                per = sum(o.timings["rounds"] for o in outs) if cfg in configs[1:] else len(outs) * (a.new - 1)
                step_s[cfg].append(decode / per)
                if cfg in draft_steps:
                    continue
                secs = sum(o.timings["prefill_s"] + o.timings["decode_s"] for o in outs)
                times[cfg].append(sum(o.timings["new_tokens"] for o in outs) / secs)
                if cfg is not None:
                    assert all((o.tokens == t).all() for o, t in zip(outs, reference)), f"greedy mismatch at {cfg}"
                    drafted = sum(o.timings["drafted"] for o in outs)
                    kept = sum(o.timings["accepted"] for o in outs)
                    rounds = sum(o.timings["rounds"] for o in outs)
                    facts[cfg] = {
                        "acceptance_rate": kept / max(drafted, 1),
                        "tokens_per_round": (kept + rounds) / max(rounds, 1),
                    }
            print(f"run {r + 1}/{a.runs} done")
    plain = statistics.median(times[None])
    med = {c: statistics.median(v) for c, v in step_s.items()}
    for cfg in configs[1:]:  # one verification of k + 1 tokens, in full-depth steps
        d, k = cfg
        facts[cfg]["verify_in_steps"] = (med[cfg] - k * med[("depth", d)]) / med[None]
    print("decode s per token: " + ", ".join(f"N={c[1] if c else n}: {med[c]:.4f}" for c in [None, *draft_steps]))
    rows, records = [], []
    info = machine_info(pinning)
    date = time.strftime("%Y-%m-%d")
    for cfg in configs:
        tps = statistics.median(times[cfg])
        # Speedup: per run, speculative / plain of that same run, then the median.
        speed = statistics.median(s / p for s, p in zip(times[cfg], times[None]))
        f = facts.get(cfg, {})
        rec = {
            "draft_depth": None if cfg is None else cfg[0],
            "draft_tokens": None if cfg is None else cfg[1],
            "tokens_per_s": tps,
            "runs_tokens_per_s": times[cfg],
            "speedup": speed,
            **f,
        }
        records.append(rec)
        rows.append(
            [
                date,
                machine_label(info),
                "plain" if cfg is None else f"d={cfg[0]}, k={cfg[1]}",
                f"{tps:.3f}",
                f"{speed:.2f}x",
                "-" if cfg is None else f"{f['acceptance_rate']:.2f}",
                "-" if cfg is None else f"{f['tokens_per_round']:.2f}",
                "-" if cfg is None else f"{f['verify_in_steps']:.2f}",
            ]
        )
    cols = ["date", "machine", "decoding", "tok/s", "vs plain", "acceptance rate", "tokens / round", "verify (steps)"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(row))
    print(f"plain: {plain:.3f} tok/s; CPU taken by others while timing: {meter.foreign:.0%}")
    out = {
        "model": what,
        "n_recursion": n,
        "new_tokens": a.new,
        "prompts": a.prompts,
        "runs": a.runs,
        "cpu_taken_by_others": meter.foreign,
        "decode_s_per_token": {str(c[1] if c else n): med[c] for c in [None, *draft_steps]},
        "machine": info,
        "results": records,
    }
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=2)
    if not a.no_md:
        write_section(
            "## self-speculative decoding (SmolLM2-looped, N = 8, greedy, batch 1, float32, CPU)",
            f"`python benchmarks/speculative.py`: {what}. {a.prompts} prompts of up to 48 tokens (the demo's held-out "
            f"text), {a.new} new tokens each, greedy, no stop token; speculative output equals plain output token for "
            f"token (checked). tok/s = new tokens / (prefill + decode s), compile excluded, median of {a.runs} runs "
            "alternating plain and every configuration; vs plain = median of per-run ratios. d = draft depth, "
            "k = drafts per round; acceptance rate = drafts kept / drafts made; tokens / round includes the "
            f"verified token each round adds. CPU taken by others while timing: {meter.foreign:.0%}. "
            "verify = what one verification of k + 1 tokens costs in full-depth one-token steps, derived from "
            "decode seconds per round minus k draft steps (plain decoding at N = d, timed in the same runs): on "
            "XLA:CPU a few-row pass costs several one-row steps, so it eats the drafts' savings; on accelerators, "
            "where a step is bound by reading the weights, it costs about one. "
            "Details: `benchmarks/results/speculative.json`.",
            cols,
            rows,
            key_columns=3,
        )


if __name__ == "__main__":
    main()
