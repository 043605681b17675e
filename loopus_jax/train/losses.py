"""Random deep supervision (method section 4, the authors' `training_runtime.py` and `utils/metrics.py`).

One batch: the encoder runs once without gradient. For each depth step i in 0..N-1, an unsupervised
step applies the reasoning block once without gradient; a supervised step starts from the detached
state h_old, applies the block TWICE with gradient (the q logit comes from the second application's
pre-gate update at each row's last real token), decodes, and scores:
  lm     = cross-entropy of the shifted logits against labels (-100 ignored), mean over valid tokens
  mono   = SiLU(lm - lm_prev), lm_prev = the decoder's loss on h_old, without gradient
  q      = BCE-with-logits(q_logit, target_q), target_q = per-row fraction of valid next tokens whose
           argmax is right, mean over rows
  total  = lm + beta * mono + q
after which the state is detached again. Each supervised loss depends on the parameters only through
its own segment, so the gradient of their sum equals the sum of their separate gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopus_jax.models import layers as L

IGNORE = -100


class StepLosses(NamedTuple):
    """Per supervised step (leading axis S when stacked)."""

    lm: jax.Array
    mono: jax.Array
    q: jax.Array
    total: jax.Array
    token_acc: jax.Array  # micro-averaged accuracy of the next-token argmax
    q_hat: jax.Array  # mean sigmoid(q logit)


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring -100 (float32)."""
    logits, target = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = target != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def q_target(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-row fraction of valid next tokens predicted right [B], micro token accuracy [])."""
    target = labels[:, 1:]
    valid = target != IGNORE
    right = (jnp.argmax(logits[:, :-1], axis=-1) == target) & valid
    per_row = jnp.sum(right, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
    return per_row.astype(jnp.float32), jnp.sum(right) / jnp.maximum(jnp.sum(valid), 1)


def bce_with_logits(logit: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.maximum(logit, 0) - logit * target + jnp.log1p(jnp.exp(-jnp.abs(logit))))


def supervised_step(
    model: nnx.Module, h_old: jax.Array, ctx: L.AttnContext, labels: jax.Array, watch: jax.Array, beta: float, scan: bool
) -> tuple[jax.Array, StepLosses]:
    """Two reasoning applications from the detached state, the decoder and the four losses."""
    h_old = jax.lax.stop_gradient(h_old)
    h_mid, _ = model.reason(h_old, ctx, scan)
    h, h_new = model.reason(h_mid, ctx, scan)
    q_logit = model.q_logit(h_mid, h_new, h, watch, "pre_gate_last_valid")
    logits = model.decode(h, ctx, scan)
    lm = lm_loss(logits, labels)
    lm_prev = jax.lax.stop_gradient(lm_loss(model.decode(h_old, ctx, scan), labels))
    mono = jax.nn.silu(lm - lm_prev)
    tq, acc = q_target(jax.lax.stop_gradient(logits), labels)
    q = bce_with_logits(q_logit, tq)
    total = lm + beta * mono + q
    return h, StepLosses(lm, mono, q, total, acc, jnp.mean(jax.nn.sigmoid(q_logit)))


def unsupervised_step(model: nnx.Module, h: jax.Array, ctx: L.AttnContext, scan: bool) -> jax.Array:
    return jax.lax.stop_gradient(model.reason(jax.lax.stop_gradient(h), ctx, scan)[0])


def supervised_mask(key: jax.Array, n_recursion: int, n_supervision: int) -> jax.Array:
    """[N] bool with S distinct True entries drawn uniformly (the authors' sorted random.sample)."""
    order = jax.random.permutation(key, n_recursion)
    return jnp.zeros((n_recursion,), bool).at[order[:n_supervision]].set(True)


def deep_supervision_losses(
    model: nnx.Module,
    batch: dict[str, Any],
    supervised_steps: Any,
    n_recursion: int,
    beta: float = 1.0,
    *,
    scan_layers: bool | None = None,
) -> StepLosses:
    """Losses of every supervised step for fixed `supervised_steps` (indices in range(N)), no update.

    `batch` holds `input_ids`, `attention_mask` and `labels` ([B, T]; labels -100 where ignored).
    Returns `StepLosses` stacked over the supervised steps in increasing order. Differentiable: the
    gradient of `total.sum()` is the sum of the separate supervised steps' gradients.
    """
    steps = np.asarray(sorted(int(s) for s in np.atleast_1d(supervised_steps)))
    if len(set(steps.tolist())) != len(steps) or steps.min() < 0 or steps.max() >= n_recursion:
        raise ValueError(f"supervised_steps must be distinct indices in range({n_recursion}), got {steps.tolist()}")
    mask = jnp.zeros((n_recursion,), bool).at[steps].set(True)
    per_step = _losses_for_mask(model, batch, mask, beta, model.scan_layers if scan_layers is None else scan_layers)
    return jax.tree.map(lambda x: x[steps], per_step)


def _losses_for_mask(model: nnx.Module, batch: dict[str, Any], sup_mask: jax.Array, beta: float, scan: bool) -> StepLosses:
    """StepLosses [N] over all depth steps (zeros at unsupervised ones)."""
    ids = jnp.asarray(batch["input_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    labels = jnp.asarray(batch["labels"])
    h, ctx = model.encode(ids, mask, scan)
    h = jax.lax.stop_gradient(h)
    watch = L.last_valid_index(mask)
    zeros = StepLosses(*(jnp.float32(0),) * 6)

    def body(h, is_sup):
        return jax.lax.cond(
            is_sup,
            lambda h: supervised_step(model, h, ctx, labels, watch, beta, scan),
            lambda h: (unsupervised_step(model, h, ctx, scan), zeros),
            h,
        )

    _, per_step = jax.lax.scan(body, h, sup_mask)
    return per_step
