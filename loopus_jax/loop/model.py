"""`LoopedLM`: encoder (run once) -> reasoning block (N times, gated) -> decoder, plus the q head.

Positions and masks are computed once and reused by every block and iteration. The depth loop is
one `lax.scan` (fixed depth) or `lax.while_loop` (halting) whose body runs the reasoning layers (a
layer scan) and the gate, wrapped in `jax.checkpoint`; its body compiles once, so compile time does
not grow with N.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loopus_jax.config import ModelConfig
from loopus_jax.errors import LoopusError
from loopus_jax.loop import criteria
from loopus_jax.loop import halting as H
from loopus_jax.loop.gate import QHead, SelectiveGate, gate_apply, q_head_apply
from loopus_jax.models import layers as L
from loopus_jax.models.transformer import Columns, LayerStack, LMEnds, _init, param_dtype

Q_SOURCES = ("pre_gate_last_valid", "post_gate_last")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The split, the depth and the halting defaults (overridable per call)."""

    encoder_layers: tuple[int, ...]
    reasoning_layers: tuple[int, ...]
    decoder_layers: tuple[int, ...]
    n_recursion: int = 8
    halting: str = "none"
    q_threshold: float = 0.9
    q_eval_interval: int = 1
    convergence_epsilon: float = 1e-2
    # Training-time q (pre-gate update at the last real token), or the authors' inference q
    # (post-gate state at the last position, padding or not).
    q_source: str = "pre_gate_last_valid"
    remat: str = "full"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopConfig":
        d = dict(d)
        for k in ("encoder_layers", "reasoning_layers", "decoder_layers"):
            d[k] = tuple(d[k])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Static options of one looped forward (each distinct value compiles once)."""

    n_recursion: int
    halting: str
    q_eval_interval: int
    q_source: str
    remat: str
    scan_layers: bool

    def check(self) -> "RunOptions":
        if self.n_recursion < 1:
            raise LoopusError(f"n_recursion must be >= 1, got {self.n_recursion}")
        H.check_strategy(self.halting)
        if self.q_eval_interval < 1:
            raise LoopusError(f"q_eval_interval must be >= 1, got {self.q_eval_interval}")
        if self.q_source not in Q_SOURCES:
            raise LoopusError(f"unknown q_source {self.q_source!r}; expected one of {', '.join(Q_SOURCES)}")
        if self.remat not in REMAT_POLICIES:
            raise LoopusError(f"unknown remat policy {self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
        return self


class LoopedLM(LMEnds):
    def __init__(
        self,
        cfg: ModelConfig,
        loop: LoopConfig,
        *,
        rngs: nnx.Rngs | None = None,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        scan_layers: bool = True,
    ):
        rngs = rngs or nnx.Rngs(0)
        # The looped model always stores its own lm_head (the authors untie embeddings).
        self.config = dataclasses.replace(cfg, tie_word_embeddings=False)
        self.loop = loop
        self.compute_dtype = jnp.dtype(dtype or param_dtype).name
        self.scan_layers = scan_layers
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed = nnx.Param(_init("normal", (v, d), rngs.params(), param_dtype))
        self.encoder = LayerStack(cfg, len(loop.encoder_layers), rngs=rngs, param_dtype=param_dtype)
        self.reasoning = LayerStack(cfg, len(loop.reasoning_layers), rngs=rngs, param_dtype=param_dtype)
        self.decoder = LayerStack(cfg, len(loop.decoder_layers), rngs=rngs, param_dtype=param_dtype)
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        self.lm_head = nnx.Param(_init("normal", (d, v), rngs.params(), param_dtype))
        # Gate and q head stay float32 (the method computes them in float32).
        self.gate = SelectiveGate(d, rngs=rngs)
        self.q_head = QHead(d, rngs=rngs)

    def options(self, **overrides: Any) -> tuple[RunOptions, float, float]:
        """Static run options and the criterion's two traced parameters, defaults from `self.loop`.

        `halting` names an exit criterion (`loopus_jax.loop.criteria`); `halting_params` (a dict) sets
        its parameters by name. `q_threshold` (threshold, cdf) and `convergence_epsilon` (convergence)
        are the LoopUS rules' thresholds under their own names, defaulting to the loop config's; a rule
        ignores the other one. The two returned numbers are the criterion's parameter values in its
        declared order (0 for an unused slot): pass them on to `__call__`.
        """
        lc = self.loop
        pick = lambda k, default: default if overrides.get(k) is None else overrides[k]
        opts = RunOptions(
            n_recursion=int(pick("n_recursion", lc.n_recursion)),
            halting=pick("halting", lc.halting),
            q_eval_interval=int(pick("q_eval_interval", lc.q_eval_interval)),
            q_source=pick("q_source", lc.q_source),
            remat=pick("remat", lc.remat),
            scan_layers=bool(pick("scan_layers", self.scan_layers)),
        ).check()
        crit = criteria.get(opts.halting)
        legacy = crit.legacy_option
        given = overrides.get("halting_params")
        if given is not None and not isinstance(given, dict):
            raise LoopusError(f"halting_params must be a dict of parameter name -> number, got {type(given).__name__}")
        values = criteria.resolve_params(
            crit, given, None if legacy is None else overrides.get(legacy), None if legacy is None else getattr(lc, legacy)
        )
        return (opts, *criteria.pack(crit, values))

    # Blocks, for training and decoding to reuse.
    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, scan: bool) -> tuple[jax.Array, L.AttnContext]:
        ctx = L.make_context(self.config, attention_mask)
        h = L.run_layers(self.encoder.arrays(), self.embed_tokens(input_ids), ctx, self.config, scan=scan)
        return h, ctx

    def reason(self, h: jax.Array, ctx: L.AttnContext, scan: bool) -> tuple[jax.Array, jax.Array]:
        """One reasoning application: (gated state, pre-gate new state)."""
        h_new = L.run_layers(self.reasoning.arrays(), h, ctx, self.config, scan=scan)
        return gate_apply(self.gate.arrays(), h_new, h), h_new

    def q_logit(self, h_old: jax.Array, h_new: jax.Array, gated: jax.Array, watch: jax.Array, q_source: str) -> jax.Array:
        """[B] q logit by `q_source`; `watch` [B] is the position index each row is judged at."""
        rows = jnp.arange(h_old.shape[0])
        x = (h_new - h_old)[rows, watch] if q_source == "pre_gate_last_valid" else gated[rows, watch]
        return q_head_apply(self.q_head.arrays(), x)

    def decode(self, h: jax.Array, ctx: L.AttnContext, scan: bool, columns: Columns | None = None) -> jax.Array:
        return self.logits(L.run_layers(self.decoder.arrays(), h, ctx, self.config, scan=scan), columns)

    def watched_logits(self, h: jax.Array, ctx: L.AttnContext, watch: jax.Array, scan: bool) -> jax.Array:
        """[B, V] float32: `decode(h, ctx)[rows, watch]`, computing only what that position needs.

        A decoder layer's output at one position attends to every earlier position's keys/values at
        that layer, so all but the last decoder layer run on the whole sequence; the last layer takes
        keys/values of all positions and runs its query, MLP, the final norm and the LM head only at
        `watch` (with one decoder layer, as in the usual split, that is the whole saving).
        """
        from loopus_jax.decode.cache import layer_with  # (decode imports this module)

        cfg, nd = self.config, self.decoder.num_layers
        rows = jnp.arange(h.shape[0])
        layers = self.decoder.arrays()
        if nd > 1:
            h = L.run_layers(jax.tree.map(lambda a: a[:-1], layers), h, ctx, cfg, scan=scan)
        hw = h[rows, watch][:, None]  # [B, 1, D]
        if nd > 0:
            p = jax.tree.map(lambda a: a[-1], layers)
            _, k, v = L.qkv(p, L.rms_norm(h, p["attn_norm"], cfg.rms_norm_eps), ctx, cfg)  # (q unused: not computed)
            at = lambda a: a[rows, watch][:, None]
            one = L.AttnContext(at(ctx.cos), at(ctx.sin), ctx.mask[rows, 0, watch][:, None, None])
            hw, _ = layer_with(p, hw, one, cfg, lambda q, _k, _v: (L.attend(q, k, v, one.mask), None))
        return self.logits(hw)[:, 0].astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        opts: RunOptions,
        param0: jax.Array,
        param1: jax.Array,
        columns: Columns | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits [B,T,V] float32, exit depth [B] int32, q [B,N] float32, NaN after a sample's exit).

        `param0`, `param1`: the halting criterion's parameters as `options()` returns them. `columns`
        (start, stop): logits of those positions only (see `logits`)."""
        h, ctx = self.encode(input_ids, attention_mask, opts.scan_layers)
        b, t = input_ids.shape
        n = opts.n_recursion
        last = L.last_valid_index(attention_mask)
        watch = last if opts.q_source == "pre_gate_last_valid" else jnp.full((b,), t - 1)

        def step(h_old: jax.Array) -> tuple[jax.Array, jax.Array]:
            gated, h_new = self.reason(h_old, ctx, opts.scan_layers)
            return gated, self.q_logit(h_old, h_new, gated, watch, opts.q_source)

        policy = REMAT_POLICIES[opts.remat]
        if opts.remat != "none":
            step = jax.checkpoint(step, policy=policy)

        if opts.halting == "none":
            h, q_logits = jax.lax.scan(lambda c, _: step(c), h, None, length=n)
            q = jax.nn.sigmoid(q_logits).T
            return self.decode(h, ctx, opts.scan_layers, columns), jnp.full((b,), n, jnp.int32), q

        def cond(c):
            i, _, active, *_ = c
            return (i < n) & jnp.any(active)

        def body(c):
            i, h_old, active, exit_depth, q_hist, carry = c
            gated, ql = step(h_old)
            q = jax.nn.sigmoid(ql)
            h_next, halt, carry = H.advance(
                opts.halting,
                (param0, param1),
                i,
                n,
                q,
                h_old,
                gated,
                active,
                watch,
                carry,
                q_eval_interval=opts.q_eval_interval,
                watched_logits=lambda hh: self.watched_logits(hh, ctx, watch, opts.scan_layers),
            )
            q_hist = q_hist.at[:, i].set(jnp.where(active, q, jnp.nan))
            exit_depth = jnp.where(halt, i + 1, exit_depth)
            return i + 1, h_next, active & ~halt, exit_depth, q_hist, carry

        init = (
            jnp.int32(0),
            h,
            jnp.ones((b,), bool),
            jnp.full((b,), n, jnp.int32),
            jnp.full((b, n), jnp.nan, jnp.float32),
            H.init_carry(opts.halting, b, self.config.vocab_size),
        )
        _, h, _, exit_depth, q, _ = jax.lax.while_loop(cond, body, init)
        return self.decode(h, ctx, opts.scan_layers, columns), exit_depth, q


def loop_model(base: Any, encoder: str, decoder: str, *, n_recursion: int = 8, seed: int = 0, **loop_kwargs: Any) -> LoopedLM:
    """A looped model from a base Transformer: its layers sliced into the three blocks, a fresh gate and q head.

    A tied base gets an untied `lm_head` holding a copy of the embedding (the authors' converter
    leaves it random, a defect we do not copy).
    """
    from loopus_jax.loop.spec import split_layers

    cfg: ModelConfig = base.config
    split = split_layers(encoder, decoder, cfg.num_layers)
    lc = LoopConfig(split.encoder, split.reasoning, split.decoder, n_recursion=n_recursion, **loop_kwargs)
    pdt = param_dtype(base)
    model = nnx.eval_shape(lambda: LoopedLM(cfg, lc, param_dtype=pdt, dtype=base.compute_dtype, scan_layers=base.scan_layers))
    rngs = nnx.Rngs(seed)
    model.gate = SelectiveGate(cfg.hidden_size, rngs=rngs)
    model.q_head = QHead(cfg.hidden_size, rngs=rngs)
    model.embed.set_value(base.embed[...])
    model.final_norm.set_value(base.final_norm[...])
    model.lm_head.set_value(base.head_weight())
    for name, ix in (("encoder", split.encoder), ("reasoning", split.reasoning), ("decoder", split.decoder)):
        stack = getattr(model, name)
        for k in stack.names:
            getattr(stack, k).set_value(getattr(base.layers, k)[ix[0] : ix[-1] + 1] if ix else getattr(base.layers, k)[:0])
    return model
