"""Forward-pass throughput and conversion memory of loopus-jax against transformers, on CPU.

What is measured, and why:

1. Throughput. The embedded SmolLM2-135M-Instruct GGUF is loaded twice in one process: by
   `loopus_jax.load` and by transformers (`AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`),
   both dequantized to float32, so both sides run the very same weights. A batch of random token ids
   (seeded, default 4 x 512) goes through our jitted `loopus_jax.forward` (timed up to
   `.block_until_ready()`) and through transformers' PyTorch forward (`torch.no_grad()`,
   `model(ids).logits`). After warm-up runs, the timed runs alternate ours / theirs so that slow drift
   of a shared machine hits both sides alike; we report the median (and min) of each, tokens/s and the
   ratio ours / transformers. The two logits are compared (max abs diff, argmax agreement) so that a
   fast-but-wrong forward cannot pass. Our compile time is timed explicitly as trace + lower +
   `compile()` of the jitted function `forward` uses; the first call after it reuses that executable.

   Threads. Both sides get the same two cores: the script runs itself under `taskset -c 0,1`
   (re-executing when the process is not already pinned to exactly those cores; an env var guards
   the re-exec). XLA's CPU client sizes its intra-op thread pool from the process affinity mask, so it
   gets two threads; PyTorch is told `torch.set_num_threads(2)`. XLA_FLAGS are not used to limit
   threads: they are not a reliable control on the CPU client.

2. Conversion peak memory. Each load runs in a fresh subprocess so that nothing else is resident:
   `loopus_jax.load(<gguf>)`, and `loopus_jax.load(<hf dir>)` on an HF safetensors directory that a
   separate subprocess exported from the GGUF with `loopus_jax.save(model, tmp, format="hf")`. We
   report `ru_maxrss` (peak RSS) next to the model's parameter bytes, the RSS right after
   `import jax, loopus_jax` (the baseline to subtract), and peaks of anonymous vs file-backed RSS
   sampled every few ms (memory-mapped checkpoint pages are file-backed: they show in RSS but are page
   cache, not a second private copy). Loading a GGUF also builds its tokenizer with transformers; a
   tokenizer-only subprocess shows that share. The claim under test: peak host memory is near one copy
   of the model, never two.

Results: a table on stdout, JSON at benchmarks/results/forward.json (--out), and a row in the
`## forward ...` section of BENCHMARKS.md at the repo root.

    python benchmarks/forward.py [--batch 4] [--seq 512] [--runs 5] [--warmup 1] [--no-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import BENCHMARKS_MD, CPUS, RESULTS, forward_parser, hf_offline, machine_info, pin_to_cpus, write_section

DEFAULT_OUT = RESULTS / "forward.json"
MD_COLUMNS = [
    "date",
    "machine",
    "threads",
    "runs",
    "ours tok/s",
    "transformers tok/s",
    "ratio",
    "CPU taken by others",
    "compile s",
    "max abs logit diff",
    "GGUF load peak RSS MiB",
    "HF load peak RSS MiB",
    "baseline RSS MiB",
    "model MiB (f32)",
]
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# pinning and machine info


# --------------------------------------------------------------------------------------------------
# memory measurement (runs inside child processes)


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


class RssSampler:
    """Samples /proc/self/status in a thread; keeps the peaks of anonymous and file-backed RSS."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_anon = self.peak_file = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = _status_kib()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))
        self.peak_total = max(self.peak_total, s.get("VmRSS", 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(mode: str, path: str) -> dict:
    """One clean measurement; the parent reads the JSON this prints on its last stdout line."""
    import jax

    import loopus_jax
    import loopus_jax.tokenizer

    jax.devices()  # initialise the CPU client, part of the baseline
    st = _status_kib()
    base = {
        "baseline_maxrss_mib": maxrss_mib(),
        "baseline_rss_mib": st["VmRSS"] / 1024,
        "baseline_anon_mib": st.get("RssAnon", 0) / 1024,
        "baseline_file_mib": st.get("RssFile", 0) / 1024,
    }
    if mode == "export-hf":
        model, _ = loopus_jax.load(path)
        loopus_jax.save(model, os.environ["LOOPUS_BENCH_EXPORT_TO"], format="hf")
        return base
    # `load` builds the tokenizer after the weights; note the peaks reached by then (weights only).
    before_tok: dict = {}
    real_load_tokenizer = loopus_jax.tokenizer.load_tokenizer

    def load_tokenizer_hook(*a, **k):
        before_tok.update(maxrss_mib=maxrss_mib(), anon_sampled_mib=s.peak_anon / 1024, t=time.perf_counter() - t0)
        return real_load_tokenizer(*a, **k)

    loopus_jax.tokenizer.load_tokenizer = load_tokenizer_hook
    t0 = time.perf_counter()
    with RssSampler() as s:
        if mode == "tokenizer":
            p = Path(path)
            load_tokenizer_hook(p.parent, gguf_file=p.name)
            nbytes = 0
        else:
            import numpy as np
            from flax import nnx

            model, _ = loopus_jax.load(path)
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            jax.block_until_ready(leaves)
            nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    return {
        **base,
        "seconds": time.perf_counter() - t0,
        "weights_seconds": before_tok.get("t"),
        "peak_maxrss_mib": maxrss_mib(),
        "weights_peak_maxrss_mib": before_tok.get("maxrss_mib"),
        "weights_peak_anon_sampled_mib": before_tok.get("anon_sampled_mib"),
        "peak_anon_sampled_mib": s.peak_anon / 1024,
        "peak_file_sampled_mib": s.peak_file / 1024,
        "end_rss_mib": _status_kib()["VmRSS"] / 1024,
        "param_bytes": nbytes,
    }


def run_child(mode: str, path: str | Path, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, **(extra_env or {}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-path", str(path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_rss(gguf: Path) -> dict:
    out = {"gguf": run_child("load", gguf), "gguf_tokenizer_only": run_child("tokenizer", gguf)}
    with tempfile.TemporaryDirectory(prefix="loopus-bench-hf-") as tmp:
        hf_dir = Path(tmp) / "hf"
        run_child("export-hf", gguf, {"LOOPUS_BENCH_EXPORT_TO": str(hf_dir)})
        out["hf_dir_bytes"] = sum(f.stat().st_size for f in hf_dir.iterdir())
        out["hf"] = run_child("load", hf_dir)
    return out


# --------------------------------------------------------------------------------------------------
# throughput


class CpuMeter:
    """CPU time that *other* processes (and the hypervisor, as steal) took on our cores while timing.

    Busy time of our cores comes from /proc/stat; our own from getrusage. A shared or busy machine
    shows up here instead of silently skewing one side of the comparison.
    """

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0))
        self.hz = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float, float]:
        busy = steal = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in self.cpus:
                v = [int(x) for x in vals]
                busy += sum(v[:8]) - v[3] - v[4] - v[7]  # user..softirq, not idle/iowait/steal
                steal += v[7]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy / self.hz, steal / self.hz, ru.ru_utime + ru.ru_stime, time.perf_counter()

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        b0, s0, own0, t0 = self._start
        b1, s1, own1, t1 = self._read()
        cap = (t1 - t0) * len(self.cpus)
        self.foreign = max(0.0, (b1 - b0) - (own1 - own0)) / cap
        self.steal = (s1 - s0) / cap


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward (projections, MLP, full (unmasked) attention scores, LM head)."""
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_token_layer = d * (h * hd) * 2 + d * (kv * hd) * 2 + 3 * d * i  # q,o ; k,v ; gate,up,down
    attn = 2 * h * seq * hd  # scores + probs @ v, per query token
    per_token = cfg.num_layers * (per_token_layer + attn) + d * cfg.vocab_size
    return 2.0 * per_token * batch * seq


def matmul_gflops(m: int, k: int, n: int, reps: int = 10) -> dict:
    """Reference single-matmul throughput of both libraries on these cores (a roofline for the eye)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
    out = {}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for _ in range(2):
        ta @ tb
    t = time.perf_counter()
    for _ in range(reps):
        ta @ tb
    out["torch"] = 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9
    f = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f(ja, jb).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(ja, jb).block_until_ready()
    out["jax"] = 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9
    return {"shape": [m, k, n], **{f"{key}_gflops": round(v, 1) for key, v in out.items()}}


def bench_forward(gguf: Path, batch: int, seq: int, runs: int, warmup: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    import loopus_jax
    from loopus_jax import api

    torch.set_num_threads(min(len(CPUS), len(os.sched_getaffinity(0))))

    t = time.perf_counter()
    model, _ = loopus_jax.load(gguf)
    ours_load_s = time.perf_counter() - t
    cfg = model.config
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_load_s = time.perf_counter() - t

    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    # Compile explicitly: the jitted function `forward` calls, with the arguments it passes.
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    lowered = api._base_forward.lower(graphdef, state, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), None)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    compile_info = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}

    def ours():
        return loopus_jax.forward(model, ids).logits.block_until_ready()

    def theirs():
        with torch.no_grad():
            return hf(ids_t).logits

    foreign = {"ours": [], "transformers": []}

    def timed(fn, side=None):
        with CpuMeter() as m:
            t = time.perf_counter()
            out = fn()
            dt_s = time.perf_counter() - t
        if side:
            foreign[side].append({"other_processes": round(m.foreign, 4), "steal": round(m.steal, 4)})
        return dt_s, out

    first_call_s, _ = timed(ours)  # reuses the executable compiled above
    warm = {"ours": [first_call_s], "transformers": []}
    for _ in range(max(warmup - 1, 0)):
        warm["ours"].append(timed(ours)[0])
    for _ in range(max(warmup, 1)):
        warm["transformers"].append(timed(theirs)[0])
    times = {"ours": [], "transformers": []}
    for r in range(runs):
        s_ours, out_ours = timed(ours, "ours")
        s_hf, out_hf = timed(theirs, "transformers")
        times["ours"].append(s_ours)
        times["transformers"].append(s_hf)
        busy = max(foreign["ours"][-1]["other_processes"], foreign["transformers"][-1]["other_processes"])
        print(
            f"  run {r + 1}/{runs}: ours {s_ours:.2f} s, transformers {s_hf:.2f} s (other processes {busy:.0%} of our cores)",
            flush=True,
        )

    a, b = np.asarray(out_ours), out_hf.float().numpy()
    ntok = batch * seq
    flops = forward_flops(cfg, batch, seq)
    res = {}
    for side, ts in times.items():
        med = statistics.median(ts)
        res[side] = {
            "times_s": ts,
            "warmup_s": warm[side],
            "median_s": med,
            "min_s": min(ts),
            "tokens_per_s": ntok / med,
            "gflops_per_s": flops / med / 1e9,
            "cpu_taken_by_others": foreign[side],
            "cpu_taken_by_others_median": statistics.median(x["other_processes"] for x in foreign[side]),
        }
    res["ours"]["load_s"], res["transformers"]["load_s"] = ours_load_s, hf_load_s
    res["transformers"]["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    return {
        **res,
        "ratio_ours_over_transformers": res["ours"]["tokens_per_s"] / res["transformers"]["tokens_per_s"],
        "compile": compile_info,
        "first_call_after_compile_s": first_call_s,
        "first_call_minus_median_s": first_call_s - res["ours"]["median_s"],
        "forward_gflop": flops / 1e9,
        "logits": {
            "shape": list(a.shape),
            "max_abs_diff": float(np.max(np.abs(a - b))),
            "max_abs_logit": float(np.max(np.abs(b))),
            "argmax_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        },
        "num_params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "matmul_reference": matmul_gflops(batch * seq, cfg.hidden_size, cfg.intermediate_size),
    }


# --------------------------------------------------------------------------------------------------
# reporting


def print_table(result: dict) -> None:
    m, f = result["machine"], result["forward"]
    cfg = result["config"]
    print()
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, pinned: {m['pinning']}; {m['date']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v))
    print(f"forward: SmolLM2-135M (GGUF, float32), batch {cfg['batch']} x {cfg['seq']}, median of {cfg['runs']} runs")
    rows = [("", "median s", "min s", "tok/s", "GFLOP/s", "CPU taken by others")]
    for side in ("ours", "transformers"):
        s = f[side]
        rows.append(
            (
                side,
                f"{s['median_s']:.3f}",
                f"{s['min_s']:.3f}",
                f"{s['tokens_per_s']:.1f}",
                f"{s['gflops_per_s']:.1f}",
                f"{s['cpu_taken_by_others_median']:.0%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    lg, c, mm = f["logits"], f["compile"], f["matmul_reference"]
    print(f"  ratio ours/transformers: {f['ratio_ours_over_transformers']:.2f}x")
    print(f"  compile: {c['total_s']:.2f} s (trace+lower {c['trace_lower_s']:.2f} s, compile {c['compile_s']:.2f} s)")
    print(
        f"  logits: max abs diff {lg['max_abs_diff']:.3g} (max |logit| {lg['max_abs_logit']:.3g}), "
        f"argmax agreement {lg['argmax_agreement']:.4f}"
    )
    print(f"  matmul reference {mm['shape']}: jax {mm['jax_gflops']} GFLOP/s, torch {mm['torch_gflops']} GFLOP/s")
    rss = result.get("rss")
    if rss:
        model_mib = rss["gguf"]["param_bytes"] / MIB
        print(f"conversion peak RSS (MiB); model parameters {model_mib:.0f} MiB (float32):")
        for key, label in (("gguf", "load GGUF"), ("hf", "load HF dir"), ("gguf_tokenizer_only", "GGUF tokenizer only")):
            r = rss[key]
            d = r["peak_maxrss_mib"] - r["baseline_maxrss_mib"]
            da = r["peak_anon_sampled_mib"] - r["baseline_anon_mib"]
            line = (
                f"  {label:20s} peak {r['peak_maxrss_mib']:5.0f} = baseline {r['baseline_maxrss_mib']:.0f} + {d:4.0f} "
                f"({d / model_mib:.2f}x model); anon +{da:.0f} ({da / model_mib:.2f}x), "
                f"file peak {r['peak_file_sampled_mib']:.0f}"
            )
            if r.get("weights_peak_maxrss_mib") and key != "gguf_tokenizer_only":
                dw = r["weights_peak_maxrss_mib"] - r["baseline_maxrss_mib"]
                line += f"; weights phase +{dw:.0f} ({dw / model_mib:.2f}x) in {r['weights_seconds']:.1f} s"
            print(line + f"; {r['seconds']:.1f} s total")
    busy = max(f[side]["cpu_taken_by_others_median"] for side in ("ours", "transformers"))
    if busy > 0.05:
        print(f"WARNING: other processes took {busy:.0%} of the benchmark cores while timing; the numbers are not clean.")


def md_row(result: dict) -> list[str]:
    m, f, cfg = result["machine"], result["forward"], result["config"]
    rss = result.get("rss")

    def rss_cell(key: str) -> str:
        if not rss:
            return "-"
        r = rss[key]
        d = r["peak_maxrss_mib"] - r["baseline_maxrss_mib"]
        da = r["peak_anon_sampled_mib"] - r["baseline_anon_mib"]
        cell = f"{r['peak_maxrss_mib']:.0f} (+{d:.0f}; anon +{da:.0f}"
        if key == "gguf" and r.get("weights_peak_maxrss_mib"):
            cell += f"; +{r['weights_peak_maxrss_mib'] - r['baseline_maxrss_mib']:.0f} before tokenizer"
        return cell + ")"

    return [
        m["date"][:10],
        f"{m['cpu_model']}, {m['cpu_count']} cores",
        str(len(m["affinity"])),
        str(cfg["runs"]),
        f"{f['ours']['tokens_per_s']:.0f}",
        f"{f['transformers']['tokens_per_s']:.0f}",
        f"{f['ratio_ours_over_transformers']:.2f}x",
        f"{max(f[k]['cpu_taken_by_others_median'] for k in ('ours', 'transformers')):.0%}",
        f"{f['compile']['total_s']:.1f}",
        f"{f['logits']['max_abs_diff']:.1e}",
        rss_cell("gguf"),
        rss_cell("hf"),
        f"{rss['gguf']['baseline_maxrss_mib']:.0f}" if rss else "-",
        f"{rss['gguf']['param_bytes'] / MIB:.0f}" if rss else f"{f['num_params'] * 4 / MIB:.0f}",
    ]


def section_title(batch: int, seq: int) -> str:
    return f"## forward (SmolLM2-135M, batch {batch} x {seq}, float32, CPU)"


def update_benchmarks_md(result: dict) -> None:
    """Rewrite this benchmark's section of BENCHMARKS.md (a row of the same date and machine replaced)."""
    cfg = result["config"]
    description = (
        f"`python benchmarks/forward.py` (latest row: batch {cfg['batch']} x {cfg['seq']}, median of {cfg['runs']} timed runs "
        f"after {cfg['warmup']} warm-up). Ours: jitted `loopus_jax.forward`; transformers: PyTorch `model(ids).logits` under "
        "`torch.no_grad()`, same GGUF weights dequantized to float32, same process, both pinned to the same 2 cores "
        "(`taskset -c 0,1`, `torch.set_num_threads(2)`). Ratio = ours / transformers tokens/s. Compile = trace + lower + XLA "
        "compile. CPU taken by others = share of the 2 cores used by other processes while timing (median over runs; "
        "anything above a few % means a busy machine and unclean numbers). Peak RSS = `ru_maxrss` of a fresh process that "
        "only imports jax + loopus_jax and calls `loopus_jax.load`; (+N) = minus the baseline RSS after those imports; "
        "anon +N = sampled peak of anonymous RSS minus its baseline (file-backed pages of the memory-mapped checkpoint "
        "are page cache, not a private copy); 'before tokenizer' = peak when the weights are on device, before `load` "
        "builds the GGUF's tokenizer with transformers. The HF directory is exported from the GGUF by `loopus_jax.save`. "
        "Details: `benchmarks/results/forward.json`."
    )
    write_section(section_title(cfg["batch"], cfg["seq"]), description, MD_COLUMNS, [md_row(result)])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = forward_parser(__doc__, "timed runs per side (median reported)", DEFAULT_OUT)
    ap.add_argument("--no-rss", action="store_true", help="skip the conversion peak-RSS subprocesses")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    hf_offline()
    if args.child:
        print(json.dumps(child(args.child, args.child_path)))
        return

    pinning = pin_to_cpus()
    import loopus_jax

    gguf = loopus_jax.default_model_path()
    result = {
        "benchmark": "forward",
        "machine": machine_info(pinning),
        "config": {
            "model": gguf.name,
            "dtype": "float32",
            "batch": args.batch,
            "seq": args.seq,
            "runs": args.runs,
            "warmup": args.warmup,
            "seed": args.seed,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
    }
    print(f"{result['machine']['cpu_model']}, affinity {result['machine']['affinity']} ({pinning})", flush=True)
    if not args.no_rss:
        print("conversion peak RSS (fresh subprocesses) ...", flush=True)
        result["rss"] = measure_rss(gguf)
    print(f"forward batch {args.batch} x {args.seq}: {args.warmup} warm-up + {args.runs} timed runs per side ...", flush=True)
    result["forward"] = bench_forward(gguf, args.batch, args.seq, args.runs, args.warmup, args.seed)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not args.no_md:
        update_benchmarks_md(result)
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
