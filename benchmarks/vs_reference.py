"""Side by side with the authors' PyTorch implementation (github.com/Thrillcrazyer/LoopUS), same weights, one run.

    python benchmarks/vs_reference.py --reference-repo path/to/LoopUS [--reference-python path/to/venv/bin/python]

Their code is imported from the checkout you give (never vendored): `--reference-python` (default: the
`python` on PATH) must have torch and transformers, and for the train step their training dependencies
(`pip install wandb python-dotenv lm-eval datasets`). Without `--reference-repo` the script skips.

What runs: one SmolLM2-135M-shaped looped model with random weights (encoder 0..1, reasoning 2..28,
decoder 29) is built here and exported with our `lds` writer; their `LDSForCausalLM.from_pretrained`
loads the same files in a subprocess (benchmarks/_reference_side.py) run by the reference python.
Their logits must match ours before anything is timed. Both sides run float32 on the same 2 pinned
cores (`taskset -c 0,1`; torch 2 threads), on the same token ids, and alternate run by run (ours,
theirs, ours, ...) so that load from other processes hits both alike; medians of --runs after
--warmup untimed runs (compile excluded on our side):
- looped forward at N = 1, 4, 8 (batch 4 x 256, fixed depth): `loopus_jax.forward` vs their `forward`
  under `inference_mode` (q threshold 2.0: their loop never halts);
- one random-deep-supervision train step (N = 4, S = 2, batch 2 x 256, backward and an AdamW update per
  supervised step): our jitted `train_step` vs their training loop itself,
  `training_runtime.train_with_deep_supervision`, fed one batch at a time (see _reference_side.py);
- cached greedy decoding of 64 new tokens at N = 4 from a 64-token prompt (batch 1), without and with
  early exit: `loopus_jax.generate` vs their `LDSForCausalLM.generate`. Early exit uses the `cdf` rule with
  their q definition on both sides (`q_source="post_gate_last"`) at a threshold between the prompt's
  survival-CDF after one and after two steps (mean exit depths reported per side; after an exit their
  cache drops the deeper depths and ours fills them, so exit depths can drift apart).
Targets (ours / theirs speed): forward >= 2x, train step >= 1.5x, decode >= 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine_info, machine_label, pin_to_cpus, smollm2_config, write_section

from loopus_jax.errors import LoopusError

HERE = Path(__file__).resolve().parent
SKIP = (
    "vs_reference: skipped: --reference-repo not given. Pass a local checkout of github.com/Thrillcrazyer/LoopUS "
    "(and --reference-python, a python with torch + transformers), e.g. make bench REFERENCE_REPO=path/to/LoopUS "
    "REFERENCE_PYTHON=path/to/venv/bin/python"
)
TARGETS = {"forward": 2.0, "train step": 1.5, "decode": 3.0}
# Logits of the two codes must agree to this fraction of the largest |logit|: float32 on both sides, but
# XLA and oneDNN sum the 576/1536-long dot products in different orders and the ~220 layer applications
# at N = 8 compound those rounding differences (each ~1e-7 relative); a wrong weight, norm, gate or
# q rule gives differences of the order of the logits themselves.
LOGIT_RTOL = 1e-4
SPLIT = ("1", "29-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-repo", help="local checkout of github.com/Thrillcrazyer/LoopUS (skips when absent)")
    ap.add_argument("--reference-python", default=None, help="python with torch + transformers (default: `python` on PATH)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--depths", default="1,4,8", help="forward depths N")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--train-n", type=int, default=4)
    ap.add_argument("--supervision", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--decode-n", type=int, default=4)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--exit-threshold", type=float, default=None, help="cdf threshold for early exit (default: auto)")
    ap.add_argument("--phases", default="forward,train,decode", help="subset of forward,train,decode, run in this order")
    ap.add_argument("--out", default=str(RESULTS / "vs_reference.json"))
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args(argv)
    bad = sorted(set(a.phases.split(",")) - {"forward", "train", "decode"})
    if bad:
        raise LoopusError(f"--phases: unknown phase(s) {bad}; choose from forward,train,decode")
    if a.runs < 1 or a.warmup < 0:
        raise LoopusError(f"--runs must be >= 1 and --warmup >= 0, got {a.runs} and {a.warmup}")
    return a


def check_repo(repo_arg: str) -> Path:
    """The root of a checkout of the authors' code (their `models/` package inside)."""
    repo = Path(repo_arg).expanduser().resolve()
    if not repo.is_dir():
        raise LoopusError(
            f"--reference-repo {repo_arg}: no such directory; clone the authors' code first "
            "(git clone https://github.com/Thrillcrazyer/LoopUS) and pass its path"
        )
    if not (repo / "models" / "modeling_lds.py").is_file():
        raise LoopusError(
            f"--reference-repo {repo_arg}: models/modeling_lds.py not found there; pass the root of a "
            "Thrillcrazyer/LoopUS checkout"
        )
    return repo


def check_python(python_arg: str | None) -> str:
    """A python that can import torch and transformers (the reference venv's)."""
    python = python_arg or shutil.which("python") or shutil.which("python3")
    if python is None or shutil.which(python) is None:
        raise LoopusError(f"--reference-python {python_arg or 'python'}: not an executable; pass the reference venv's bin/python")
    probe = subprocess.run([python, "-c", "import torch, transformers, safetensors, numpy"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise LoopusError(
            f"--reference-python {python}: cannot import torch/transformers/safetensors/numpy ({last}); pass a python "
            "whose env has them (e.g. python3 -m venv refvenv && refvenv/bin/pip install torch transformers accelerate)"
        )
    return python


class CpuShare:
    """CPU time of processes other than ours and the reference's on our cores, as a share of the wall time x cores."""

    def __init__(self, child_pid: int):
        self.cpus = sorted(os.sched_getaffinity(0))
        self.hz = os.sysconf("SC_CLK_TCK")
        self.child = child_pid

    def _proc(self, pid: str) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.hz  # utime + stime of every thread

    def read(self) -> tuple[float, float, float]:
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in self.cpus:
                v = [int(x) for x in vals]
                busy += sum(v[:8]) - v[3] - v[4]  # everything but idle and iowait (steal counts as taken)
        try:
            child = self._proc(str(self.child))
        except OSError:
            child = 0.0
        return busy / self.hz, self._proc("self") + child, time.perf_counter()

    def share(self, start: tuple[float, float, float]) -> float:
        b0, o0, t0 = start
        b1, o1, t1 = self.read()
        return max(0.0, (b1 - b0) - (o1 - o0)) / max((t1 - t0) * len(self.cpus), 1e-9)


class Reference:
    """The reference subprocess: one JSON request, one JSON reply."""

    def __init__(self, python: str, repo: Path, model_dir: Path, inputs: Path, workdir: Path, threads: int = 2):
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            WANDB_MODE="disabled",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
        )
        env.pop("PYTHONPATH", None)
        self.log = workdir / "reference_stderr.log"
        cmd = [
            python,
            str(HERE / "_reference_side.py"),
            "--reference-repo",
            str(repo),
            "--model-dir",
            str(model_dir),
            "--inputs",
            str(inputs),
            "--threads",
            str(threads),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, cwd=workdir, env=env
        )
        self.hello = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text().strip().splitlines()[-15:]
            raise LoopusError("the reference process exited early; its last stderr lines:\n  " + "\n  ".join(tail))
        msg = json.loads(line)
        if "error" in msg:
            raise LoopusError(f"reference side: {msg['error']} (full log: {self.log})")
        return msg

    def send(self, **req) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def ask(self, **req) -> dict:
        self.send(**req)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def summarize(name: str, ours: list[float], theirs: list[float], foreign: list[float], **extra) -> dict:
    o, t = statistics.median(ours), statistics.median(theirs)
    base = name.split(" ")[0] if not name.startswith("train") else "train step"
    target = TARGETS[base]
    row = {
        "benchmark": name,
        "ours_s": o,
        "theirs_s": t,
        "ratio": t / o,
        "target": target,
        "met": t / o >= target,
        "ours_times": ours,
        "theirs_times": theirs,
        "cpu_taken_by_others": statistics.median(foreign),
        **extra,
    }
    print(
        f"{name:<34} ours {o:8.3f} s  theirs {t:8.3f} s  {t / o:5.2f}x (target {target}x)  "
        f"others {row['cpu_taken_by_others']:.0%}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        if a.reference_repo is None:
            print(SKIP)
            return 0
        repo = check_repo(a.reference_repo)
        pinning = pin_to_cpus()  # re-executes this script under taskset: keep the checks before it cheap
        python = check_python(a.reference_python)
        return run(a, repo, python, pinning)
    except LoopusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, repo: Path, python: str, pinning: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import loopus_jax as lj
    from loopus_jax.loop.model import loop_model
    from loopus_jax.models.transformer import Transformer
    from loopus_jax.progress import progress
    from loopus_jax.train.step import StepConfig, adamw, init_state, train_step

    phases = a.phases.split(",")
    depths = [int(x) for x in a.depths.split(",")]
    cfg = smollm2_config()
    rng = np.random.RandomState(0)
    inputs = {
        "forward": rng.randint(0, cfg.vocab_size, (a.batch, a.seq)),
        "train": rng.randint(0, cfg.vocab_size, (a.train_batch, a.train_seq)),
        "prompt": rng.randint(0, cfg.vocab_size, (a.decode_batch, a.prompt_len)),
    }
    work = Path(tempfile.mkdtemp(prefix="loopus_vs_ref_"))
    try:
        print(f"building the random SmolLM2-shaped looped model and exporting it (lds) to {work}", flush=True)
        model = loop_model(Transformer(cfg, rngs=nnx.Rngs(0)), *SPLIT, n_recursion=max(depths + [a.train_n, a.decode_n]))
        lj.save(model, work / "lds", format="lds")
        for k, v in inputs.items():
            np.save(work / f"{k}.npy", v.astype(np.int64))
        ref = Reference(python, repo, work / "lds", work, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"reference side ready: {ref.hello}", flush=True)
    meter = CpuShare(ref.proc.pid)
    result = {
        "benchmark": "vs_reference",
        "reference": {**ref.hello, "repo": str(repo), "python": python},
        "config": vars(a),
        "checks": {},
        "rows": [],
        "loadavg": {"start": os.getloadavg()},
    }
    rows, checks, load = result["rows"], result["checks"], result["loadavg"]
    ids = inputs["forward"].astype(np.int32)
    mask = np.ones_like(ids)

    def add_row(row: dict) -> None:  # written at once, so a run cut short keeps what it measured
        rows.append(row)
        save(a, pinning, result)

    def timed_ours(fn) -> tuple[float, float]:
        start = meter.read()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, meter.share(start)

    def timed_theirs(**req) -> tuple[dict, float]:
        start = meter.read()
        reply = ref.ask(**req)
        return reply, meter.share(start)

    def side_by_side(name: str, ours_fn, req: dict, warmup: int, **extra) -> tuple[dict, list[dict]]:
        for _ in range(warmup):
            ours_fn()
            ref.ask(**req)
        ours, theirs, foreign, replies = [], [], [], []
        for _ in progress(range(a.runs), desc=name, unit="run"):
            s, f1 = timed_ours(ours_fn)
            r, f2 = timed_theirs(**req)
            ours.append(s)
            theirs.append(r["secs"])
            replies.append(r)
            foreign += [f1, f2]
        return summarize(name, ours, theirs, foreign, **extra), replies

    def forward_phase() -> None:
        # Same logits first: their forward on the files we exported, against ours. This first call of
        # each side at each N also serves as one warm-up run (our compile, their first call).
        checks["logits"] = []
        for n in depths:
            ours = np.asarray(lj.forward(model, ids, mask, n_recursion=n).logits)
            ref.ask(op="logits", n=n, out=str(work / "theirs.npy"))
            theirs = np.load(work / "theirs.npy")
            diff = float(np.abs(ours - theirs).max())
            scale = float(np.abs(theirs).max())
            agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
            ok = diff <= LOGIT_RTOL * scale
            checks["logits"].append({"n": n, "max_abs_diff": diff, "max_abs_logit": scale, "argmax_agree": agree, "ok": ok})
            print(
                f"logits N={n}: max |ours - theirs| = {diff:.2e} (max |logit| {scale:.2f}, tolerance "
                f"{LOGIT_RTOL * scale:.2e}); argmax agree {agree:.2%}",
                flush=True,
            )
            if not ok:
                raise LoopusError(
                    f"logits differ at N={n} (max abs diff {diff:.3g} > {LOGIT_RTOL} x {scale:.3g}); timings "
                    "would compare different computations, so nothing is timed"
                )
        (work / "theirs.npy").unlink(missing_ok=True)
        for n in depths:

            def ours_fwd(n=n):
                return jax.block_until_ready(lj.forward(model, ids, mask, n_recursion=n).logits)

            req = {"op": "forward", "n": n}
            row, _ = side_by_side(f"forward N={n}", ours_fwd, req, max(a.warmup - 1, 0), n=n, tokens=ids.size)
            add_row(row)

    def decode_phase() -> None:
        prompt = inputs["prompt"].astype(np.int32)
        n = a.decode_n
        thr = a.exit_threshold
        if thr is None:  # between the survival CDF after one and after two steps, judged on the prompt
            q = np.asarray(lj.forward(model, prompt, n_recursion=n, q_source="post_gate_last").q)
            cdf = 1 - np.cumprod(1 - q, axis=1)
            thr = float((cdf[:, 0].mean() + cdf[:, 1].mean()) / 2)
        modes = {
            "decode": ({"halting": "none"}, {"halting": "threshold", "q_threshold": 2.0}),
            "decode + early exit": (
                {"halting": "cdf", "q_threshold": thr, "q_source": "post_gate_last"},
                {"halting": "cdf", "q_threshold": thr},
            ),
        }
        for name, (ours_kw, their_kw) in modes.items():
            box = {}

            def ours_gen(kw=ours_kw):
                box["out"] = lj.generate(model, prompt, max_new_tokens=a.new, n_recursion=n, stop_tokens=[], **kw)

            row, replies = side_by_side(
                f"{name} N={n}",
                ours_gen,
                {"op": "generate", "n": n, "new": a.new, **their_kw},
                a.warmup,
                n=n,
                batch=a.decode_batch,
                prompt_len=a.prompt_len,
                new_tokens=a.new,
                q_threshold=their_kw.get("q_threshold") if ours_kw["halting"] != "none" else None,
            )
            out = box["out"]
            same = out.tokens == np.asarray(replies[-1]["tokens"])
            row["first_token_mismatch"] = [int(np.argmax(np.r_[~r, True])) for r in same]  # = new_tokens: all equal
            row["ours_mean_exit_depth"] = out.mean_exit_depth
            row["theirs_mean_exit_depth"] = replies[-1]["mean_exit_depth"]
            row["tokens_per_s_ours"] = a.decode_batch * a.new / row["ours_s"]
            row["tokens_per_s_theirs"] = a.decode_batch * a.new / row["theirs_s"]
            print(
                f"  greedy tokens equal up to {row['first_token_mismatch']} of {a.new}; mean exit depth ours "
                f"{row['ours_mean_exit_depth']:.2f}, theirs {row['theirs_mean_exit_depth']:.2f}",
                flush=True,
            )
            add_row(row)

    def train_phase() -> None:
        n, s = a.train_n, a.supervision
        tids = inputs["train"].astype(np.int32)
        batch = {
            "input_ids": jnp.asarray(tids),
            "attention_mask": jnp.ones_like(jnp.asarray(tids)),
            "labels": jnp.asarray(tids),
        }
        # A copy of the weights read back from the export: the train step donates the parameters it holds.
        trained, _ = lj.load(work / "lds")
        graphdef, frozen, state = init_state(trained, adamw(5e-5, 0, 1000))
        del trained
        exe = train_step.lower(graphdef, frozen, state, batch, adamw(5e-5, 0, 1000), StepConfig(n, s).check()).compile()
        box = [state]

        def ours_step():
            out = exe(frozen, box[0], batch)  # (new state, losses, ...)
            box[0] = out[0]
            jax.block_until_ready(out[1])

        ours, theirs, foreign = [], [], []
        steps = a.warmup + a.runs
        for k in progress(range(steps), desc=f"train step N={n} S={s}", unit="step"):
            sec, f1 = timed_ours(ours_step)
            req = {"op": "train", "n": n, "s": s, "steps": steps, "lr": 5e-5} if k == 0 else {"op": "next"}
            r, f2 = timed_theirs(**req)
            if k >= a.warmup:
                ours.append(sec)
                theirs.append(r["secs"])
                foreign += [f1, f2]
        their_code = "training_runtime.train_with_deep_supervision"
        add_row(
            summarize(f"train step N={n} S={s}", ours, theirs, foreign, n=n, s=s, tokens=int(tids.size), their_code=their_code)
        )

    run_phase = {"forward": forward_phase, "decode": decode_phase, "train": train_phase}
    try:
        for p in phases:  # in the order given
            load[p] = os.getloadavg()
            run_phase[p]()
    finally:
        ref.close()
        shutil.rmtree(work, ignore_errors=True)
    load["end"] = os.getloadavg()
    save(a, pinning, result)
    return 0


def save(a: argparse.Namespace, pinning: str, result: dict) -> None:
    info = result["machine"] = machine_info(pinning)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}", flush=True)
    if not a.no_md and result["rows"]:
        write_md(a, info, result)
        print("updated BENCHMARKS.md", flush=True)


def write_md(a: argparse.Namespace, info: dict, result: dict) -> None:
    date, label = info["date"][:10], machine_label(info)
    checks = result["checks"].get("logits", [])
    logits = (
        "; ".join(f"N={c['n']}: {c['max_abs_diff']:.1e} of max {c['max_abs_logit']:.1f}" for c in checks) or "no forward phase"
    )
    v, rv = info["versions"], result["reference"]["versions"]
    load = ", ".join(f"{k} {x[0]:.2f}" for k, x in result["loadavg"].items())
    busy = max((r["cpu_taken_by_others"] for r in result["rows"]), default=0.0)
    contended = (
        f"This run was contended (other processes took up to {busy:.0%} of the cores while timing): absolute times are "
        "inflated, and PyTorch's 2-thread parallel regions may suffer more from preemption than XLA's, so the ratios are "
        "not those of a quiet machine. "
        if busy > 0.1
        else ""
    )
    write_section(
        "## vs the authors' implementation (SmolLM2-shaped looped model, random weights, float32, CPU)",
        f"`python benchmarks/vs_reference.py --reference-repo LoopUS`: the same weights (our `lds` export, loaded by "
        f"their `LDSForCausalLM`) and token ids on both sides; theirs runs in a subprocess with the reference venv "
        f"(torch {rv['torch']}, transformers {rv['transformers']}; ours jax {v['jax']}, flax {v['flax']}), both on the same "
        f"2 pinned cores, runs alternating ours/theirs, median of `runs` after {a.warmup} warm-up (our compile excluded). "
        f"Forward: batch {a.batch} x {a.seq}, fixed depth. Train step: N = {a.train_n}, S = {a.supervision}, batch "
        f"{a.train_batch} x {a.train_seq}, AdamW update per supervised loss; theirs is their training loop "
        f"(`train_with_deep_supervision`) timed between batches. Decode: greedy, {a.new} new tokens from a {a.prompt_len}-"
        f"token prompt, batch {a.decode_batch}, cached; early exit = `cdf` rule with their q definition. Ratio = their time "
        f"/ ours. Logits agree before timing (max abs diff {logits}; tolerance {LOGIT_RTOL} x max |logit|); the forward's "
        f"warm-up at each N is that check. CPU taken by others = share of the 2 cores used by other processes while "
        f"timing (load average {load}). {contended}{result.get('note', '')}Details: `benchmarks/results/vs_reference.json`.",
        [
            "date",
            "machine",
            "benchmark",
            "ours s",
            "theirs s",
            "ratio",
            "runs",
            "target",
            "met",
            "mean exit depth (ours / theirs)",
            "CPU taken by others",
        ],
        [
            [
                date,
                label,
                r["benchmark"],
                f"{r['ours_s']:.3f}",
                f"{r['theirs_s']:.3f}",
                f"{r['ratio']:.2f}x",
                str(len(r["ours_times"])),
                f">= {r['target']}x",
                "yes" if r["met"] else "no",
                f"{r['ours_mean_exit_depth']:.2f} / {r['theirs_mean_exit_depth']:.2f}" if "ours_mean_exit_depth" in r else "-",
                f"{r['cpu_taken_by_others']:.0%}",
            ]
            for r in result["rows"]
        ],
        key_columns=3,
    )


if __name__ == "__main__":
    sys.exit(main())
