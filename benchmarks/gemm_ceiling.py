"""GEMM ceiling of the CPU forward benchmark (issue 3): can ours reach 1.5x transformers' tokens/s?

`benchmarks/forward.py` runs SmolLM2-135M (batch 4 x 512, float32) on 2 pinned cores. Almost all of its
work is matrix multiplication, so its tokens/s is bounded by how fast this CPU multiplies float32
matrices. This script measures that bound instead of asserting it:

1. Work. The forward's floating-point operations are counted from the model's config (read from the
   GGUF metadata, nothing hard-coded): q, k, v, o, gate, up, down per layer, the tied LM head over every
   position, and attention's two batched products (QK^T, PV) counted full, causal-half
   (keys <= query) and as our chunked causal attention executes them. 2 flops per multiply-add.
2. Rates. In one process pinned to the same 2 cores: float32 GEMM GFLOP/s of XLA (a jitted
   `jnp.matmul`) and of PyTorch (`torch.matmul`, 2 threads) for each of the forward's matmul shapes
   and for a 2048^3 square GEMM (the easy case), median of N after warm-up; then both whole forwards
   once more (`forward.bench_forward`, the same code as the forward benchmark), as achieved GFLOP/s.
3. Ceiling. The best GEMM rate measured by either library gives the forward's best possible tokens/s
   if every flop ran at that rate (using the smallest, causal-half flop count); we compare it with 1.5x
   the transformers tokens/s measured in the same run.
4. XLA flags. Each candidate XLA:CPU flag (library dot fusions via YNNPACK / XNNPACK / oneDNN, fast
   math, optimisation preset, scheduler, fusion emitters, ...) runs our forward in a fresh subprocess
   with XLA_FLAGS set: tokens/s, max |logit diff| against the default flags, which library fusions the
   compiled forward contains (so a flag that changed nothing shows as such), and the XLA GEMM rate of
   the square and LM-head shapes under that flag.

Results: a table on stdout, JSON at benchmarks/results/gemm_ceiling.json, and the section
"GEMM ceiling (issue 3's forward target)" of BENCHMARKS.md.

    python benchmarks/gemm_ceiling.py [--batch 4] [--seq 512] [--runs 5] [--flag-runs 3] [--no-flags]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    BENCHMARKS_MD,
    CPUS,
    RESULTS,
    forward_parser,
    hf_offline,
    machine_info,
    median_time,
    pin_to_cpus,
    write_section,
)

DEFAULT_OUT = RESULTS / "gemm_ceiling.json"
TITLE = "## GEMM ceiling (issue 3's forward target)"
TARGET_RATIO = 1.5
# A flag worth wiring into the library: this much faster, with logits this close to the default's.
FLAG_SPEEDUP = 1.05
FLAG_LOGIT_TOL = 1e-4
DEFAULT_LABEL = "default"
# (label, XLA_FLAGS). jaxlib 0.10 runs CPU dots through YNNPACK by default ("individual_dot");
# an empty YNN list gives them back to XLA's Eigen path, which the XNNPACK / oneDNN rewrites then see.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
FLAG_SETTINGS: list[tuple[str, str]] = [
    (DEFAULT_LABEL, ""),
    ("YNNPACK off (Eigen dots)", YNN_OFF),
    ("YNNPACK dot+eltwise+reduce fusions", "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"),
    ("XNNPACK dot+eltwise+reduce (YNN off)", f"{YNN_OFF} --xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    ("oneDNN dot+eltwise+reduce (YNN off)", f"{YNN_OFF} --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    ("oneDNN thunks", "--xla_cpu_use_onednn=true"),
    ("XNNPACK ops", "--xla_cpu_use_xnnpack=true"),
    ("XNN graph fusion greedy", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("opt preset FAST_RUNTIME", "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
    ("thunk runtime off (deprecated)", "--xla_cpu_use_thunk_runtime=false"),
    ("concurrency-optimized scheduler", "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    ("fusion emitters off", "--xla_cpu_use_fusion_emitters=false"),
    (f"{DEFAULT_LABEL} (repeat)", ""),
]
MD_COLUMNS = [
    "date",
    "machine",
    "forward GFLOP (full / causal)",
    "best GEMM GFLOP/s",
    "XLA / torch square GEMM GFLOP/s",
    "ours tok/s (GFLOP/s)",
    "transformers tok/s (GFLOP/s)",
    "ceiling tok/s at best GEMM",
    f"{TARGET_RATIO}x transformers tok/s",
    "needs GFLOP/s",
    "above best GEMM",
    "best XLA flag",
]


# --------------------------------------------------------------------------------------------------
# work


@dataclasses.dataclass(frozen=True)
class MatMul:
    """`batch` independent [m, k] @ [k, n] products per call, `per_forward` calls per forward."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    per_forward: int
    attention: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n


def model_config(gguf: Path):
    """The model's shape from the GGUF metadata alone (no weights are read)."""
    from loopus_jax import config as C
    from loopus_jax.convert.gguf import GGUFSource

    return C.from_hf(GGUFSource(gguf).hf_config)


def forward_matmuls(cfg, batch: int, seq: int) -> list[MatMul]:
    """Every matmul of one base-model forward over [batch, seq] tokens; attention counted full."""
    t, d, i, hd, L = batch * seq, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return [
        MatMul("q proj", 1, t, d, q_out, L),
        MatMul("k proj", 1, t, d, kv_out, L),
        MatMul("v proj", 1, t, d, kv_out, L),
        MatMul("o proj", 1, t, q_out, d, L),
        MatMul("mlp gate", 1, t, d, i, L),
        MatMul("mlp up", 1, t, d, i, L),
        MatMul("mlp down", 1, t, i, d, L),
        MatMul("attn QK^T", batch * cfg.num_heads, seq, hd, seq, L, attention=True),
        MatMul("attn PV", batch * cfg.num_heads, seq, seq, hd, L, attention=True),
        MatMul("LM head (tied)", 1, t, d, cfg.vocab_size, 1),
    ]


def causal_fraction(seq: int) -> float:
    """Share of the full score matrix a causal mask keeps (keys j <= query i), the diagonal included."""
    return (seq + 1) / (2 * seq)


def chunked_fraction(seq: int) -> float:
    """Share of the full score matrix our attention computes: query blocks of ATTENTION_CHUNK see keys up to their end."""
    from loopus_jax.models.layers import ATTENTION_CHUNK as c

    if seq <= c:
        return 1.0
    pairs = sum((min(seq, s + c) - s) * min(seq, s + c) for s in range(0, seq, c))
    return pairs / (seq * seq)


def flop_breakdown(mms: list[MatMul], seq: int) -> dict:
    rows = [{"name": mm.name, "gflop": mm.flops * mm.per_forward / 1e9, "attention": mm.attention} for mm in mms]
    dense = sum(r["gflop"] for r in rows if not r["attention"])
    attn = sum(r["gflop"] for r in rows if r["attention"])
    return {
        "rows": rows,
        "dense_gflop": dense,
        "attention_full_gflop": attn,
        "total_full_gflop": dense + attn,
        "total_causal_gflop": dense + attn * causal_fraction(seq),
        "total_ours_executed_gflop": dense + attn * chunked_fraction(seq),
        "causal_fraction": causal_fraction(seq),
        "ours_chunked_fraction": chunked_fraction(seq),
    }


# --------------------------------------------------------------------------------------------------
# rates


def _operands(mm: MatMul, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lead = (mm.batch,) if mm.batch > 1 else ()
    a = rng.standard_normal((*lead, mm.m, mm.k), np.float32)
    b = rng.standard_normal((*lead, mm.k, mm.n), np.float32)
    return a, b


def xla_gemm(mm: MatMul, runs: int, warmup: int) -> tuple[float, list[float], object]:
    """Median seconds of a jitted float32 `jnp.matmul` of this shape (default precision is full float32 on CPU)."""
    import jax
    import jax.numpy as jnp

    a, b = _operands(mm)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.matmul)
    med, times = median_time(lambda: f(ja, jb).block_until_ready(), runs, warmup)
    return med, times, f(ja, jb)


def torch_gemm(mm: MatMul, runs: int, warmup: int) -> tuple[float, list[float], object]:
    import torch

    a, b = _operands(mm)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        med, times = median_time(lambda: torch.matmul(ta, tb), runs, warmup)
        return med, times, torch.matmul(ta, tb)


def gemm_table(mms: list[MatMul], runs: int, warmup: int) -> list[dict]:
    """Both libraries' rate for each distinct shape; their results are compared so a wrong fast kernel shows."""
    import numpy as np

    out, seen = [], {}
    for mm in mms:
        key = (mm.batch, mm.m, mm.k, mm.n)
        if key in seen:
            out.append({**seen[key], "name": mm.name, "per_forward": mm.per_forward, "attention": mm.attention})
            continue
        sx, tx, rx = xla_gemm(mm, runs, warmup)
        st, tt, rt = torch_gemm(mm, runs, warmup)
        rx, rt = np.asarray(rx), rt.numpy()
        row = {
            "name": mm.name,
            "shape_bmkn": list(key),
            "per_forward": mm.per_forward,
            "attention": mm.attention,
            "gflop": mm.flops / 1e9,
            "xla_s": sx,
            "torch_s": st,
            "xla_times_s": tx,
            "torch_times_s": tt,
            "xla_gflops": mm.flops / sx / 1e9,
            "torch_gflops": mm.flops / st / 1e9,
            # Both sum k products of standard normals in float32; their difference, relative to the largest entry,
            # is rounding (~1e-6), while a kernel that skipped or repeated work would differ by O(1).
            "xla_vs_torch_rel_diff": float(np.max(np.abs(rx - rt)) / np.max(np.abs(rt))),
        }
        seen[key] = row
        out.append(row)
        print(
            f"  {mm.name:16s} {'x'.join(map(str, key)):22s} "
            f"XLA {row['xla_gflops']:6.1f}  torch {row['torch_gflops']:6.1f} GFLOP/s",
            flush=True,
        )
        del rx, rt
    return out


def nominal_peak_gflops() -> dict | None:
    """Nominal float32 FMA peak at /proc/cpuinfo's clock for AMD Zen 2/3 (two 256-bit FMA pipes = 32 flop/cycle/core).

    Only a yardstick: the clock a VM reports is the base clock and boost may exceed it.
    """
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    except OSError:
        return None
    flags = set(info.get("flags", "").split())
    family, model = int(info.get("cpu family", "0") or 0), int(info.get("model", "0") or 0)
    zen2_or_3 = info.get("vendor_id") == "AuthenticAMD" and (
        family == 25 and "avx512f" not in flags or family == 23 and model >= 0x30
    )
    if not zen2_or_3 or not {"avx2", "fma"} <= flags or "cpu MHz" not in info:
        return None
    mhz = float(info["cpu MHz"])
    cores = len(os.sched_getaffinity(0))
    return {"mhz": mhz, "flop_per_cycle_per_core": 32, "cores": cores, "gflops": mhz * 1e-3 * 32 * cores}


def torch_blas() -> str:
    import torch

    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", cfg)
    return m.group(1) if m else "unknown"


# --------------------------------------------------------------------------------------------------
# whole forwards


def measure_forwards(gguf: Path, batch: int, seq: int, runs: int, warmup: int, seed: int) -> dict:
    """Ours and transformers' forward, alternated in this process, exactly as benchmarks/forward.py times them."""
    from forward import bench_forward

    f = bench_forward(gguf, batch, seq, runs, warmup, seed)
    keep = ("times_s", "median_s", "min_s", "tokens_per_s", "cpu_taken_by_others_median")
    return {
        "ours": {k: f["ours"][k] for k in keep},
        "transformers": {k: f["transformers"][k] for k in keep}
        | {"attn_implementation": f["transformers"]["attn_implementation"]},
        "ratio_ours_over_transformers": f["ratio_ours_over_transformers"],
        "logits": f["logits"],
        "forward_py_gflop": f["forward_gflop"],
    }


# --------------------------------------------------------------------------------------------------
# XLA flags (each in a fresh subprocess: XLA reads XLA_FLAGS once, when its CPU client starts)

_FUSION_KIND = re.compile(r'"kind":"(__\w+)"')
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_PLAIN_DOT = re.compile(r"= \S+ dot\(")


def library_calls(hlo_text: str) -> dict[str, int]:
    """Library fusions / custom calls / plain dots in an optimised HLO module, to show what a flag changed."""
    c = collections.Counter(_FUSION_KIND.findall(hlo_text))
    c.update(f"custom-call {t}" for t in _CUSTOM_CALL.findall(hlo_text))
    c["plain dot"] = len(_PLAIN_DOT.findall(hlo_text))
    return dict(sorted(c.items()))


def flag_child(gguf: Path, batch: int, seq: int, seed: int, runs: int, save: str | None, ref: str | None) -> dict:
    """Our forward under the XLA_FLAGS this process started with (the first call after compile is the warm-up)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import loopus_jax
    from loopus_jax import api

    model, _ = loopus_jax.load(gguf)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq), dtype=np.int32)
    graphdef, state = nnx.split(model)
    t = time.perf_counter()
    compiled = api._base_forward.lower(graphdef, state, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), None).compile()
    compile_s = time.perf_counter() - t
    calls = library_calls(compiled.as_text())
    del compiled

    def ours():
        return loopus_jax.forward(model, ids).logits.block_until_ready()

    med, times = median_time(ours, runs, 1)
    logits = np.asarray(ours())
    out = {
        "median_s": med,
        "times_s": times,
        "tokens_per_s": batch * seq / med,
        "compile_s": compile_s,
        "library_calls": calls,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if save:
        np.save(save, logits)
    if ref:
        r = np.load(ref, mmap_mode="r")
        out["max_abs_logit_diff"] = float(np.max(np.abs(logits - r)))
        out["argmax_agreement"] = float(np.mean(logits.argmax(-1) == np.asarray(r).argmax(-1)))
    del logits
    cfg = model.config
    for mm in (
        MatMul("square 2048^3", 1, 2048, 2048, 2048, 0),
        MatMul("LM head", 1, batch * seq, cfg.hidden_size, cfg.vocab_size, 1),
    ):
        s, _, _ = xla_gemm(mm, 3, 1)
        out[f"xla_gflops {mm.name}"] = mm.flops / s / 1e9
    return out


def run_flags(gguf: Path, batch: int, seq: int, seed: int, runs: int, settings: list[tuple[str, str]]) -> list[dict]:
    from loopus_jax.progress import progress

    results = []
    with tempfile.TemporaryDirectory(prefix="loopus-gemm-ceiling-") as tmp:
        ref = Path(tmp) / "default_logits.npy"
        for label, flags in progress(settings, "XLA flags", unit="setting"):
            is_ref = label == DEFAULT_LABEL
            cmd = [sys.executable, str(Path(__file__).resolve()), "--flag-child", "--batch", str(batch), "--seq", str(seq)]
            cmd += ["--seed", str(seed), "--flag-runs", str(runs)]
            cmd += ["--save-logits", str(ref)] if is_ref else ["--ref-logits", str(ref)]
            env = dict(os.environ, XLA_FLAGS=flags)
            t = time.perf_counter()
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {r.returncode}"]
                    res = {"error": tail[0][-300:]}
                else:
                    res = json.loads(r.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                res = {"error": "timed out after 600 s"}
            res |= {"label": label, "flags": flags, "wall_s": time.perf_counter() - t}
            results.append(res)
            if "error" in res:
                print(f"  {label:40s} FAILED: {res['error']}", flush=True)
            else:
                diff = res.get("max_abs_logit_diff", 0.0)
                print(
                    f"  {label:40s} {res['tokens_per_s']:6.1f} tok/s  max|dlogit| {diff:.2e}  {res['library_calls']}", flush=True
                )
    return results


def summarize_flags(results: list[dict]) -> dict:
    """Speed of each setting relative to the default (the mean of the two default runs, which also shows the noise)."""
    defaults = [r["tokens_per_s"] for r in results if r["label"].startswith(DEFAULT_LABEL) and "error" not in r]
    base = statistics.mean(defaults) if defaults else float("nan")
    for r in results:
        if "error" not in r:
            r["speedup_vs_default"] = r["tokens_per_s"] / base
    ok = [r for r in results if "error" not in r and not r["label"].startswith(DEFAULT_LABEL)]
    noise = (max(defaults) / min(defaults) - 1) if len(defaults) > 1 else None
    calls = next((r["library_calls"] for r in results if r["label"].startswith(DEFAULT_LABEL) and "error" not in r), None)
    # A winner is faster than the default's own run-to-run spread allows (3x it), or compiles to other library calls.
    beyond_noise = lambda r: noise is None or r["speedup_vs_default"] - 1 > 3 * noise or r["library_calls"] != calls
    winners = [
        r["label"]
        for r in ok
        if r["speedup_vs_default"] > FLAG_SPEEDUP and r.get("max_abs_logit_diff", 0.0) <= FLAG_LOGIT_TOL and beyond_noise(r)
    ]
    best = max(ok, key=lambda r: r["speedup_vs_default"], default=None)
    return {
        "default_tokens_per_s": base,
        "default_runs_tokens_per_s": defaults,
        "default_repeat_spread": noise,
        "best": None if best is None else {k: best[k] for k in ("label", "flags", "tokens_per_s", "speedup_vs_default")},
        "worth_wiring_in": winners,
    }


# --------------------------------------------------------------------------------------------------
# derivation and reporting


def derive(work: dict, gemms: list[dict], fwd: dict, ntok: int, peak: dict | None, flag_runs: list[dict] | None = None) -> dict:
    """Ceilings from the best GEMM rate of either library, also under any XLA flag setting that was tried."""
    rates = [(r["xla_gflops"], "XLA", r["name"]) for r in gemms] + [(r["torch_gflops"], "torch", r["name"]) for r in gemms]
    for r in flag_runs or []:
        if "error" not in r:
            rates += [(v, f"XLA [{r['label']}]", k.split(" ", 1)[1]) for k, v in r.items() if k.startswith("xla_gflops ")]
    best_rate, best_lib, best_shape = max(rates)
    cf = work["causal_fraction"]
    # Shape-aware: every matmul at the faster library's measured rate for its own shape (attention scaled to causal).
    t_shapes = sum(
        r["per_forward"] * min(r["xla_s"], r["torch_s"]) * (cf if r["attention"] else 1.0) for r in gemms if r["per_forward"]
    )
    t_xla = sum(r["per_forward"] * r["xla_s"] for r in gemms if r["per_forward"])
    t_torch = sum(r["per_forward"] * r["torch_s"] for r in gemms if r["per_forward"])
    causal_flop = work["total_causal_gflop"] * 1e9
    full_flop = work["total_full_gflop"] * 1e9
    torch_tps = fwd["transformers"]["tokens_per_s"]
    target_tps = TARGET_RATIO * torch_tps
    needs = target_tps * causal_flop / ntok / 1e9
    out = {
        "best_gemm_gflops": best_rate,
        "best_gemm_by": f"{best_lib}, {best_shape}",
        "ceiling_tokens_per_s_at_best_gemm": ntok * best_rate * 1e9 / causal_flop,
        "ceiling_tokens_per_s_shape_aware": ntok / t_shapes,
        "gemm_only_forward_s": {"xla_full_attention": t_xla, "torch_full_attention": t_torch, "best_per_shape_causal": t_shapes},
        "target_tokens_per_s": target_tps,
        "target_needs_gflops": needs,
        "target_above_best_gemm": needs / best_rate - 1,
        "achieved_gflops_full_count": {s: full_flop / fwd[s]["median_s"] / 1e9 for s in ("ours", "transformers")},
        "achieved_gflops_causal_count": {s: causal_flop / fwd[s]["median_s"] / 1e9 for s in ("ours", "transformers")},
        "achieved_share_of_best_gemm": {s: causal_flop / fwd[s]["median_s"] / 1e9 / best_rate for s in ("ours", "transformers")},
    }
    if peak:
        out["target_above_nominal_peak"] = needs / peak["gflops"] - 1
        out["best_gemm_share_of_nominal_peak"] = best_rate / peak["gflops"]
    return out


def conclusion(d: dict, fwd: dict) -> str:
    gap = d["target_above_best_gemm"]
    where = f"{gap:.0%} above" if gap > 0 else f"{-gap:.0%} below"
    shape = d["ceiling_tokens_per_s_shape_aware"]
    return (
        f"With every matmul at the rate the faster library reaches for its own shape (attention causal-half, "
        f"everything else free) the forward would run at {shape:.0f} tok/s = "
        f"{shape / fwd['transformers']['tokens_per_s']:.2f}x transformers' measured forward, "
        f"{'below' if shape < d['target_tokens_per_s'] else 'above'} the {TARGET_RATIO}x target. "
        f"{TARGET_RATIO}x transformers ({d['target_tokens_per_s']:.0f} tok/s) would need {d['target_needs_gflops']:.0f} GFLOP/s "
        f"sustained over the whole forward, {where} the best float32 GEMM rate measured on this "
        f"machine ({d['best_gemm_gflops']:.0f} GFLOP/s, {d['best_gemm_by']}); with every flop at that rate the forward "
        f"would reach {d['ceiling_tokens_per_s_at_best_gemm']:.0f} tok/s = "
        f"{d['ceiling_tokens_per_s_at_best_gemm'] / fwd['transformers']['tokens_per_s']:.2f}x transformers, "
        f"and ours already runs at {d['achieved_share_of_best_gemm']['ours']:.0%} of it."
    )


def format_tables(result: dict) -> str:
    w, g, f, d = result["work"], result["gemm"], result["forward"], result["derived"]
    lines = [
        f"forward flops, batch {result['config']['batch']} x {result['config']['seq']} ({result['config']['tokens']} tokens):"
    ]
    lines.append(f"  {'matmul':16s} {'b x m x k x n':22s} {'per fwd':>7s} {'GFLOP':>8s} {'XLA GF/s':>9s} {'torch GF/s':>10s}")
    for r in g:
        calls = r["per_forward"]
        lines.append(
            f"  {r['name']:16s} {'x'.join(map(str, r['shape_bmkn'])):22s} {calls:7d} {r['gflop'] * calls:8.1f} "
            f"{r['xla_gflops']:9.1f} {r['torch_gflops']:10.1f}"
        )
    lines.append(
        f"  dense {w['dense_gflop']:.1f} + attention {w['attention_full_gflop']:.1f} (full) = {w['total_full_gflop']:.1f} GFLOP; "
        f"causal-half attention {w['total_causal_gflop']:.1f}; "
        f"as our chunked attention executes it {w['total_ours_executed_gflop']:.1f}"
    )
    lines.append("whole forward (same run):")
    for s in ("ours", "transformers"):
        lines.append(
            f"  {s:12s} {f[s]['median_s']:.3f} s  {f[s]['tokens_per_s']:6.1f} tok/s  "
            f"{d['achieved_gflops_full_count'][s]:6.1f} GFLOP/s (full count; {d['achieved_gflops_causal_count'][s]:.1f} causal "
            f"= {d['achieved_share_of_best_gemm'][s]:.0%} of best GEMM)"
        )
    lines.append(
        f"  ratio ours/transformers {f['ratio_ours_over_transformers']:.2f}x; max |logit diff| {f['logits']['max_abs_diff']:.2e}"
    )
    gt = d["gemm_only_forward_s"]
    lines.append(
        f"  matmuls alone at the measured per-shape rates: XLA {gt['xla_full_attention']:.2f} s, "
        f"torch {gt['torch_full_attention']:.2f} s; best library per shape, causal attention "
        f"{gt['best_per_shape_causal']:.2f} s = {d['ceiling_tokens_per_s_shape_aware']:.0f} tok/s"
    )
    lines.append("ceiling:")
    lines.append(f"  best GEMM rate {d['best_gemm_gflops']:.1f} GFLOP/s ({d['best_gemm_by']})")
    pk = result.get("nominal_peak")
    if pk:
        lines.append(
            f"  nominal FMA peak {pk['gflops']:.0f} GFLOP/s ({pk['cores']} cores x {pk['flop_per_cycle_per_core']} flop/cycle x "
            f"{pk['mhz']:.0f} MHz reported; boost may exceed it); best GEMM = {d['best_gemm_share_of_nominal_peak']:.0%} of it"
        )
    lines.append(f"  forward at the best GEMM rate: {d['ceiling_tokens_per_s_at_best_gemm']:.0f} tok/s")
    lines.append(
        f"  target {TARGET_RATIO}x transformers: {d['target_tokens_per_s']:.0f} tok/s, "
        f"needs {d['target_needs_gflops']:.0f} GFLOP/s"
    )
    fl = result.get("flags")
    if fl:
        lines.append(f"XLA flags (our forward in a fresh process each, median of {result['config']['flag_runs']}):")
        lines.append(
            f"  {'setting':40s} {'tok/s':>7s} {'vs default':>10s} {'max|dlogit|':>11s} "
            f"{'XLA 2048^3':>10s} {'XLA LM head':>11s}  library calls"
        )
        for r in fl["runs"]:
            if "error" in r:
                lines.append(f"  {r['label']:40s} failed: {r['error']}")
                continue
            lines.append(
                f"  {r['label']:40s} {r['tokens_per_s']:7.1f} {r['speedup_vs_default']:9.3f}x "
                f"{r.get('max_abs_logit_diff', 0.0):11.2e} "
                f"{r['xla_gflops square 2048^3']:10.1f} {r['xla_gflops LM head']:11.1f}  {r['library_calls']}"
            )
        s = fl["summary"]
        spread = f"{s['default_repeat_spread']:.1%}" if s["default_repeat_spread"] is not None else "-"
        lines.append(f"  default runs {', '.join(f'{x:.1f}' for x in s['default_runs_tokens_per_s'])} tok/s (spread {spread})")
        lines.append(
            "  flags worth wiring in (> "
            f"{FLAG_SPEEDUP - 1:.0%} faster, logits within {FLAG_LOGIT_TOL:g}): {', '.join(s['worth_wiring_in']) or 'none'}"
        )
    lines.append("conclusion: " + result["conclusion"])
    return "\n".join(lines)


def md_row(result: dict) -> list[str]:
    m, w, f, d, g = result["machine"], result["work"], result["forward"], result["derived"], result["gemm"]
    sq = next(r for r in g if not r["per_forward"])
    fl = result.get("flags")
    best_flag = "-"
    if fl and fl["summary"]["best"]:
        b = fl["summary"]["best"]
        best_flag = f"{b['label']}: {b['speedup_vs_default']:.2f}x"
    return [
        m["date"][:10],
        f"{m['cpu_model']}, {len(m['affinity'])} cores",
        f"{w['total_full_gflop']:.0f} / {w['total_causal_gflop']:.0f}",
        f"{d['best_gemm_gflops']:.0f} ({d['best_gemm_by']})",
        f"{sq['xla_gflops']:.0f} / {sq['torch_gflops']:.0f}",
        f"{f['ours']['tokens_per_s']:.0f} ({d['achieved_gflops_full_count']['ours']:.0f})",
        f"{f['transformers']['tokens_per_s']:.0f} ({d['achieved_gflops_full_count']['transformers']:.0f})",
        f"{d['ceiling_tokens_per_s_at_best_gemm']:.0f}",
        f"{d['target_tokens_per_s']:.0f}",
        f"{d['target_needs_gflops']:.0f}",
        f"{d['target_above_best_gemm']:.0%}",
        best_flag,
    ]


def update_benchmarks_md(result: dict, tables: str) -> None:
    m, cfg = result["machine"], result["config"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    description = (
        f"`python benchmarks/gemm_ceiling.py`. Latest run: {m['date']}, {m['cpu_model']} (AVX2 + FMA, no AVX-512), pinned to "
        f"cores {m['affinity']} ({m['pinning']}); {versions}; torch BLAS {result['torch_blas']}; load average "
        f"{result['loadavg_before'][0]:.2f} before, {result['loadavg_after'][0]:.2f} after.\n\n"
        "Method: the forward's flops are counted from the model config (every projection, the tied LM head over all "
        f"{cfg['tokens']} positions, attention full and causal-half; 2 flops per multiply-add). "
        "In one process on the same 2 cores, "
        f"float32 GEMM rates of XLA (jitted `jnp.matmul`) and PyTorch (`torch.matmul`, 2 threads) are measured for each of the "
        f"forward's matmul shapes and a 2048^3 square (median of {cfg['runs']} after warm-up), then both whole forwards as in "
        "`benchmarks/forward.py`. The ceiling is the forward's causal flop count run entirely at the best GEMM rate "
        "either library reached; each candidate XLA:CPU flag runs our forward in a fresh process "
        "(tokens/s, max |logit diff| vs the default).\n\n"
        f"Conclusion: {result['conclusion']}\n\n"
        "```\n" + tables + "\n```\n\n"
        "Details: `benchmarks/results/gemm_ceiling.json`."
    )
    write_section(TITLE, description, MD_COLUMNS, [md_row(result)])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = forward_parser(__doc__, "timed runs per GEMM and per whole forward (median reported)", DEFAULT_OUT)
    ap.add_argument("--square", type=int, default=2048, help="side of the square best-case GEMM")
    ap.add_argument("--flag-runs", type=int, default=3, help="timed forwards per XLA flag setting")
    ap.add_argument("--no-flags", action="store_true", help="skip the XLA flag subprocesses")
    ap.add_argument("--flag-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save-logits", help=argparse.SUPPRESS)
    ap.add_argument("--ref-logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    hf_offline()
    if args.flag_child:
        import loopus_jax

        res = flag_child(
            loopus_jax.default_model_path(), args.batch, args.seq, args.seed, args.flag_runs, args.save_logits, args.ref_logits
        )
        print(json.dumps(res))
        return

    load_before = os.getloadavg()
    pinning = pin_to_cpus()
    import torch

    import loopus_jax

    torch.set_num_threads(min(len(CPUS), len(os.sched_getaffinity(0))))
    gguf = loopus_jax.default_model_path()
    cfg = model_config(gguf)
    ntok = args.batch * args.seq
    result: dict = {
        "benchmark": "gemm_ceiling",
        "machine": machine_info(pinning),
        "loadavg_before": load_before,
        "torch_blas": torch_blas(),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "model": gguf.name,
            "model_config": cfg.to_dict(),
            "dtype": "float32",
            "batch": args.batch,
            "seq": args.seq,
            "tokens": ntok,
            "runs": args.runs,
            "warmup": args.warmup,
            "flag_runs": args.flag_runs,
            "seed": args.seed,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
    }
    print(
        f"{result['machine']['cpu_model']}, affinity {result['machine']['affinity']} ({pinning}); load {load_before}", flush=True
    )
    mms = forward_matmuls(cfg, args.batch, args.seq)
    result["work"] = flop_breakdown(mms, args.seq)
    from forward import forward_flops

    # forward.py counts the same matmuls with full attention; the two independent counts must agree.
    result["work"]["forward_py_gflop"] = forward_flops(cfg, args.batch, args.seq) / 1e9
    print("forward GFLOP by matmul: " + ", ".join(f"{r['name']} {r['gflop']:.1f}" for r in result["work"]["rows"]), flush=True)
    print(f"GEMM rates (median of {args.runs} after {args.warmup} warm-up) ...", flush=True)
    square = MatMul(f"square {args.square}^3", 1, args.square, args.square, args.square, 0)
    result["gemm"] = gemm_table([*mms, square], args.runs, args.warmup)
    print(f"whole forwards ({args.runs} timed runs per side, alternating) ...", flush=True)
    result["forward"] = measure_forwards(gguf, args.batch, args.seq, args.runs, args.warmup, args.seed)
    if not args.no_flags:
        print(f"XLA flags ({len(FLAG_SETTINGS)} settings, fresh process each) ...", flush=True)
        runs = run_flags(gguf, args.batch, args.seq, args.seed, args.flag_runs, FLAG_SETTINGS)
        result["flags"] = {"runs": runs, "summary": summarize_flags(runs)}
    result["nominal_peak"] = nominal_peak_gflops()
    flag_runs = result["flags"]["runs"] if "flags" in result else []
    result["derived"] = derive(result["work"], result["gemm"], result["forward"], ntok, result["nominal_peak"], flag_runs)
    result["conclusion"] = conclusion(result["derived"], result["forward"])
    result["loadavg_after"] = os.getloadavg()
    tables = format_tables(result)
    print()
    print(tables)
    winners = result.get("flags", {}).get("summary", {}).get("worth_wiring_in")
    if winners:
        print(
            f"\n*** XLA flag setting(s) {winners} speed our forward up by > {FLAG_SPEEDUP - 1:.0%} "
            f"with logits within {FLAG_LOGIT_TOL:g} ***"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not args.no_md:
        update_benchmarks_md(result, tables)
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
