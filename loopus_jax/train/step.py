"""The random-deep-supervision train step: one jitted function per batch, depth loop as a scan.

Trainable: reasoning layers, gate, q head, decoder layers, final norm, lm_head. Frozen (no gradient,
no optimizer state): the embedding and the encoder. Update rules:
- `per_grad_accum_supervised_losses` (the authors' accounting, default): every supervised loss is
  differentiated on its own, scaled by 1/grad_accum, accumulated, and an AdamW update is applied
  after every `grad_accum` supervised losses, counted across supervised steps and batches; with
  grad_accum = 1 the later supervised steps of a batch see the weights updated by the earlier ones.
- `per_batch`: the batch's supervised losses are averaged into one gradient and one update per batch.
  With the optimizer wrapped by `micro_batched(opt, k)` (`optax.MultiSteps`), the parameters change
  once every k batches, by the mean of their gradients; the k micro-batches of one update share their
  supervised steps (the RNG key advances only at a real update), so they equal one batch of k times
  the rows when every micro-batch holds as many scored tokens and beta = 0 (mono is SiLU of the
  batch-mean loss difference, not a mean over rows, so with beta > 0 they agree to first order).
The step also returns the global L2 norm of the gradient each update applied (mean over the batch's
updates; NaN when the batch made none); with micro-batches, the norm of this batch's gradient.
Activations of unsupervised steps are never kept (they run under stop_gradient inside a `cond`
branch), and each supervised gradient is taken inside the scan body, so memory does not grow with N.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopus_jax.errors import LoopusError
from loopus_jax.models.layers import last_valid_index
from loopus_jax.sharding import batch_sharding, tree_shardings
from loopus_jax.train.losses import StepLosses, supervised_mask, supervised_step, unsupervised_step

TRAINABLE = ("reasoning", "gate", "q_head", "decoder", "final_norm", "lm_head")
UPDATE_RULES = ("per_grad_accum_supervised_losses", "per_batch")


def is_trainable(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and str(path[0]) in TRAINABLE


@dataclasses.dataclass(frozen=True)
class StepConfig:
    n_recursion: int
    n_supervision: int
    beta: float = 1.0
    grad_accum: int = 1
    update: str = "per_grad_accum_supervised_losses"

    def check(self) -> "StepConfig":
        if not 1 <= self.n_supervision <= self.n_recursion:
            raise LoopusError(f"n_supervision must be in 1..n_recursion={self.n_recursion}, got {self.n_supervision}")
        if self.grad_accum < 1:
            raise LoopusError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.update not in UPDATE_RULES:
            raise LoopusError(f"unknown update rule {self.update!r}; expected one of {', '.join(UPDATE_RULES)}")
        return self

    @property
    def accumulates(self) -> bool:
        """Whether a gradient outlives its supervised step (per_batch, or grad_accum > 1); otherwise each
        is applied at once and the state needs no accumulator (`init_state(..., accumulate=False)`)."""
        return self.update == "per_batch" or self.grad_accum > 1


class TrainState(NamedTuple):
    params: Any  # trainable nnx.State (float32 master weights)
    opt_state: Any
    grad_acc: Any  # gradient accumulated since the last update (per_grad_accum rule); None when never needed
    n_acc: jax.Array  # supervised losses accumulated since the last update
    updates: jax.Array  # optimizer updates applied so far
    rng: jax.Array


def adamw(lr: float = 5e-5, warmup: int = 0, total: int = 1000, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """torch.optim.AdamW defaults (betas 0.9/0.999, eps 1e-8, decay 0.01 on every trained tensor),
    linear warmup then cosine decay to 0, clamped at the end (the authors' schedule restarts)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total, warmup + 1), end_value=0.0)
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def micro_batched(optimizer: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
    """`optimizer` applied once every `k` calls to the mean of their gradients (`optax.MultiSteps`);
    its schedule counts real updates. For `update: per_batch` only; k = 1 returns `optimizer`."""
    if k < 1:
        raise LoopusError(f"micro-batches per update must be >= 1, got {k}")
    return optimizer if k == 1 else optax.MultiSteps(optimizer, every_k_schedule=k).gradient_transformation()


def split_model(model: nnx.Module) -> tuple[Any, Any, Any]:
    """(graphdef, trainable state, frozen state)."""
    return nnx.split(model, is_trainable, ...)


def init_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, seed: int = 0, compute_dtype: Any = None, accumulate: bool = True
) -> tuple[Any, Any, TrainState]:
    """(graphdef, frozen params, initial TrainState); only trainable params get optimizer state.

    `compute_dtype` (e.g. bfloat16) sets the activations' and matmuls' dtype; the parameters stay
    as stored (float32 master weights), and the gate, q head, logits and losses stay float32.
    `accumulate=False` (for a StepConfig whose `accumulates` is False) leaves out the gradient
    accumulator, which would stay zero: one copy of the trained parameters less in memory and in checkpoints.
    """
    if compute_dtype is not None:
        model.compute_dtype = jnp.dtype(compute_dtype).name
    graphdef, params, frozen = split_model(model)
    zeros = jax.tree.map(jnp.zeros_like, params) if accumulate else None
    state = TrainState(params, optimizer.init(params), zeros, jnp.int32(0), jnp.int32(0), jax.random.key(seed))
    return graphdef, frozen, state


def _step(
    graphdef: Any,
    frozen: Any,
    state: TrainState,
    batch: dict[str, jax.Array],
    optimizer: optax.GradientTransformation,
    cfg: StepConfig,
    scan: bool,
    supervised: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, StepLosses, jax.Array, jax.Array]:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    per_batch = cfg.update == "per_batch"
    multi = isinstance(state.opt_state, optax.MultiStepsState)
    if multi and not per_batch:
        raise LoopusError(
            "an optax.MultiSteps (micro-batched) optimizer needs update 'per_batch'; with "
            "'per_grad_accum_supervised_losses' accumulate supervised losses with grad_accum instead"
        )
    if state.grad_acc is None and cfg.accumulates:
        raise LoopusError(
            "this step accumulates gradients (update 'per_batch' or grad_accum > 1) but the state has no "
            "accumulator; build the state with init_state(..., accumulate=True)"
        )
    rng, sub = jax.random.split(state.rng)
    sup = supervised_mask(sub, cfg.n_recursion, cfg.n_supervision) if supervised is None else supervised
    model = nnx.merge(graphdef, state.params, frozen)
    h, ctx = model.encode(ids, mask, scan)
    h = jax.lax.stop_gradient(h)
    if mesh is not None:  # the loop-carried state is data-parallel: batch split over data x fsdp, features whole
        h = jax.lax.with_sharding_constraint(h, batch_sharding(mesh, h.shape))
    watch = last_valid_index(mask)
    scale = 1.0 / (cfg.n_supervision if per_batch else cfg.grad_accum)
    zero_losses = StepLosses(*(jnp.float32(0),) * 6)

    def loss_fn(params, h):
        m = nnx.merge(graphdef, params, frozen)
        h2, losses = supervised_step(m, h, ctx, labels, watch, cfg.beta, scan)
        return losses.total * scale, (h2, losses)

    def apply(params, opt_state, grads):
        upd, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, optax.global_norm(grads)

    def keep(params, opt_state, _):
        return params, opt_state, jnp.float32(0)

    def supervised(carry):
        h, params, opt_state, acc, n_acc, n_upd, norm_sum = carry
        (_, (h2, losses)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, h)
        if acc is None:  # grad_accum = 1: every loss updates. The cond (always due) keeps the update's
            # compiled form, and so its floats, equal to a state with an (all-zero) accumulator.
            due = n_acc + 1 == cfg.grad_accum
            params, opt_state, norm = jax.lax.cond(due, apply, keep, params, opt_state, g)
            n_upd = n_upd + due.astype(jnp.int32)
            return (jax.lax.stop_gradient(h2), params, opt_state, acc, n_acc, n_upd, norm_sum + norm), losses
        acc = jax.tree.map(jnp.add, acc, g)
        n_acc = n_acc + 1
        if not per_batch:
            due = n_acc == cfg.grad_accum
            params, opt_state, norm = jax.lax.cond(due, apply, keep, params, opt_state, acc)
            acc = jax.tree.map(lambda a: jnp.where(due, jnp.zeros_like(a), a), acc)
            n_upd = n_upd + due.astype(jnp.int32)
            n_acc = jnp.where(due, 0, n_acc)
            norm_sum = norm_sum + norm
        return (jax.lax.stop_gradient(h2), params, opt_state, acc, n_acc, n_upd, norm_sum), losses

    def unsupervised(carry):
        h, params, *rest = carry
        return (unsupervised_step(nnx.merge(graphdef, params, frozen), h, ctx, scan), params, *rest), zero_losses

    init = (h, state.params, state.opt_state, state.grad_acc, state.n_acc, state.updates, jnp.float32(0))
    (_, params, opt_state, acc, n_acc, n_upd, norm_sum), per_step = jax.lax.scan(
        lambda c, s: jax.lax.cond(s, supervised, unsupervised, c), init, sup
    )
    if per_batch:
        params, opt_state, norm = apply(params, opt_state, acc)
        acc = jax.tree.map(jnp.zeros_like, acc)
        # MultiSteps counts its real updates; until the k-th micro-batch the key stays, so the k
        # micro-batches of one update draw the same supervised steps.
        due = opt_state.gradient_step > state.opt_state.gradient_step if multi else jnp.bool_(True)
        if multi:
            rng = jax.lax.cond(due, lambda new, old: new, lambda new, old: old, rng, state.rng)
        n_acc, n_upd, grad_norm = jnp.int32(0), n_upd + due.astype(jnp.int32), norm
    else:
        made = n_upd - state.updates
        grad_norm = jnp.where(made > 0, norm_sum / jnp.maximum(made, 1), jnp.nan)
    return TrainState(params, opt_state, acc, n_acc, n_upd, rng), per_step, sup, grad_norm


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "cfg", "scan"), donate_argnames=("state",))
def train_step(
    graphdef: Any,
    frozen: Any,
    state: TrainState,
    batch: dict,
    optimizer: Any,
    cfg: StepConfig,
    scan: bool = True,
    supervised: jax.Array | None = None,
) -> tuple[TrainState, StepLosses, jax.Array, jax.Array]:
    """One batch: (new state, StepLosses [N] (zeros at unsupervised steps), supervised mask [N],
    gradient norm: the mean over the batch's updates of the L2 norm of the gradient each applied,
    NaN when none; with `per_batch`, the batch's gradient).

    The supervised steps are drawn on device from the state's key unless `supervised` ([N] bool) fixes them.
    """
    return _step(graphdef, frozen, state, batch, optimizer, cfg, scan, supervised)


def shard_global_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global arrays split over the mesh's data and fsdp axes.

    On one process `batch` is the whole batch; on several (multi-host) it is this process's rows,
    and the global batch is their concatenation in process order.
    """
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), batch_sharding(mesh, np.shape(v))) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), v, global_shape)
    return out


def _to_mesh(tree: Any, mesh: Mesh) -> Any:
    shardings = tree_shardings(tree, mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x: Any, sh: NamedSharding) -> jax.Array:
        # Multi-host: device_put cannot reach other processes' devices; build the global array from
        # this process's copy, shard by shard (RNG keys travel as their raw uint32 data).
        is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(x) if is_key else x)
        if is_key:
            sh = NamedSharding(mesh, PartitionSpec(*sh.spec, *([None] * (host.ndim - len(sh.spec)))))
        arr = jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
        return jax.random.wrap_key_data(arr) if is_key else arr

    return jax.tree.map(put, tree, shardings)


class ShardedStep:
    """`train_step` compiled once per batch shape with explicit in/out shardings on a mesh (pjit).

    Parameters, optimizer moments and accumulated gradients are sharded by the logical-axis rules
    (`loopus_jax.sharding.RULES`), the batch over `data` x `fsdp`, scalars and the RNG replicated;
    the state is donated. `place(frozen, state)` moves host or single-device trees onto the mesh.
    """

    def __init__(self, graphdef: Any, optimizer: optax.GradientTransformation, cfg: StepConfig, mesh: Mesh, scan: bool = True):
        self.graphdef, self.optimizer, self.cfg, self.mesh, self.scan = graphdef, optimizer, cfg.check(), mesh, scan
        self._compiled: dict[tuple, Any] = {}

    def place(self, frozen: Any, state: TrainState) -> tuple[Any, TrainState]:
        """Every process passes the same (host or local) values; each keeps only its devices' shards."""
        return _to_mesh(frozen, self.mesh), _to_mesh(state, self.mesh)

    def _jit(self, frozen: Any, state: TrainState, batch: dict[str, jax.Array]) -> Any:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        state_sh = tree_shardings(state, self.mesh)
        fn = functools.partial(_step, self.graphdef, optimizer=self.optimizer, cfg=self.cfg, scan=self.scan, mesh=self.mesh)
        return jax.jit(
            fn,
            in_shardings=(tree_shardings(frozen, self.mesh), state_sh, {k: v.sharding for k, v in batch.items()}),
            out_shardings=(state_sh, replicated, replicated, replicated),
            donate_argnums=(1,),
        )

    def __call__(
        self, frozen: Any, state: TrainState, batch: dict[str, Any]
    ) -> tuple[TrainState, StepLosses, jax.Array, jax.Array]:
        """(new state, StepLosses [N], supervised mask [N], gradient norm) as `train_step` returns them;
        `batch` as numpy (placed here) or global arrays."""
        if not all(isinstance(v, jax.Array) and isinstance(v.sharding, NamedSharding) for v in batch.values()):
            batch = shard_global_batch(batch, self.mesh)
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in self._compiled:
            self._compiled[key] = self._jit(frozen, state, batch)
        return self._compiled[key](frozen, state, batch)
