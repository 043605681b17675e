"""Training driver: what `loopus train` adds around the jitted train step, and whether the data keeps up.

1. Data: rows/s of the grain pipeline (SmolLM2's tokenizer, CPython's doc topics, max_length 512) in
   `pad` and `pack` modes, against the rows/s the step consumes.
2. Driver overhead: a random looped Llama (hidden 64, 4 layers: encoder 0, decoder 3; SmolLM2's
   49k vocabulary; N=3, S=2; batch 4 x 64, float32) trained by `loopus_jax.train.run` (per-step wall
   time from its JSONL, metrics fetched every step) against a bare loop of `train_step` on the same
   batches placed on the same mesh, in this process, alternating (driver with update norm, bare,
   driver without) twice. Ratio = driver / bare step time.
3. Checkpoint: seconds `save` blocks the loop (asynchronous orbax save vs synchronous), same state.

    python benchmarks/train_driver.py [--steps 12] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine_info, machine_label, median_time, pin_to_cpus, write_section
from forward import CpuMeter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "train_driver.json"))
    a = ap.parse_args()
    pinning = pin_to_cpus()

    import jax
    import numpy as np
    from flax import nnx

    import loopus_jax as lj
    from loopus_jax.config import ModelConfig
    from loopus_jax.loop import loop_model
    from loopus_jax.models.transformer import Transformer
    from loopus_jax.sharding import make_mesh, shard_model
    from loopus_jax.tokenizer import load_tokenizer
    from loopus_jax.train import data as D
    from loopus_jax.train import run
    from loopus_jax.train.checkpoint import Checkpointer
    from loopus_jax.train.config import load_config
    from loopus_jax.train.metrics import read_jsonl
    from loopus_jax.train.step import init_state, shard_global_batch, train_step
    from loopus_jax.train.trainer import make_optimizer, step_config

    gguf = lj.default_model_path()
    tok = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    results: dict = {"machine": machine_info(pinning), "steps": a.steps, "runs": a.runs}

    # 1. Data pipeline throughput.
    data_rows = []
    for mode in ("pad", "pack"):
        cfg = load_config(data={"data": {"source": "pydoc_topics", "mode": mode, "max_length": 512}, "train": {"batch_size": 8}})
        it = iter(D.train_dataset(cfg, tok))
        next(it)
        med, _ = median_time(lambda it=it: [next(it) for _ in range(4)], a.runs, 1)
        data_rows.append((mode, 32 / med))
    results["data_rows_per_s"] = dict(data_rows)

    # 2. Driver overhead. A random looped model saved as a loopus checkpoint with SmolLM2's tokenizer;
    # driver runs (update norm on / off) and bare loops alternate, twice, under one CPU meter.
    cfg_m = ModelConfig("llama", len(tok), 64, 128, 4, 4, 2, 16, rms_norm_eps=1e-5)
    model = loop_model(Transformer(cfg_m, rngs=nnx.Rngs(0)), "0", "3-", n_recursion=3)
    lj.save(model, work / "model", tokenizer=tok)
    base = {
        "model": {"path": str(work / "model")},
        "loop": {"n_recursion": 3, "n_supervision": 2},
        "optim": {"lr": 1e-4, "warmup": 2},
        "train": {"steps": a.steps, "batch_size": 4},
        "data": {"source": "pydoc_topics", "mode": "pack", "max_length": 64},
        "eval": {"docs": 0},
        "checkpoint": {"every": 10**6, "keep": 1},
        "output": {"export": [], "plot": False},
        "compile_cache": str(work / "jax_cache"),
    }
    cfg = load_config(data={**base, "checkpoint": {"dir": str(work / "x")}})
    mesh = make_mesh(cfg.mesh)
    looped, _ = lj.load(work / "model", mesh=mesh)
    shard_model(looped, mesh)
    opt, scfg = make_optimizer(cfg), step_config(cfg)
    graphdef, frozen, state = init_state(looped, opt, cfg.seed)
    it = iter(D.train_dataset(cfg, tok))
    batches = [next(it) for _ in range(a.steps)]
    holder = {"state": state, "i": 0}

    def bare_step() -> None:
        b = batches[holder["i"] % len(batches)]
        holder["i"] += 1
        placed = shard_global_batch(b, mesh)
        holder["state"], losses, _, _ = train_step(graphdef, frozen, holder["state"], placed, opt, scfg, True)
        jax.device_get(losses.total)  # the driver fetches every step's losses too

    def driver(update_norm: bool, rep: int) -> float:
        tree = json.loads(json.dumps(base))
        tree["checkpoint"]["dir"] = str(work / f"run{rep}_{int(update_norm)}" / "ckpt")
        tree["output"]["dir"] = str(work / f"run{rep}_{int(update_norm)}")
        tree["log"] = {"update_norm": update_norm}
        res = run(tree)
        return statistics.median([r["seconds"] for r in read_jsonl(res.metrics_path) if r["kind"] == "train"][3:])

    times: dict[str, list[float]] = {"bare": [], "on": [], "off": []}
    with CpuMeter() as meter:
        for rep in range(2):
            times["on"].append(driver(True, rep))
            times["bare"].append(median_time(bare_step, a.steps - 3, 3)[0])
            times["off"].append(driver(False, rep))
    bare = statistics.median(times["bare"])
    driver_s = {True: statistics.median(times["on"]), False: statistics.median(times["off"])}
    results["step_s"] = {"bare": times["bare"], "driver_update_norm": times["on"], "driver_no_update_norm": times["off"]}
    results["cpu_taken_by_others"] = meter.foreign

    # 3. Checkpoint blocking time.
    ck = {}
    for async_save in (True, False):
        c = Checkpointer(work / f"ck{int(async_save)}", every=1, keep=1, async_save=async_save)
        times = []
        for s in range(1, a.runs + 1):
            t = time.perf_counter()
            c.save(s, holder["state"], {"next_index": s}, {"step": s})
            times.append(time.perf_counter() - t)
            c.wait()
        c.close()
        ck[async_save] = statistics.median(times)
    results["checkpoint_blocking_s"] = {"async": ck[True], "sync": ck[False]}
    n_params = sum(np.size(x) for x in jax.tree.leaves(state.params))
    results["trained_params"] = int(n_params)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{'measure':<44} {'value':>12}")
    for mode, r in data_rows:
        print(f"{'data rows/s, ' + mode + ' (512 tokens)':<44} {r:>12.0f}")
    print(f"{'rows/s the step consumes (batch 4 / bare s)':<44} {4 / bare:>12.1f}")
    print(f"{'bare train_step s':<44} {bare:>12.4f}")
    print(f"{'driver s (update_norm on)':<44} {driver_s[True]:>12.4f}  ({driver_s[True] / bare:.2f}x)")
    print(f"{'driver s (update_norm off)':<44} {driver_s[False]:>12.4f}  ({driver_s[False] / bare:.2f}x)")
    print(f"{'checkpoint save blocks, async / sync s':<44} {ck[True]:>6.3f} / {ck[False]:.3f}")

    date = results["machine"]["date"][:10]
    label = machine_label(results["machine"])
    write_section(
        "## training driver (random looped Llama, hidden 64, 4 layers, 49k vocab, N=3, S=2, batch 4 x 64, float32, CPU)",
        f"`python benchmarks/train_driver.py`: {n_params:,} trained parameters. Step s = median wall time per batch "
        f"after the compiles ({a.steps - 3} steps), median of 2 alternating rounds; bare = `train_step` + fetching "
        "its losses in a loop; driver = "
        "`loopus_jax.train.run` (data pipeline, metrics every step, progress bar), its JSONL `seconds`; ratio = driver / "
        "bare. Data rows/s: the grain pipeline alone with SmolLM2's tokenizer on CPython's doc topics (rows of 512 tokens). "
        f"Checkpoint = seconds `save` blocks the loop, median of {a.runs}. CPU taken by others while timing the "
        f"driver: {meter.foreign:.0%} (a busy machine makes these numbers noisy). "
        "Details: `benchmarks/results/train_driver.json`.",
        [
            "date",
            "machine",
            "bare step s",
            "driver s (update norm on / off)",
            "ratio on / off",
            "data rows/s pad / pack",
            "ckpt blocks async / sync s",
        ],
        [
            [
                date,
                label,
                f"{bare:.4f}",
                f"{driver_s[True]:.4f} / {driver_s[False]:.4f}",
                f"{driver_s[True] / bare:.2f}x / {driver_s[False] / bare:.2f}x",
                f"{data_rows[0][1]:.0f} / {data_rows[1][1]:.0f}",
                f"{ck[True]:.3f} / {ck[False]:.3f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
