"""`loopus train --config FILE.yaml [key=value ...]`: the CLI face of `loopus_jax.train.run`."""

from __future__ import annotations

import argparse

TRAIN_HELP = """Post-train a looped model with random deep supervision.

The YAML config names the base model (any checkpoint `loopus_jax.load` reads, 'default' for the
embedded SmolLM2, or an already-looped checkpoint), the split, N, S, beta, the optimizer, batch size
and steps, the data, the mesh, checkpointing and outputs; see train/README.md and the recipes in
train/. Dotted overrides follow the file: `loopus train --config r.yaml data.max_length=128 train.steps=20`.

Outputs in output.dir: metrics.jsonl (one line per step and per validation), loss.png, and the
final model as a loopus checkpoint (model/) and in the authors' format (lds/). Checkpoints every
checkpoint.every steps; `--resume` continues the newest complete one exactly."""


def cmd_train(a: argparse.Namespace) -> None:
    from loopus_jax.train.trainer import run

    res = run(
        a.config,
        resume=a.resume,
        overrides=a.overrides,
        coordinator=a.coordinator,
        num_processes=a.num_processes,
        process_id=a.process_id,
    )
    last = res.last
    if last:
        print(
            f"step {res.step}: loss {last['loss']:.4f} (lm {last['lm']:.4f}, mono {last['mono']:.4f}, q {last['q']:.4f}), "
            f"token acc {last['token_acc']:.3f}, mean q {last['q_hat']:.3f}"
        )
    if res.evals:
        ev = res.evals[-1]
        print("validation ppl by depth: " + ", ".join(f"N={d}: {p:.3f}" for d, p in ev["ppl"].items()))
    print(f"metrics: {res.metrics_path}" + (f"; curves: {res.plot_path}" if res.plot_path else ""))
    for fmt, path in res.exports.items():
        print(f"wrote {fmt} checkpoint {path}")


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="post-train a looped model (random deep supervision)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", required=True, help="YAML training config (see train/*.yaml)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.max_length=128")
    t.add_argument("--resume", action="store_true", help="continue the newest complete checkpoint in checkpoint.dir")
    t.add_argument("--coordinator", help="multi-process: coordinator HOST:PORT (with --num-processes, --process-id)")
    t.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    t.add_argument("--process-id", type=int, help="multi-process: this process's index")
    t.set_defaults(fn=cmd_train)
