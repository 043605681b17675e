"""Decoding throughput of `loopus_jax.generate` (SmolLM2-135M, float32, CPU) against transformers' `generate`.

What is measured, and why:

1. Base model, side by side with transformers. The embedded SmolLM2-135M GGUF is loaded by
   `loopus_jax.load` and exported with `loopus_jax.save(model, tmp, format="hf")`; transformers loads
   that export, so both sides run the very same float32 weights, in one process, pinned to the same
   2 cores (`taskset -c 0,1`, `torch.set_num_threads(2)`). A seeded batch of random 64-token prompts
   (batch 1 and 8) is continued greedily for 128 new tokens (no stop token: transformers gets
   `min_new_tokens` = `max_new_tokens`, ours `stop_tokens=[]`). Timed runs alternate ours /
   transformers (at batch > 1 transformers runs only --hf-runs-batched times: minutes per run); we
   report medians, tokens/s = batch x new tokens / wall seconds (prefill included, compile excluded:
   ours compiles once per shape, timed separately), the ratio, and whether the two greedy
   continuations agree token for token.
2. Looped models: `loop_model(base, "0-1", "29-", n_recursion=N)` for N = 4 and 8 (random gate and
   q head), with cache at fixed depth and with cache and early exit (`cdf` halting at a threshold that
   gives a mean exit depth well below N on this untrained q head; the mean is reported).
3. No cache (`cache=False`: the whole prefix recomputed for every token) at batch 1, for fewer new
   tokens (--nocache-new, default 32) since its cost grows with the square of the length; its
   tokens/s is therefore an upper bound of what it would reach over 128 tokens.
4. Linear growth: the cached looped model (N = the first depth) at batch 1 for 32, 64 and 128 new
   tokens; decode seconds per token should stay flat (the step attends to a preallocated cache).
CPU taken by others: share of our 2 cores used by other processes while timing (a shared machine
shows up here instead of silently skewing one side).

    python benchmarks/decode.py [--quick] [--runs 3] [--batches 1,8] [--depths 4,8] [--new 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, hf_offline, machine_info, machine_label, pin_to_cpus, write_section
from forward import CpuMeter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1, N = 4, 32 new tokens, 1 run (a smoke test, ~3 min)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--nocache-new", type=int, default=32)
    ap.add_argument("--growth", default="32,64,128")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each base-model configuration (median reported)")
    ap.add_argument("--looped-runs", type=int, default=2, help="timed runs of each looped configuration (median reported)")
    ap.add_argument(
        "--hf-runs-batched", type=int, default=1, help="timed transformers runs at batch > 1 (minutes each on 2 cores)"
    )
    ap.add_argument("--cdf-threshold", type=float, default=0.7, help="early-exit threshold of the cdf rule")
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args()
    if a.quick:
        a.batches, a.depths, a.new, a.nocache_new, a.growth, a.runs, a.looped_runs = "1", "4", 32, 8, "16,32", 1, 1
    hf_offline()
    pinning = pin_to_cpus()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import loopus_jax as lj
    from loopus_jax.loop.model import loop_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    batches = [int(x) for x in a.batches.split(",")]
    depths = [int(x) for x in a.depths.split(",")]
    base, _ = lj.load(lj.default_model_path())
    tmp = tempfile.TemporaryDirectory(prefix="loopus-bench-decode-")
    lj.save(base, Path(tmp.name) / "hf", format="hf")
    hf = AutoModelForCausalLM.from_pretrained(str(Path(tmp.name) / "hf"), dtype=torch.float32).eval()
    prompts = np.random.default_rng(0).integers(0, base.config.vocab_size, (max(batches), a.prompt_len), dtype=np.int32)
    foreign: list[float] = []

    def ours(model, ids, new, **kw):
        """(seconds excluding compile, output); compile happens on the first call of a shape only."""
        with CpuMeter() as m:
            t = time.perf_counter()
            out = lj.generate(model, ids, max_new_tokens=new, stop_tokens=[], **kw)
            secs = time.perf_counter() - t - out.timings["compile_s"]
        foreign.append(m.foreign)
        return secs, out

    def theirs(ids, new):
        x = torch.from_numpy(ids.astype(np.int64))
        with CpuMeter() as m, torch.no_grad():
            t = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            secs = time.perf_counter() - t
        foreign.append(m.foreign)
        return secs, out[:, ids.shape[1] :].numpy()

    rows, growth = [], []
    measured_decode: dict[int, list[float]] = {}

    def record(model_name, n, b, mode, new, times, out, hf_times=None, agree=None):
        med = statistics.median(times)
        row = {
            "model": model_name,
            "n_recursion": n,
            "batch": b,
            "mode": mode,
            "new_tokens": new,
            "times_s": times,
            "median_s": med,
            "tokens_per_s": b * new / med,
            "mean_exit_depth": out.mean_exit_depth,
            "compile_s": out.timings["compile_s"],
        }
        if hf_times:
            hm = statistics.median(hf_times)
            row |= {"transformers_times_s": hf_times, "transformers_tokens_per_s": b * new / hm, "ratio": hm / med}
            row["tokens_agree_with_transformers"] = agree
        rows.append(row)
        extra = f"  transformers {row['transformers_tokens_per_s']:7.2f} tok/s  ratio {row['ratio']:.2f}x" if hf_times else ""
        print(
            f"{model_name:>10} b={b} {mode:<18} {new:>4} new: {row['tokens_per_s']:8.2f} tok/s (median {med:.2f} s), "
            f"mean exit {row['mean_exit_depth']:.2f}{extra}",
            flush=True,
        )

    # 1. base model, ours vs transformers, alternating
    for b in batches:
        ids = prompts[:b]
        first, out = ours(base, ids, a.new)  # compiles, then runs
        theirs(ids, 8)  # transformers' warm-up
        t_ours, t_hf = [], []
        for r in range(a.runs):
            s, out = ours(base, ids, a.new)
            t_ours.append(s)
            if r < (a.runs if b == 1 else a.hf_runs_batched):
                s, hf_tokens = theirs(ids, a.new)
                t_hf.append(s)
        agree = [int(np.argmax(np.r_[r != h, True])) for r, h in zip(out.tokens, hf_tokens)]  # first mismatch (new = all equal)
        record("base", 0, b, "cache", a.new, t_ours, out, t_hf, agree)
    secs, out = ours(base, prompts[:1], a.nocache_new, cache=False)
    record("base", 0, 1, "no cache", a.nocache_new, [secs], out)

    # 2-3. looped models
    looped = {}
    for n in depths:
        model = looped[n] = loop_model(base, "0-1", "29-", n_recursion=n)
        name = f"looped N={n}"
        for b in batches:
            ids = prompts[:b]
            for mode, kw in (("cache", {}), ("cache + early exit", {"halting": "cdf", "q_threshold": a.cdf_threshold})):
                times, decode = [], []
                for _ in range(a.looped_runs):
                    s, out = ours(model, ids, a.new, **kw)
                    times.append(s)
                    decode.append(out.timings["decode_s"])
                record(name, n, b, mode, a.new, times, out)
                if n == depths[0] and b == 1 and mode == "cache":
                    measured_decode = {a.new: decode}
        secs, out = ours(model, prompts[:1], a.nocache_new, cache=False)
        record(name, n, 1, "no cache", a.nocache_new, [secs], out)

    # 4. linear growth of the cached looped decode
    n = depths[0]
    for new in [int(x) for x in a.growth.split(",")]:
        times = measured_decode.get(new, []) if 1 in batches else []  # the main run's point, when it is one
        while len(times) < a.looped_runs:
            s, out = ours(looped[n], prompts[:1], new)
            times.append(out.timings["decode_s"])
        med = statistics.median(times)
        growth.append(
            {"n_recursion": n, "new_tokens": new, "decode_times_s": times, "decode_s": med, "s_per_token": med / (new - 1)}
        )
        print(f"growth N={n} b=1 {new:>4} new: decode {med:.2f} s, {med / (new - 1) * 1000:.1f} ms/token", flush=True)
    g0, g1 = growth[0], growth[-1]
    growth_ratio = g1["s_per_token"] / g0["s_per_token"]
    print(f"s/token at {g1['new_tokens']} vs {g0['new_tokens']} new tokens: {growth_ratio:.2f} (1 = linear total time)")
    busy = statistics.median(foreign) if foreign else 0.0
    print(f"CPU taken by other processes while timing (median): {busy:.0%}")

    info = machine_info(pinning)
    result = {
        "benchmark": "decode",
        "machine": info,
        "config": vars(a),
        "rows": rows,
        "growth": growth,
        "growth_s_per_token_ratio": growth_ratio,
        "cpu_taken_by_others_median": busy,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    if a.no_md:
        return
    date, label = info["date"][:10], machine_label(info)
    write_section(
        f"## decode (SmolLM2-135M, {a.prompt_len}-token prompts, float32, CPU)",
        f"`python benchmarks/decode.py{' --quick' if a.quick else ''}`: greedy continuation of random prompts; tokens/s = "
        f"batch x new tokens / wall seconds (prefill included, compile excluded), median of {a.runs} runs (looped: "
        f"{a.looped_runs}; transformers at batch > 1: {a.hf_runs_batched}). Transformers: "
        "`generate` on our HF export of the same weights, same process and 2 pinned cores, runs alternating with ours; "
        "ratio = ours / transformers tokens/s; 'agree' = the greedy tokens are identical. Looped: `loop_model(base, '0-1', "
        f"'29-', n_recursion=N)` with a random gate and q head; early exit = `cdf` halting at {a.cdf_threshold}. No cache "
        f"recomputes the whole prefix per token (measured over {a.nocache_new} new tokens only: its cost per token grows "
        f"with the length). CPU taken by others while timing: {busy:.0%}.",
        [
            "date",
            "machine",
            "model",
            "batch",
            "mode",
            "new tokens",
            "tok/s",
            "mean exit depth",
            "transformers tok/s",
            "ratio",
            "agree",
        ],
        [
            [
                date,
                label,
                r["model"],
                str(r["batch"]),
                r["mode"],
                str(r["new_tokens"]),
                f"{r['tokens_per_s']:.2f}",
                f"{r['mean_exit_depth']:.2f}",
                f"{r['transformers_tokens_per_s']:.2f}" if "ratio" in r else "-",
                f"{r['ratio']:.2f}x" if "ratio" in r else "-",
                ("yes" if all(x == r["new_tokens"] for x in r["tokens_agree_with_transformers"]) else "no")
                if "ratio" in r
                else "-",
            ]
            for r in rows
        ],
        key_columns=5,
    )
    write_section(
        "## decode time vs generated length (cached looped SmolLM2, batch 1, float32, CPU)",
        f"`python benchmarks/decode.py`: decode seconds (prefill excluded) per generated token, median of {a.looped_runs} "
        f"runs; flat = total time linear in the length. s/token({g1['new_tokens']}) / s/token({g0['new_tokens']}) = "
        f"{growth_ratio:.2f}.",
        ["date", "machine", "N", "new tokens", "decode s", "ms/token"],
        [
            [date, label, str(g["n_recursion"]), str(g["new_tokens"]), f"{g['decode_s']:.2f}", f"{g['s_per_token'] * 1000:.1f}"]
            for g in growth
        ],
        key_columns=4,
    )
    print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
