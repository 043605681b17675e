"""What ratio over the authors' code the hardware allows: each `vs_reference.py` row against its physical floor.

A side-by-side ratio can only be as large as the reference's time over the least time any
implementation could take on the same cores. This script measures two ceilings of this machine on the
2 pinned cores, in float32 as both sides run:
- the best GEMM rate (a 2048^3 matmul, XLA and PyTorch, the faster taken), which bounds compute-bound
  work (the looped forward at batch 4 x 256, the train step);
- the best weight-streaming rate (a [1, 576] x [576, 2^19] matrix-vector product over 1.2 GB, XLA and
  PyTorch), which bounds batch-1 decoding, where every step reads every weight it applies.
It then reads `benchmarks/results/vs_reference.json` (the last `vs_reference.py` run) and, per row, counts
the work from the model's shape: matmul flops with causal attention at half the score matrix (the least
work either side could do) for the forward and the train step (`train_step.step_flops`), and for
decoding the prompt's prefill flops plus, per generated token after the first, the float32 bytes of
the weights applied at the row's mean exit depth (the lower of the two sides'). Floor = the work at the
ceiling; best possible ratio = their time / floor. A target above it cannot be met on this machine by
any implementation.

    python benchmarks/ceilings.py [--results benchmarks/results/vs_reference.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS, machine_info, machine_label, median_time, pin_to_cpus, smollm2_config, write_section

SPLIT = (2, 27, 1)  # vs_reference.py's SmolLM2 split: encoder 0..1, reasoning 2..28, decoder 29


def _median_rate(fn, work: float, runs: int = 5) -> float:
    return work / median_time(fn, runs, warmup=1)[0]


def measure_ceilings() -> dict:
    """Best float32 GEMM flop/s and matrix-vector weight bytes/s of XLA and PyTorch on these cores."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    out: dict = {}
    n = 2048
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    mm = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["gemm_flops"] = {
        "xla": _median_rate(lambda: mm(ja, jb).block_until_ready(), 2 * n**3),
        "torch": _median_rate(lambda: ta @ tb, 2 * n**3),
    }
    d, cols = 576, 1 << 19
    w = rng.random((d, cols), np.float32)
    x = np.ones((1, d), np.float32)
    jw, jx = jnp.asarray(w), jnp.asarray(x)
    tw, tx = torch.from_numpy(w), torch.from_numpy(x)
    out["gemv_bytes"] = {
        "xla": _median_rate(lambda: mm(jx, jw).block_until_ready(), w.nbytes),
        "torch": _median_rate(lambda: tx @ tw, w.nbytes),
    }
    return out


def layer_params(cfg) -> int:
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return d * h * hd * 2 + d * kv * hd * 2 + 3 * d * i


def forward_flops(cfg, layers: int, batch: int, seq: int) -> float:
    """Matmul flops of a forward through `layers` layers and the LM head, causal attention at half."""
    attn = cfg.num_heads * cfg.head_dim * seq  # scores + probs @ v per query token, halved by the causal mask
    return 2.0 * batch * seq * (layers * (layer_params(cfg) + attn) + cfg.hidden_size * cfg.vocab_size)


def floor_seconds(row: dict, cfg, config: dict, flops_s: float, bytes_s: float) -> tuple[float, str]:
    """The least time any implementation needs for this row's work, and how the work was counted."""
    from train_step import step_flops

    enc, reason, dec = SPLIT
    name = row["benchmark"]
    if name.startswith("forward"):
        f = forward_flops(cfg, enc + row["n"] * reason + dec, config["batch"], config["seq"])
        return f / flops_s, f"{f / 1e12:.3f} TFLOP"
    if name.startswith("train"):
        f = step_flops(cfg, enc, reason, dec, row["n"], row["s"], config["train_batch"], config["train_seq"])
        return f / flops_s, f"{f / 1e12:.3f} TFLOP"
    depth = min(row["ours_mean_exit_depth"], row["theirs_mean_exit_depth"])
    prefill = forward_flops(cfg, enc + row["n"] * reason + dec, row["batch"], row["prompt_len"])
    per_token = 4.0 * ((enc + depth * reason + dec) * layer_params(cfg) + cfg.hidden_size * cfg.vocab_size)
    steps = row["new_tokens"] - 1
    work = f"prefill {prefill / 1e9:.0f} GFLOP + {steps} x {per_token / 1e9:.2f} GB"
    return prefill / flops_s + steps * per_token / bytes_s, work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS / "vs_reference.json", help="vs_reference.py results")
    ap.add_argument("--out", type=Path, default=RESULTS / "ceilings.json")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args()
    if not a.results.is_file():
        print(f"skipped: no {a.results} (run benchmarks/vs_reference.py --reference-repo PATH first)")
        return
    pinning = pin_to_cpus()
    ref = json.loads(a.results.read_text())
    cfg = smollm2_config()
    ceil = measure_ceilings()
    flops_s, bytes_s = max(ceil["gemm_flops"].values()), max(ceil["gemv_bytes"].values())
    print(f"best GEMM {flops_s / 1e9:.1f} GFLOP/s ({ {k: round(v / 1e9, 1) for k, v in ceil['gemm_flops'].items()} })")
    print(f"best weight streaming {bytes_s / 1e9:.1f} GB/s ({ {k: round(v / 1e9, 1) for k, v in ceil['gemv_bytes'].items()} })")
    rows = []
    for r in ref["rows"]:
        floor, work = floor_seconds(r, cfg, ref["config"], flops_s, bytes_s)
        best = r["theirs_s"] / floor
        rows.append(
            {
                "benchmark": r["benchmark"],
                "work": work,
                "floor_s": floor,
                "theirs_s": r["theirs_s"],
                "ours_s": r["ours_s"],
                "ratio": r["ratio"],
                "best_possible_ratio": best,
                "target": r["target"],
                "target_possible": best >= r["target"],
                "ours_of_floor": floor / r["ours_s"],
            }
        )
        print(
            f"{r['benchmark']:<26} work {work:<32} floor {floor:7.3f} s  theirs {r['theirs_s']:7.3f} s  ours {r['ours_s']:7.3f} s"
            f"  ratio {r['ratio']:.2f}x  best possible {best:.2f}x  target {r['target']}x"
            f" {'possible' if best >= r['target'] else 'IMPOSSIBLE here'}"
        )
    info = machine_info(pinning)
    result = {"benchmark": "ceilings", "machine": info, "ceilings": ceil, "reference_run": ref["machine"]["date"], "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.no_md:
        return
    date = info["date"][:10]
    desc = (
        "`python benchmarks/ceilings.py`: the rows of the last `vs_reference.py` run (its date: "
        f"{ref['machine']['date']}) against this machine's ceilings, measured on the same 2 pinned cores in float32: "
        f"best GEMM {flops_s / 1e9:.1f} GFLOP/s (2048^3 matmul, faster of XLA and PyTorch) for the forward and "
        f"the train step, best weight streaming {bytes_s / 1e9:.1f} GB/s ([1, 576] x [576, 2^19] matrix-vector "
        "product, faster of the two) for batch-1 decoding. Work is counted from the model's shape, the least "
        "either side could do (causal attention at half the score matrix; decoding: prefill flops plus the "
        "weight bytes applied per generated token at the row's mean exit depth). Floor = work at the ceiling; "
        "best possible = their time / floor: no implementation can beat the reference by more on this machine. "
        "Ours of floor = floor / our time. Details: `benchmarks/results/ceilings.json`."
    )
    cols = ["date", "machine", "benchmark", "work", "floor s", "theirs s", "ours s", "ratio", "best possible", "target"]
    cols.append("ours of floor")
    md = [
        [
            date,
            machine_label(info),
            r["benchmark"],
            r["work"],
            f"{r['floor_s']:.3f}",
            f"{r['theirs_s']:.3f}",
            f"{r['ours_s']:.3f}",
            f"{r['ratio']:.2f}x",
            f"{r['best_possible_ratio']:.2f}x",
            f">= {r['target']}x ({'possible' if r['target_possible'] else 'not possible here'})",
            f"{100 * r['ours_of_floor']:.0f}%",
        ]
        for r in rows
    ]
    write_section("## ceilings of the vs-reference targets (float32, CPU)", desc, cols, md, key_columns=3)
    print("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
