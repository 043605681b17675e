"""Shared pieces of the benchmark scripts: core pinning, machine facts, timing, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
CPUS = (0, 1)
PIN_GUARD = "LOOPUS_BENCH_PINNED"
MD_HEADER = """# Benchmarks

Each section is one benchmark script under `benchmarks/`; each row is one run of it, naming the machine
it ran on. Times are medians of N timed runs after warm-up (N is given per section). Raw numbers, with
machine details and library versions, are in `benchmarks/results/*.json`.
"""


def hf_offline() -> None:
    """Keep transformers off the network and quiet (every weight here is local)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def forward_parser(doc: str, runs_help: str, out: Path):
    """The options of the whole-forward benchmarks (forward.py, gemm_ceiling.py): shape, runs, seed, outputs."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help=runs_help)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ap.add_argument("--out", type=Path, default=out, help="JSON results path")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    return ap


def smollm2_config():
    """SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 kv heads, vocab 49152), for random-weight runs."""
    from loopus_jax.config import ModelConfig

    return ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def qwen3_1_7b_config():
    """Qwen3-1.7B's shape (28 layers, hidden 2048, 16 heads / 8 kv heads, head_dim 128, qk-norm, vocab 151936)."""
    from loopus_jax.config import ModelConfig

    return ModelConfig(
        "qwen3", 151936, 2048, 6144, 28, 16, 8, 128, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        tie_word_embeddings=True,
    )


def pin_to_cpus() -> str:
    """Re-exec under `taskset -c 0,1` unless already pinned to exactly those cores; returns how."""
    want = set(CPUS)
    have = set(os.sched_getaffinity(0))
    cpus = ",".join(map(str, CPUS))
    if have == want:
        return f"re-executed under taskset -c {cpus}" if os.environ.get(PIN_GUARD) else f"affinity already {{{cpus}}}"
    if os.environ.get(PIN_GUARD):
        return f"taskset re-exec did not pin to {sorted(want)} (affinity {sorted(have)}); continuing unpinned"
    taskset = shutil.which("taskset")
    if taskset is None or not want <= set(range(os.cpu_count() or 1)):
        return f"taskset unavailable or too few cores; running with affinity {sorted(have)}"
    env = dict(os.environ, **{PIN_GUARD: "1"})
    os.execve(taskset, [taskset, "-c", cpus, sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


def _cpuinfo(key: str) -> str | None:
    """The first `key` line of /proc/cpuinfo, after its colon (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_simd() -> str | None:
    """The widest x86 vector extension the CPU has: the same model name can hide AVX2-only and AVX-512
    hosts, whose XLA:CPU code (and so timings and float rounding) differ."""
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    flags = set(flags.split())
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info(pinning: str) -> dict:
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "pinning": pinning,
        "mem_total_gib": mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("jax", "jaxlib", "flax", "transformers", "torch", "numpy", "gguf", "loopus-jax")},
    }


def machine_label(info: dict) -> str:
    simd = f" ({info['cpu_simd']})" if info.get("cpu_simd") else ""
    return f"{info['cpu_model']}{simd}, {len(info['affinity'])} cores"


def median_time(fn: Callable[[], object], runs: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `runs` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def write_section(
    title: str, description: str, columns: list[str], new_rows: list[list[str]], key_columns: int = 2, path: Path = BENCHMARKS_MD
) -> None:
    """Rewrite one `## title` section of BENCHMARKS.md: earlier rows are kept, except those whose first
    `key_columns` cells (date, machine, ...) equal a new row's, which the new row replaces."""
    text = path.read_text() if path.exists() else MD_HEADER
    lines = text.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    old_rows: list[str] = []
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [line for line in lines[start + 1 : end] if line.startswith("|")]
        old_rows = table[2:] if table and table[0] == "| " + " | ".join(columns) + " |" else []
        before, after = lines[:start], lines[end:]
    else:
        before, after = lines, []
    keys = {tuple(r[:key_columns]) for r in new_rows}
    rows = [r for r in old_rows if tuple(c.strip() for c in r.strip("|").split("|")[:key_columns]) not in keys]
    rows += ["| " + " | ".join(r) + " |" for r in new_rows]
    section = [title, "", description, "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|", *rows]
    while before and not before[-1].strip():
        before.pop()
    out = before + ["", *section] + (["", *after] if after else [])
    path.write_text("\n".join(out) + "\n")
