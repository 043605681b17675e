"""The training driver: model -> looped model -> data -> jitted steps, with orbax checkpoints, exact
resume, JSONL metrics, validation perplexity against depth, PNG curves and the final exports.

`run(config)` is the whole run (the library form of `loopus train`). One batch is one call of the
step function built by `_build_step` (the single place the trainer calls the sharded train step). A run
resumed with `resume=True` restores the newest complete checkpoint (parameters, optimizer state,
counters, RNG key and data position) and continues exactly: its later steps, metrics and final
parameters equal those of a run that was never interrupted.

Testing hook: the environment variable `LOOPUS_TRAIN_STEP_DELAY_S` makes every step sleep that many
seconds, so a test can interrupt a tiny run in the middle.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from loopus_jax.errors import LoopusError
from loopus_jax.train.checkpoint import Checkpointer
from loopus_jax.train.config import RUN_DEFINING, TrainConfig, check_paths, load_config
from loopus_jax.train.losses import IGNORE, StepLosses
from loopus_jax.train.metrics import MetricsLog, plot, read_jsonl, train_record
from loopus_jax.train.step import ShardedStep, StepConfig, TrainState, adamw, init_state, micro_batched, shard_global_batch


@dataclasses.dataclass
class TrainResult:
    step: int  # batches trained in total
    resumed_from: int | None  # checkpoint step this run continued from
    output_dir: Path
    metrics_path: Path
    plot_path: Path | None
    exports: dict[str, Path]  # format -> directory
    last: dict  # the last train metrics line
    evals: list[dict]  # every validation line of the run (including before an interruption)
    checkpoints: list[int]


# --------------------------------------------------------------------------------------------------
# Building blocks


def build_model(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, Any]:
    """(looped model on the mesh, tokenizer): a base checkpoint is looped with model.encoder/decoder."""
    import loopus_jax as lj
    from loopus_jax.loop.model import LoopedLM, loop_model
    from loopus_jax.sharding import shard_model
    from loopus_jax.tokenizer import require_tokenizer

    m = cfg.model
    path = lj.default_model_path() if m.path == "default" else cfg.resolve(m.path)
    model, tok = lj.load(path, dtype=np.dtype(m.dtype), mesh=mesh, compute_dtype=m.compute_dtype)
    tok = require_tokenizer(tok, path)
    if isinstance(model, LoopedLM):
        if m.encoder is not None:
            lc = model.loop
            same = _spec_ix(m.encoder, model) == lc.encoder_layers and _spec_ix(m.decoder, model) == lc.decoder_layers
            if not same:
                raise LoopusError(
                    f"{path} is already looped (encoder {list(lc.encoder_layers)}, decoder {list(lc.decoder_layers)}); "
                    "set model.encoder and model.decoder to null (or to its split)"
                )
    else:
        if m.encoder is None:
            raise LoopusError(f"{path} is a base model; set model.encoder and model.decoder to loop it (e.g. '0-1' and '27-')")
        model = loop_model(model, m.encoder, m.decoder, n_recursion=cfg.loop.n_recursion, seed=cfg.seed)
        shard_model(model, mesh)  # the fresh gate and q head, and the sliced stacks, onto their shardings
    return model, tok


def _spec_ix(spec: str, model: Any) -> tuple[int, ...]:
    from loopus_jax.loop.spec import parse_layer_spec

    lc = model.loop
    return parse_layer_spec(spec, len(lc.encoder_layers) + len(lc.reasoning_layers) + len(lc.decoder_layers))


def total_updates(cfg: TrainConfig) -> int:
    """Optimizer updates over the run: one per `grad_accum` supervised losses, or one per
    `micro_batches` batches."""
    if cfg.optim.update == "per_batch":
        return cfg.train.steps // cfg.optim.micro_batches
    return max(1, cfg.train.steps * cfg.loop.n_supervision // cfg.optim.grad_accum)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule `step.adamw` builds for the same arguments (for logging)."""
    o, total = cfg.optim, total_updates(cfg)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup, 0), max(total, o.warmup + 1), end_value=0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the run's schedule, wrapped in optax.MultiSteps when optim.micro_batches > 1."""
    o = cfg.optim
    return micro_batched(adamw(o.lr, o.warmup, total_updates(cfg), o.weight_decay), o.micro_batches)


def step_config(cfg: TrainConfig) -> StepConfig:
    return StepConfig(cfg.loop.n_recursion, cfg.loop.n_supervision, cfg.loop.beta, cfg.optim.grad_accum, cfg.optim.update).check()


def _build_step(
    graphdef: Any,
    frozen: Any,
    state: TrainState,
    optimizer: optax.GradientTransformation,
    cfg: StepConfig,
    mesh: jax.sharding.Mesh,
    scan: bool,
) -> tuple[Callable[[TrainState, dict], tuple[TrainState, StepLosses, jax.Array, jax.Array]], Any, TrainState]:
    """(fn(state, batch) -> (state, StepLosses [N], supervised mask [N], gradient norm), frozen,
    state): the one call of the train step, compiled with explicit shardings on the mesh; frozen and
    state are returned placed on those shardings. `batch`: host rows or `shard_global_batch`'s global arrays."""
    step = ShardedStep(graphdef, optimizer, cfg, mesh, scan)
    frozen, state = step.place(frozen, state)

    def fn(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, StepLosses, jax.Array, jax.Array]:
        return step(frozen, state, batch)

    return fn, frozen, state


_copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
_token_count = jax.jit(lambda mask: jnp.sum(mask, dtype=jnp.int32))  # the global batch's, on every process


@jax.jit
def _stats(params: Any, before: Any, updates: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(updates, squared parameter norm, squared norm of the change since `before` or None) as fresh
    arrays: the state they come from is donated to the next step before they are fetched."""
    sq = lambda xs: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)
    leaves = jax.tree.leaves(params)
    change = None if before is None else sq(a - b for a, b in zip(leaves, jax.tree.leaves(before)))
    return updates + 0, sq(leaves), change


# --------------------------------------------------------------------------------------------------
# Validation


@jax.jit
def _batch_nll(logits: jax.Array, labels: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed NLL of labels[:, 1:] under logits[:, :-1] over the rows `keep` marks, and the count of
    scored tokens (scalars: fetchable on every process even when the batch is split across hosts)."""
    target = labels[:, 1:]
    valid = (target != IGNORE) & keep[:, None]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid), jnp.sum(valid)


def validate(model: nnx.Module, rows: dict[str, np.ndarray], depths: list[int], batch_size: int) -> dict:
    """Perplexity of the held-out rows at each recursion depth: exp(total NLL / scored tokens),
    scoring the labelled next tokens exactly as the training loss does."""
    import loopus_jax as lj
    from loopus_jax.api import place_batch

    n = len(rows["input_ids"])
    out: dict[str, Any] = {"tokens": 0, "nll": {}, "ppl": {}}
    for d in depths:
        total, count = 0.0, 0
        for s in range(0, n, batch_size):
            chunk = {k: v[s : s + batch_size] for k, v in rows.items()}
            real = len(chunk["input_ids"])
            if real < batch_size:  # one compiled shape: fill with copies of the first row, not scored
                chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, 0)]) for k, v in chunk.items()}
            logits = lj.forward(model, chunk["input_ids"], chunk["attention_mask"], n_recursion=d).logits
            labels, keep = place_batch(model, chunk["labels"], np.arange(batch_size) < real)  # as forward places the ids
            nll, cnt = _batch_nll(logits, labels, keep)
            total += float(nll)
            count += int(cnt)
        out["tokens"] = count
        out["nll"][str(d)] = total
        out["ppl"][str(d)] = math.exp(total / max(count, 1))
    return out


# --------------------------------------------------------------------------------------------------
# The run


def use_compile_cache(directory: str | Path | None) -> None:
    """Point JAX's persistent compilation cache at `directory` (None: off), effective at once even
    in a process that has compiled before; compiles over half a second are stored.

    On the CPU backend the cache stays off: jaxlib 0.10 crashed (abort, then segfault) serializing a
    CPU train-step executable in our test suite, and CPU entries can be rejected on reload anyway
    (jax-ml/jax#38445). A CPU run recompiles at start instead."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if directory is not None and jax.default_backend() == "cpu":
        import logging

        logging.getLogger(__name__).warning("compile_cache %s is not used on CPU (see use_compile_cache)", directory)
        directory = None
    jax.config.update("jax_compilation_cache_dir", None if directory is None else str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()


def _run_meta(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in RUN_DEFINING}


def _check_same_run(saved: dict, now: dict, where: Path) -> None:
    def flat(d: dict, p: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{p}{k}.") if isinstance(v, dict) else {f"{p}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        k = diff[0]
        raise LoopusError(
            f"cannot resume from {where}: its run had {k}={a.get(k)!r}, this config has {b.get(k)!r}; "
            "resume with the same settings or use a new checkpoint.dir"
        )


def _host_model(graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
    """The model for export; on several processes its arrays are gathered to every host first."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
        frozen = multihost_utils.process_allgather(frozen, tiled=True)
    return nnx.merge(graphdef, params, frozen)


def run(
    config: TrainConfig | str | Path | dict,
    *,
    resume: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> TrainResult:
    """Train a looped model as `config` says; returns where everything went and the last metrics.

    `config` is a TrainConfig, a YAML path or a dict of sections (overrides apply to the latter two).
    With `resume=True` the newest complete checkpoint in `checkpoint.dir` is continued (a fresh run
    starts when there is none); without it an existing checkpoint there is an error, never overwritten.
    """
    from loopus_jax.cli import output_dir
    from loopus_jax.progress import progress
    from loopus_jax.sharding import make_mesh
    from loopus_jax.train import data as D
    from loopus_jax.train.distributed import initialize

    if isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = load_config(data=config, overrides=overrides)
    else:
        cfg = load_config(config, overrides)
    check_paths(cfg)
    out_dir = output_dir(str(cfg.resolve(cfg.output.dir)))
    ckpt_dir = output_dir(str(cfg.resolve(cfg.checkpoint.dir)))
    initialize(coordinator, num_processes, process_id)
    lead = jax.process_index() == 0
    step_delay = float(os.environ.get("LOOPUS_TRAIN_STEP_DELAY_S", "0") or 0)

    ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    found = ckpt.latest_step()
    if found is not None and not resume:
        ckpt.close()
        raise LoopusError(
            f"checkpoint.dir {ckpt_dir} already holds step(s) {ckpt.all_steps()}; pass --resume to continue that run "
            "or choose another checkpoint.dir"
        )

    if cfg.compile_cache:
        use_compile_cache(cfg.resolve(cfg.compile_cache))
    mesh = make_mesh(cfg.mesh)
    model, tok = build_model(cfg, mesh)
    scan = model.scan_layers
    optimizer = make_optimizer(cfg)
    graphdef, frozen, state = init_state(model, optimizer, cfg.seed, accumulate=step_config(cfg).accumulates)
    del model
    docs = D.open_documents(cfg)
    data_it = iter(D.train_dataset(cfg, tok, docs=docs))
    rows = D.heldout_rows(cfg, tok, docs=docs)

    log = MetricsLog(out_dir / "metrics.jsonl", enabled=lead)
    start, resumed_from = 0, None
    if found is not None:
        state, data_state, meta = ckpt.restore(found, state, mesh)
        _check_same_run(meta["config"], _run_meta(cfg), ckpt_dir)
        data_it.set_state(data_state)
        start = resumed_from = int(meta["step"])
    kept = log.reset(start if found is not None else -1)
    logged_evals = {r["step"] for r in kept if r.get("kind") == "eval"}
    step_fn, frozen, state = _build_step(graphdef, frozen, state, optimizer, step_config(cfg), mesh, scan)
    lr_at = schedule(cfg)
    steps, every = cfg.train.steps, cfg.checkpoint.every

    def evaluate(step: int) -> None:
        """Every process scores (the forward is collective); the lead logs a step's result once."""
        if rows is None:
            return
        res = validate(nnx.merge(graphdef, state.params, frozen), rows, cfg.eval_depths, cfg.eval.batch_size)
        if step not in logged_evals:
            log.write({"kind": "eval", "step": step, **res})
            logged_evals.add(step)

    def eval_due(step: int) -> bool:
        return step == steps or (cfg.eval.every > 0 and step % cfg.eval.every == 0)

    if eval_due(start) and (start > 0 or cfg.eval.every > 0):  # before training, or one lost to an interruption
        evaluate(start)

    pending: list[tuple[int, tuple]] = []  # (step, device values)
    last: dict = {}
    clock = [time.perf_counter()]

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get([p[1] for p in pending])
        now = time.perf_counter()
        secs = (now - clock[0]) / len(pending)
        clock[0] = now
        for (step, _), (losses, sup, gn, tokens, upd, pn, un) in zip(pending, fetched):
            tokens = int(tokens)
            rec = train_record(
                step,
                losses,
                sup,
                updates=int(upd),
                lr=float(lr_at(max(int(upd) - 1, 0))),
                grad_norm=None if math.isnan(float(gn)) else float(gn),
                update_norm=None if un is None else math.sqrt(float(un)),
                param_norm=math.sqrt(float(pn)),
                tokens=tokens,
                seconds=secs,
                tokens_per_s=tokens / secs if secs > 0 else None,
            )
            log.write(rec)
            last.clear()
            last.update(rec)
        pending.clear()
        bar.set_postfix(
            loss=f"{last['loss']:.3f}", lm=f"{last['lm']:.3f}", q=f"{last['q_hat']:.2f}", tok_s=f"{last['tokens_per_s'] or 0:.0f}"
        )

    bar = progress(range(start, steps), desc="train", total=steps - start, unit="step")
    try:
        for i in bar:
            step = i + 1
            batch = shard_global_batch(next(data_it), mesh)
            tokens = _token_count(batch["attention_mask"])
            before = _copy(state.params) if cfg.log.update_norm else None
            state, losses, sup, grad_norm = step_fn(state, batch)
            pending.append((step, (losses, sup, grad_norm, tokens, *_stats(state.params, before, state.updates))))
            del before
            if step_delay:
                time.sleep(step_delay)
            if len(pending) >= cfg.log.every or step % every == 0 or step == steps:
                flush()
            if step % every == 0 or step == steps:
                ckpt.save(step, state, data_it.get_state(), {"step": step, "config": _run_meta(cfg)})
            if eval_due(step):
                evaluate(step)
            if not pending:  # the next step's clock starts after this step's logging, saving and validation
                clock[0] = time.perf_counter()
        flush()
    finally:
        bar.close()
        checkpoints = ckpt.all_steps()
        ckpt.close()

    exports: dict[str, Path] = {}
    state = state._replace(opt_state=None, grad_acc=None)  # dead from here: the exports need the parameters only
    final = _host_model(graphdef, state.params, frozen)
    import loopus_jax as lj

    for fmt in cfg.output.export:
        dest = out_dir / ("model" if fmt == "loopus" else fmt)
        if fmt == "loopus" or lead:
            exports[fmt] = lj.save(final, dest, format=fmt, tokenizer=tok if lead else None)
    rows_all = read_jsonl(log.path) if lead else []
    plot_path = plot(log.path, out_dir / "loss.png") if lead and cfg.output.plot and rows_all else None
    if not last:
        last = next((r for r in reversed(rows_all) if r.get("kind") == "train"), {})
    return TrainResult(
        step=cfg.train.steps,
        resumed_from=resumed_from,
        output_dir=out_dir,
        metrics_path=log.path,
        plot_path=plot_path,
        exports=exports,
        last=last,
        evals=[r for r in rows_all if r.get("kind") == "eval"],
        checkpoints=checkpoints,
    )
