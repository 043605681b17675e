"""Exit criteria of the depth loop, behind one interface, and their registry.

A criterion is a pure function `rule(depth, params, stats) -> (halt [B] bool, new stats)` of what one
depth step shows (`Depth`: the watched position's state before and after the step, the decoder's
logits at both when the criterion asks for them, q) and its own carried statistics (a pytree whose
leaves have the batch as leading axis). The loop that calls it (`halting.advance`) freezes halted
rows, keeps a halted row's statistics, and runs the decoder only for criteria with `needs_logits`.
Parameters are traced scalars (changing them does not recompile); each criterion has at most two,
`threshold` first, with defaults.

LoopUS's rules (method section 5): `threshold` (q > threshold), `cdf` (q as a hazard: survival *= 1 - q,
halt when 1 - survival > threshold), both judged every `q_eval_interval` steps and at the last;
`convergence` (L2 change of the watched state < threshold, every step).
Huginn's zero-shot rules (seal-rg/recurrent-pretraining, `raven_modeling_minimal.py`; same names and
default thresholds), judged every step at the watched position:
`entropy-diff` |H(p_t) - H(p_{t-1})| < threshold; `latent-diff` ||h_t - h_{t-1}|| / ||h_t|| < threshold;
`kl` KL(p_{t-1} || p_t) < threshold; `minp-kl` the same KL after replacing probabilities below
min_p * max p by 1/V and renormalising; `argmax-stability` the argmax has stayed the same for
`threshold` consecutive steps; `cosine` 1 - cos(h_t, h_{t-1}) < threshold.
At the first depth there is no previous distribution: as in Huginn, KL is taken against the uniform
distribution (the loop passes all-zero previous logits), the previous entropy is 100 and the argmax
run starts from no token. The previous state at the first depth is the encoder's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopus_jax.errors import LoopusError

Stats = Any  # a pytree of [B, ...] arrays
Rule = Callable[["Depth", Mapping[str, jax.Array], Stats], tuple[jax.Array, Stats]]

HUGINN_FIRST_ENTROPY = 100.0  # Huginn's "previous entropy" before the first step
ENTROPY_EPS = 1e-10  # Huginn's entropy: -sum p log(p + 1e-10)


class Depth(NamedTuple):
    """What one depth step shows a criterion (rows already halted show a zero change)."""

    step: jax.Array  # 0-based index of the step just taken (its depth is step + 1)
    n: int  # the depth bound N
    evaluate: jax.Array  # bool: a q-judging step (every q_eval_interval steps, and the last)
    h_prev: jax.Array  # [B, D] the watched position's state before the step
    h_new: jax.Array  # [B, D] after it
    logits_prev: jax.Array | None  # [B, V] float32 decoder logits at h_prev (zeros before the first step)
    logits_new: jax.Array | None  # [B, V] at h_new; None unless the criterion needs_logits
    q: jax.Array  # [B] sigmoid of the q logit at this step


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registered exit criterion: its rule, initial statistics and parameters (name, default)."""

    name: str
    rule: Rule
    params: tuple[tuple[str, float], ...]
    summary: str
    needs_logits: bool = False
    init: Callable[[int], Stats] = lambda batch: ()
    check: Callable[[dict[str, float]], str | None] = lambda p: None  # a problem with the values, or None
    # The LoopConfig field / forward keyword that also sets `threshold` (LoopUS's own options).
    legacy_option: str | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.params)

    def describe(self) -> str:
        legacy = lambda k: k == "threshold" and self.legacy_option
        show = lambda k, v: f"{k}=the checkpoint's {self.legacy_option}" if legacy(k) else f"{k}={v:g}"
        ps = ", ".join(show(k, v) for k, v in self.params) or "no parameters"
        return f"{self.name} ({ps})"


REGISTRY: dict[str, Criterion] = {}


def register(c: Criterion) -> Criterion:
    """Add (or replace) a criterion by name; at most two parameters, `threshold` first when present."""
    if len(c.params) > 2:
        raise ValueError(f"criterion {c.name!r}: at most two parameters travel traced, got {c.param_names}")
    REGISTRY[c.name] = c
    return c


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Criterion:
    if name not in REGISTRY:
        raise LoopusError(f"unknown halting strategy {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve_params(c: Criterion, given: Mapping[str, Any] | None, legacy: float | None, legacy_default: float | None) -> dict:
    """The criterion's parameter values: `given` (halting_params) over the legacy keyword over defaults."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(c.param_names))
    if unknown:
        have = ", ".join(f"{k} (default {v:g})" for k, v in c.params) or "none"
        raise LoopusError(f"halting {c.name!r} has no parameter(s) {unknown}; its parameters: {have}")
    values = dict(c.params)
    if c.legacy_option is not None:
        if legacy_default is not None:
            values["threshold"] = legacy_default
        if legacy is not None:
            if "threshold" in given and float(given["threshold"]) != float(legacy):
                raise LoopusError(
                    f"{c.legacy_option}={legacy} and halting_params threshold={given['threshold']} disagree; give one of them"
                )
            values["threshold"] = legacy
    for k, v in given.items():
        try:
            values[k] = float(v)
        except (TypeError, ValueError):
            raise LoopusError(f"halting parameter {k}={v!r} of {c.name!r} is not a number") from None
    values = {k: float(v) for k, v in values.items()}
    bad = [k for k, v in values.items() if math.isnan(v)]
    problem = f"{bad[0]} is NaN" if bad else c.check(values)
    if problem:
        raise LoopusError(f"halting {c.name!r}: {problem}")
    return values


def pack(c: Criterion, values: Mapping[str, float]) -> tuple[float, float]:
    """Parameter values as the two traced scalars the compiled loop takes (unused slots 0)."""
    v = [float(values[k]) for k in c.param_names] + [0.0, 0.0]
    return v[0], v[1]


def unpack(c: Criterion, a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
    return dict(zip(c.param_names, (a, b)))


# --- helpers ---------------------------------------------------------------------------------------


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _entropy(logits: jax.Array) -> jax.Array:
    p = jax.nn.softmax(_f32(logits), axis=-1)
    return -jnp.sum(p * jnp.log(p + ENTROPY_EPS), axis=-1)


def _kl(logp_prev: jax.Array, logp_new: jax.Array) -> jax.Array:
    """KL(prev || new) per row (Huginn's `F.kl_div(new, prev, log_target=True).sum(-1)`)."""
    return jnp.sum(jnp.exp(logp_prev) * (logp_prev - logp_new), axis=-1)


def minp_log_probs(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Log of softmax(logits) with entries below min_p * max replaced by 1/V, renormalised."""
    p = jax.nn.softmax(_f32(logits), axis=-1)
    v = p.shape[-1]
    p = jnp.where(p < min_p * jnp.max(p, axis=-1, keepdims=True), 1.0 / v, p)
    return jnp.log(p / jnp.sum(p, axis=-1, keepdims=True))


def _norm(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x, axis=-1)


# --- LoopUS ----------------------------------------------------------------------------------------


def _threshold(d: Depth, p, stats):
    return d.evaluate & (d.q > p["threshold"]), stats


def _cdf(d: Depth, p, log_survival):
    log_survival = jnp.where(d.evaluate, log_survival + jnp.log1p(-jnp.minimum(d.q, 1.0 - 1e-7)), log_survival)
    return d.evaluate & (1.0 - jnp.exp(log_survival) > p["threshold"]), log_survival


def _convergence(d: Depth, p, stats):
    return _norm(_f32(d.h_new - d.h_prev)) < p["threshold"], stats


# --- Huginn ----------------------------------------------------------------------------------------


def _entropy_diff(d: Depth, p, stats):
    prev = jnp.where(d.step == 0, HUGINN_FIRST_ENTROPY, _entropy(d.logits_prev))
    return jnp.abs(_entropy(d.logits_new) - prev) < p["threshold"], stats


def _latent_diff(d: Depth, p, stats):
    h_new = _f32(d.h_new)
    return _norm(h_new - _f32(d.h_prev)) / _norm(h_new) < p["threshold"], stats


def _kl_rule(d: Depth, p, stats):
    ls = lambda x: jax.nn.log_softmax(_f32(x), axis=-1)
    return _kl(ls(d.logits_prev), ls(d.logits_new)) < p["threshold"], stats


def _minp_kl(d: Depth, p, stats):
    f = lambda x: minp_log_probs(x, p["min_p"])
    return _kl(f(d.logits_prev), f(d.logits_new)) < p["threshold"], stats


def _argmax_stability(d: Depth, p, run):
    new = jnp.argmax(d.logits_new, axis=-1).astype(jnp.int32)
    prev = jnp.where(d.step == 0, -1, jnp.argmax(d.logits_prev, axis=-1).astype(jnp.int32))
    run = jnp.where(new == prev, run + 1, 0)
    return run >= p["threshold"], run


def _cosine(d: Depth, p, stats):
    a, b = _f32(d.h_new), _f32(d.h_prev)
    cos = jnp.sum(a * b, axis=-1) / (_norm(a) * _norm(b))
    return 1.0 - cos < p["threshold"], stats


def _zeros(dtype):
    return lambda batch: jnp.zeros((batch,), dtype)


def _count_check(p: dict) -> str | None:
    k = p["threshold"]
    return None if k >= 1 and float(k).is_integer() else f"threshold counts steps and must be an integer >= 1, got {k:g}"


def _minp_check(p: dict) -> str | None:
    return None if 0 < p["min_p"] < 1 else f"min_p must lie in (0, 1), got {p['min_p']:g}"


def _none(d: Depth, p, stats):
    return jnp.zeros(d.q.shape, bool), stats


register(Criterion("none", _none, (), "fixed depth N"))
register(Criterion("threshold", _threshold, (("threshold", 0.9),), "q > threshold", legacy_option="q_threshold"))
register(
    Criterion(
        "cdf", _cdf, (("threshold", 0.9),), "1 - prod(1 - q) > threshold", init=_zeros(jnp.float32), legacy_option="q_threshold"
    )
)
register(
    Criterion(
        "convergence", _convergence, (("threshold", 1e-2),), "||h_t - h_t-1|| < threshold", legacy_option="convergence_epsilon"
    )
)
register(Criterion("entropy-diff", _entropy_diff, (("threshold", 1e-3),), "|H_t - H_t-1| < threshold", needs_logits=True))
register(Criterion("latent-diff", _latent_diff, (("threshold", 0.03),), "||h_t - h_t-1|| / ||h_t|| < threshold"))
register(Criterion("kl", _kl_rule, (("threshold", 5e-4),), "KL(p_t-1 || p_t) < threshold", needs_logits=True))
register(
    Criterion(
        "minp-kl",
        _minp_kl,
        (("threshold", 1e-6), ("min_p", 0.1)),
        "KL of min-p-filtered distributions < threshold",
        needs_logits=True,
        check=_minp_check,
    )
)
register(
    Criterion(
        "argmax-stability",
        _argmax_stability,
        (("threshold", 5.0),),
        "same argmax for threshold consecutive steps",
        needs_logits=True,
        init=_zeros(jnp.int32),
        check=_count_check,
    )
)
register(Criterion("cosine", _cosine, (("threshold", 1e-3),), "1 - cos(h_t, h_t-1) < threshold"))


def help_text() -> str:
    """One line naming every criterion and its parameters, for --help texts."""
    return "; ".join(c.describe() for c in REGISTRY.values())


def params_from_flags(threshold: float | None, pairs: list[str] | None) -> dict[str, float] | None:
    """`halting_params` from the command line: `--halting-threshold X` and `--halting-param NAME=VALUE`."""
    out: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise LoopusError(f"--halting-param expects NAME=NUMBER (e.g. min_p=0.1), got {pair!r}") from None
    if threshold is not None:
        if "threshold" in out and out["threshold"] != threshold:
            raise LoopusError("--halting-threshold and --halting-param threshold=... disagree; give one")
        out["threshold"] = float(threshold)
    return out or None


def add_cli_flags(parser: Any) -> None:
    """The halting flags shared by `loopus generate` and `loopus eval tasks/sweep`."""
    parser.add_argument(
        "--halting",
        help="looped models: the exit criterion (default: the checkpoint's); one of " + ", ".join(REGISTRY),
    )
    parser.add_argument("--q-threshold", type=float, help="looped models: threshold of the q rules (threshold, cdf)")
    parser.add_argument(
        "--halting-threshold", type=float, help="looped models: the criterion's threshold (default: its own, listed below)"
    )
    parser.add_argument(
        "--halting-param",
        action="append",
        metavar="NAME=VALUE",
        help="looped models: another parameter of the criterion, repeatable. Criteria and defaults: " + help_text(),
    )
