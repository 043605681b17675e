"""Random-deep-supervision train step: time, tokens/s, compile time and compiled memory against depth N.

Default: a SmolLM2-135M-shaped looped model (random weights; encoder 0..1, reasoning 2..28, decoder
29), S = 2 supervised steps, batch 2 x 256, float32 on CPU pinned to 2 cores, AdamW with the
authors' accounting (grad_accum 1: an update after each supervised step). For N = 4, 8, 16: compile
time (lower + XLA compile), XLA's compiled memory (arguments + outputs, donated buffers counted once,
+ temporaries), and the median
step time of `--runs` steps after warm-up. The depth loop is one scan and unsupervised steps keep no
activations, so compile time and memory should stay flat in N while step time grows with N.

On a GPU: `--model qwen3-1.7b --dtype bfloat16 --peak-tflops 989` (H100 SXM dense bf16) adds the
model FLOPs utilisation: analytic model FLOPs of the step (`step_flops`: matmuls and attention, without
rematerialisation; XLA's cost analysis counts a loop body once, so it cannot be used) / time / peak.

    python benchmarks/train_step.py [--model smollm2|qwen3-1.7b] [--depths 4,8,16] [--batch 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import (
    RESULTS,
    machine_info,
    machine_label,
    median_time,
    pin_to_cpus,
    qwen3_1_7b_config,
    smollm2_config,
    write_section,
)
from forward import CpuMeter

MODELS = {
    "smollm2": (smollm2_config, "1", "29-", "SmolLM2-shaped, encoder 0..1, decoder 29"),
    "qwen3-1.7b": (qwen3_1_7b_config, "1", "27-", "Qwen3-1.7B-shaped, encoder 0..1, decoder 27"),
}


def step_flops(cfg, n_enc: int, n_reason: int, n_dec: int, n: int, s: int, batch: int, seq: int) -> float:
    """Model FLOPs of one train step: encoder forward; N - S unsupervised reasoning forwards; per
    supervised step two reasoning applications, the decoder and lm_head forward + backward (3x), plus
    the no-gradient decoder pass on h_old for lm_prev. Causal attention counts half the score matrix."""
    d, h, kv, hd, inter = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter) + 2 * h * hd * seq  # per token, forward
    head = 2 * d * cfg.vocab_size
    supervised = 3 * (2 * n_reason * layer + n_dec * layer + head) + n_dec * layer + head
    return float(batch * seq * (n_enc * layer + (n - s) * n_reason * layer + s * supervised))


def write_report(a: argparse.Namespace, rows: list[dict], shape_name: str, pinning: str, load_start: float) -> None:
    """JSON and the BENCHMARKS.md section for the depths measured so far (rewritten after each depth,
    so a run cut short on a busy machine still leaves its finished rows)."""
    by_n = {r["n"]: r for r in rows}
    lo, hi = min(by_n), max(by_n)
    mem_ratio = by_n[hi]["memory_gib"] / by_n[lo]["memory_gib"]
    compile_ratio = by_n[hi]["compile_s"] / by_n[lo]["compile_s"]
    todo = [int(x) for x in a.depths.split(",") if int(x) not in by_n]
    partial = f" Partial: N = {', '.join(map(str, todo))} not measured yet." if todo else ""
    print(f"memory(N={hi}) / memory(N={lo}) = {mem_ratio:.3f}; compile(N={hi}) / compile(N={lo}) = {compile_ratio:.3f}")

    info = machine_info(pinning)
    load = (load_start, os.getloadavg()[0])
    result = {
        "machine": info,
        "config": vars(a),
        "depths": rows,
        "memory_ratio": mem_ratio,
        "compile_ratio": compile_ratio,
        "load_avg_1min": {"start": load[0], "end": load[1]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = a.out or str(RESULTS / f"train_step_{a.model}_{a.dtype}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    date, label = info["date"][:10], machine_label(info)
    write_section(
        f"## train step ({shape_name}, S = {a.supervised}, batch {a.batch} x {a.seq}, {a.dtype} compute)",
        f"`python benchmarks/train_step.py --model {a.model} --dtype {a.dtype}`: one random-deep-supervision step with "
        f"AdamW updates (grad_accum 1), median of {a.runs} steps after {a.warmup} warm-up; compile = lower + XLA compile; "
        f"memory = XLA's compiled arguments + outputs (donated buffers once) + temporaries. "
        f"memory(N={hi}) / memory(N={lo}) = {mem_ratio:.3f}, "
        f"compile(N={hi}) / compile(N={lo}) = {compile_ratio:.3f}. "
        f"Shared machine: other agents ran on the same {os.cpu_count()} cores (1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end); 'CPU by others' = share of our cores other "
        f"processes used while the steps were timed, so step times are upper bounds.{partial}",
        ["date", "machine", "N", "compile s", "memory GiB", "step s", "tok/s", "model TFLOP/s", "MFU", "CPU by others"],
        [
            [
                date,
                label,
                str(r["n"]),
                f"{r['compile_s']:.1f}",
                f"{r['memory_gib']:.2f}",
                f"{r['median_s']:.2f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['model_tflops_per_s']:.3f}",
                f"{r['mfu']:.1%}" if "mfu" in r else "-",
                f"{r['cpu_taken_by_others']:.0%}",
            ]
            for r in rows
        ],
        key_columns=3,
    )
    print(f"wrote {out} and BENCHMARKS.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--supervised", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s in --dtype, for MFU")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to 2 cores (GPU hosts)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pinning = "not pinned" if a.no_pin else pin_to_cpus()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from loopus_jax.loop.model import loop_model
    from loopus_jax.models.transformer import Transformer
    from loopus_jax.train.step import StepConfig, adamw, init_state, train_step

    make_cfg, enc, dec, shape_name = MODELS[a.model]
    cfg = make_cfg()
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)), "labels": jnp.asarray(ids)}
    tokens = a.batch * a.seq
    opt = adamw(5e-5, 10, 1000)

    rows = []
    load_start = os.getloadavg()[0]
    for n in [int(x) for x in a.depths.split(",")]:
        base = Transformer(cfg, rngs=nnx.Rngs(0))
        model = loop_model(base, enc, dec, n_recursion=n)
        del base
        graphdef, frozen, state = init_state(model, opt, compute_dtype=a.dtype)
        del model
        step_cfg = StepConfig(n, a.supervised).check()
        t = time.perf_counter()
        exe = train_step.lower(graphdef, frozen, state, batch, opt, step_cfg).compile()
        compile_s = time.perf_counter() - t
        ma = exe.memory_analysis()
        # Donated state buffers are both arguments and outputs: count them once.
        mem = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
        lc = nnx.merge(graphdef, state.params, frozen).loop
        flops = step_flops(
            cfg, len(lc.encoder_layers), len(lc.reasoning_layers), len(lc.decoder_layers), n, a.supervised, a.batch, a.seq
        )
        box = [state]

        def run():
            box[0], losses, _, _ = exe(frozen, box[0], batch)
            return jax.block_until_ready(losses)

        with CpuMeter() as meter:  # other processes on our cores while timing (a shared machine)
            med, times = median_time(run, a.runs, a.warmup)
        row = {
            "n": n,
            "compile_s": compile_s,
            "memory_gib": mem / 2**30,
            "temp_gib": ma.temp_size_in_bytes / 2**30,
            "median_s": med,
            "tokens_per_s": tokens / med,
            "model_flops": flops,
            "model_tflops_per_s": flops / med / 1e12,
            "times": times,
            "cpu_taken_by_others": meter.foreign,
            "load_avg_1min_after": os.getloadavg()[0],
        }
        if a.peak_tflops:
            row["mfu"] = flops / med / (a.peak_tflops * 1e12)
        rows.append(row)
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(
            f"N={n:>3}  compile {compile_s:6.2f} s  memory {row['memory_gib']:6.3f} GiB (temp {row['temp_gib']:.3f})  "
            f"step {med:7.3f} s  {tokens / med:8.1f} tok/s  {flops / med / 1e12:.3f} TFLOP/s{mfu}  "
            f"CPU by others {meter.foreign:.0%}",
            flush=True,
        )
        write_report(a, rows, shape_name, pinning, load_start)


if __name__ == "__main__":
    main()
