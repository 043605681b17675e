"""Looped forward: throughput and compile time against recursion depth N, and early exit's payoff.

A SmolLM2-135M-shaped looped model (random weights; encoder 0..1, reasoning 2..28, decoder 29),
batch 4 x 256, float32 on CPU pinned to 2 cores. For N = 1, 4, 8, 16: compile time (trace + lower +
XLA compile of the jitted forward) and median tokens/s of 5 runs after warm-up. The depth loop is one
`lax.scan` whose body compiles once, so compile(N=16) / compile(N=4) should stay near 1 (target <= 1.2).
With halting on (N = 16, `cdf`), lower thresholds make the batch exit earlier; wall time should fall
with the max exit depth: the while loop stops when every sample has halted.

    python benchmarks/looped_forward.py [--batch 4] [--seq 256] [--depths 1,4,8,16] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, machine_info, machine_label, median_time, pin_to_cpus, smollm2_config, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--depths", default="1,4,8,16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "looped_forward.json"))
    a = ap.parse_args()
    pinning = pin_to_cpus()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from loopus_jax.api import _looped_forward
    from loopus_jax.loop.model import loop_model
    from loopus_jax.models.transformer import Transformer

    base = Transformer(smollm2_config(), rngs=nnx.Rngs(0))
    model = loop_model(base, "1", "29-", n_recursion=16)
    del base
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 49152, (a.batch, a.seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    graphdef, state = nnx.split(model)
    tokens = a.batch * a.seq

    def compiled(**kw):
        opts, q, eps = model.options(**kw)
        t = time.perf_counter()
        exe = _looped_forward.lower(graphdef, state, ids, mask, opts, jnp.float32(q), jnp.float32(eps)).compile()
        secs = time.perf_counter() - t
        return (lambda: jax.block_until_ready(exe(state, ids, mask, jnp.float32(q), jnp.float32(eps)))), secs

    rows = []
    for n in [int(x) for x in a.depths.split(",")]:
        run, compile_s = compiled(n_recursion=n)
        med, times = median_time(run, a.runs, a.warmup)
        rows.append({"n": n, "compile_s": compile_s, "median_s": med, "tokens_per_s": tokens / med, "times": times})
        print(f"N={n:>3}  compile {compile_s:6.2f} s  forward {med:7.3f} s  {tokens / med:9.1f} tok/s", flush=True)
    by_n = {r["n"]: r for r in rows}
    ratio = by_n[16]["compile_s"] / by_n[4]["compile_s"] if 16 in by_n and 4 in by_n else None
    if ratio is not None:
        print(f"compile(N=16) / compile(N=4) = {ratio:.3f} (target <= 1.2)")

    # Early exit with the `cdf` rule: survival *= (1 - q) each step, so even the near-constant q of an
    # untrained head gives graded exit depths k ~ log(1 - threshold) / log(1 - q) as the threshold rises.
    n = 16
    halting = []
    for thr in (0.5, 0.9, 0.99, 0.999, 0.99999, 2.0):
        run, _ = compiled(n_recursion=n, halting="cdf", q_threshold=thr)
        exit_depth = np.asarray(run()[1])
        med, times = median_time(run, a.runs, 0)
        halting.append(
            {
                "q_threshold": thr,
                "mean_exit": float(exit_depth.mean()),
                "max_exit": int(exit_depth.max()),
                "median_s": med,
                "times": times,
            }
        )
        print(
            f"cdf threshold {thr:8.5f}: mean exit {exit_depth.mean():5.2f}, max {exit_depth.max():>2}, forward {med:7.3f} s",
            flush=True,
        )

    info = machine_info(pinning)
    result = {"machine": info, "config": vars(a), "depths": rows, "compile_ratio_16_4": ratio, "halting_n16": halting}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    date, label = info["date"][:10], machine_label(info)
    shape = f"SmolLM2-shaped, encoder 0..1, decoder 29, batch {a.batch} x {a.seq}, float32, CPU"
    write_section(
        f"## looped forward ({shape})",
        f"`python benchmarks/looped_forward.py`: median of {a.runs} runs after {a.warmup} warm-up, 2 pinned cores; "
        f"compile = trace + lower + XLA compile. compile(N=16) / compile(N=4) = {ratio:.3f} (target <= 1.2).",
        ["date", "machine", "N", "compile s", "forward s", "tok/s"],
        [[date, label, str(r["n"]), f"{r['compile_s']:.2f}", f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}"] for r in rows],
        key_columns=3,
    )
    write_section(
        f"## looped forward with early exit (N = 16, cdf halting; {shape})",
        "Random, untrained q head; `cdf` halting (survival *= 1 - q per step) gives graded exit depths as the threshold "
        "rises (2.0 never halts). The while loop stops when every sample has halted, so wall time follows the max exit depth.",
        ["date", "machine", "q_threshold", "mean exit depth", "max exit depth", "forward s"],
        [
            [date, label, f"{h['q_threshold']:g}", f"{h['mean_exit']:.2f}", str(h["max_exit"]), f"{h['median_s']:.3f}"]
            for h in halting
        ],
        key_columns=3,
    )
    print(f"wrote {a.out} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
