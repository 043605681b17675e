"""`generate`: jitted prefill, then the whole generation inside one `lax.while_loop`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from loopus_jax.api import check_batch
from loopus_jax.decode import engine as E
from loopus_jax.decode import speculative as S
from loopus_jax.decode.sampling import Sampler, sample
from loopus_jax.errors import LoopusError

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerateOutput:
    """Host arrays. `tokens` [B, new] (pad after a row's stop token), `exit_depth` [B, new] (see
    `generate`), `lengths` [B] (tokens each row produced, its stop token included), `timings` (seconds,
    tokens/s), `logits` [B, new, V] float32 (the raw logits each token was chosen from) when asked for."""

    tokens: np.ndarray
    exit_depth: np.ndarray
    lengths: np.ndarray
    timings: dict
    logits: np.ndarray | None = None

    @property
    def mean_exit_depth(self) -> float:
        """Mean exit depth over the tokens actually produced."""
        real = np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]
        return float(self.exit_depth[real].mean()) if real.any() else 0.0


@struct.dataclass
class Dynamic:
    """Traced per-call values (changing them does not recompile)."""

    thr: E.Thresholds
    temperature: jax.Array
    top_p: jax.Array
    key: jax.Array
    stop: jax.Array  # [K] int32, -1 = unused
    pad: jax.Array


@struct.dataclass
class Buffers:
    tokens: jax.Array  # [B, max_new] int32
    exit_depth: jax.Array  # [B, max_new] int32
    logits: jax.Array | None  # [B, max_new, V] float32
    done: jax.Array  # [B] bool: the row has produced a stop token
    lengths: jax.Array  # [B] int32
    t: jax.Array  # tokens produced so far (every row's column count)
    speculation: jax.Array  # [3] int32: speculative rounds, tokens drafted, drafts kept


def bucket(n: int) -> int:
    """Prompt length bucket: the next power of two, at least MIN_BUCKET (a handful of shapes cover all prompts)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _choose(logits: jax.Array, t: jax.Array, plan: E.Plan, dyn: Dynamic) -> jax.Array:
    return sample(logits, jax.random.fold_in(dyn.key, t), plan.sampler, dyn.temperature, dyn.top_p)


def _is_stop(tok: jax.Array, stop: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop[None, :], axis=-1)


def _prefill(graphdef: Any, plan: E.Plan, state: Any, ids: jax.Array, mask: jax.Array, dyn: Dynamic):
    model = nnx.merge(graphdef, state)
    fn = E.prefill_cached if plan.cache else E.prefill_window
    dstate, logits, exit_depth = fn(model, plan, ids, mask, dyn.thr)
    tok = _choose(logits, jnp.int32(0), plan, dyn)
    b, width = ids.shape[0], plan.max_new + plan.spare_slots  # a speculative round may write past max_new
    tokens = jnp.full((b, width), dyn.pad, jnp.int32).at[:, 0].set(tok)
    exits = jnp.zeros((b, width), jnp.int32).at[:, 0].set(exit_depth)
    all_logits = None
    if plan.return_logits:
        all_logits = jnp.zeros((b, width, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    done, lengths = _is_stop(tok, dyn.stop), jnp.ones((b,), jnp.int32)
    return dstate, Buffers(tokens, exits, all_logits, done, lengths, jnp.int32(1), jnp.zeros((3,), jnp.int32))


def _loop(graphdef: Any, plan: E.Plan, state: Any, dstate: Any, buf: Buffers, dyn: Dynamic) -> tuple[Any, Buffers]:
    """Steps until every row is done or max_new tokens; returns the caches too so they alias the donated inputs."""
    model = nnx.merge(graphdef, state)
    step = E.step_cached if plan.cache else E.step_window
    weights = E.block_weights(model, plan) if plan.cache else None

    def cond(c):
        _, buf = c
        return (buf.t < plan.max_new) & ~jnp.all(buf.done)

    def body(c):
        dstate, buf = c
        if plan.speculative is not None:
            return S.run_round(model, plan, weights, dstate, buf, dyn)
        t, done = buf.t, buf.done
        prev = jax.lax.dynamic_index_in_dim(buf.tokens, t - 1, 1, keepdims=False)
        dstate, logits, exit_depth = step(model, plan, weights, dstate, prev, t, ~done, dyn.thr)
        tok = jnp.where(done, dyn.pad, _choose(logits, t, plan, dyn))
        col = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x[:, None], t, axis=1)
        new = Buffers(
            col(buf.tokens, tok),
            col(buf.exit_depth, jnp.where(done, 0, exit_depth)),
            None if buf.logits is None else col(buf.logits, logits),
            done | _is_stop(tok, dyn.stop),
            buf.lengths + (~done).astype(jnp.int32),
            t + 1,
            buf.speculation,
        )
        return dstate, new

    return jax.lax.while_loop(cond, body, (dstate, buf))


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1))
_loop_jit = jax.jit(_loop, static_argnums=(0, 1), donate_argnums=(3, 4))
_EXECUTABLES: dict = {}


def _compiled(jitted, graphdef: Any, plan: E.Plan, *args: Any) -> tuple[Any, float]:
    """The executable for these static options and argument shapes, compiled once; (exe, compile seconds now)."""
    shapes = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(args))
    key = (id(jitted), graphdef, plan, jax.tree.structure(args), shapes)
    if key in _EXECUTABLES:
        return _EXECUTABLES[key], 0.0
    t = time.perf_counter()
    exe = jitted.lower(graphdef, plan, *args).compile()
    _EXECUTABLES[key] = exe
    return exe, time.perf_counter() - t


def _left_pad(ids: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's real tokens (mask 1, in order) right-aligned in `width` columns; also the real lengths."""
    out, m = np.zeros((ids.shape[0], width), np.int32), np.zeros((ids.shape[0], width), np.int32)
    n = mask.astype(bool).sum(axis=1)
    for b in range(ids.shape[0]):
        out[b, width - n[b] :] = ids[b][mask[b].astype(bool)]
        m[b, width - n[b] :] = 1
    return out, m, n


def _stop_array(model: Any, stop_tokens: Any) -> np.ndarray:
    if stop_tokens is None:
        eos = model.config.eos_token_id
        stop_tokens = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop = [int(s) for s in stop_tokens]
    vocab = model.config.vocab_size
    bad = [s for s in stop if not 0 <= s < vocab]
    if bad:
        raise LoopusError(f"stop_tokens {bad} lie outside the vocabulary [0, {vocab})")
    k = max(4, -(-len(stop) // 4) * 4)  # a few fixed sizes, so the count rarely recompiles
    return np.asarray(stop + [-1] * (k - len(stop)), np.int32)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> Sampler:
    if not temperature >= 0:
        raise LoopusError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise LoopusError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LoopusError(f"top_p must lie in (0, 1] or be None, got {top_p}")
    return Sampler(
        greedy=temperature == 0,
        top_k=None if temperature == 0 or top_k is None else int(top_k),
        top_p=temperature > 0 and top_p is not None,
    )


def _check_speculative(model: Any, spec: Any, n_recursion: int | None, halting: str | None, cache: bool) -> tuple[int, int]:
    """(draft_depth, draft_tokens) from the `speculative` option, or a LoopusError that says what is wrong."""
    from loopus_jax.loop.model import LoopedLM

    if not isinstance(model, LoopedLM):
        raise LoopusError("speculative decoding drafts at a shallow loop depth: it needs a looped model (loopus_jax.loop_model)")
    if not isinstance(spec, dict) or set(spec) != {"draft_depth", "draft_tokens"}:
        raise LoopusError(f'speculative must be a dict {{"draft_depth": d, "draft_tokens": k}}, got {spec!r}')
    if not cache:
        raise LoopusError("speculative decoding works on the KV caches; drop cache=False")
    if halting not in (None, "none"):
        raise LoopusError(f"speculative decoding verifies every token at full depth N; halting {halting!r} does not apply")
    n = n_recursion if n_recursion is not None else model.loop.n_recursion
    d, k = spec["draft_depth"], spec["draft_tokens"]
    if not isinstance(d, int) or not 1 <= d <= n:
        raise LoopusError(f"speculative draft_depth must be an integer in [1, n_recursion={n}], got {d!r}")
    if not isinstance(k, int) or k < 1:
        raise LoopusError(f"speculative draft_tokens must be a positive integer, got {k!r}")
    return d, k


def generate(
    model: nnx.Module,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    n_recursion: int | None = None,
    halting: str | None = None,
    q_threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Any = None,
    cache: bool = True,
    cache_fill: str = "latest",
    cache_dtype: Any = None,
    pad_token_id: int | None = None,
    scan_layers: bool | None = None,
    return_logits: bool = False,
    speculative: dict | None = None,
    **loop_options: Any,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per row for a base or looped model.

    Prompts: `input_ids` [B, T] (or [T]); `attention_mask` marks the real tokens (any padding; rows are
    re-packed left-padded into a length bucket, the next power of two >= 16, so few shapes compile).
    The prompt plus `max_new_tokens` must fit the model's context (`max_position_embeddings`).

    Prefill: one jitted call runs the prompt batch through every block and fills preallocated caches
    (encoder, one per loop depth for the reasoning block, decoder; P + max_new_tokens slots, dtype
    `cache_dtype`, default the model's compute dtype). Generation: one compiled `lax.while_loop` runs
    until every row has produced a stop token or `max_new_tokens`; a finished row emits the pad token
    (`pad_token_id`, else the config's, else 0). `stop_tokens` None means the config's EOS; [] none.

    Looped models: `n_recursion`, `halting` (an exit criterion: "none", LoopUS's "threshold", "cdf",
    "convergence" or Huginn's "entropy-diff", "latent-diff", "kl", "minp-kl", "argmax-stability",
    "cosine"; see `loopus_jax.loop.criteria`), `q_threshold` and `loop_options` (`halting_params` (dict),
    `q_eval_interval`, `convergence_epsilon`, `q_source`) default to the model's loop config. The prompt
    runs with the same rule as `forward` (per sample, judged at its last token, every prompt position
    takes that depth); each generated token runs encoder -> depth loop (depth i reads and writes the
    depth-i cache; q from the new token; per-sample halting; criteria on logits run the decoder on the
    new token against the decoder cache at each depth) -> decoder -> sampling.
    A position that exits at depth k has no keys/values at depths k+1..N: `cache_fill="latest"` writes
    its depth-k keys/values into every deeper depth's cache (later tokens see its latest state there);
    `"skip"` hides it at the depths it did not reach. `cache=False` recomputes the whole prefix every
    step with `forward` (every position then runs at the depth decided for the newest token).

    `exit_depth[b, t]` is the depth of the pass that produced token t: the prompt's depth for t = 0,
    the depth at which generated token t - 1 exited for t > 0 (0 for base models and after a stop).
    Sampling: temperature 0 is greedy; otherwise temperature, then `top_k`, then `top_p`, with
    `jax.random.key(seed)` folded with the token index (reproducible for a fixed seed and batch).
    `scan_layers` (cached path): the layer loop as a `lax.scan` (small compile) or unrolled (default on
    CPU, where a scanned layer's weights are copied out of the stack at every step: 2x slower decoding).

    `speculative={"draft_depth": d, "draft_tokens": k}` (looped models, cached, no halting): each round
    drafts k tokens at depth d with the model's own caches and verifies them at depth N in one pass
    (see `loopus_jax.decode.speculative`): greedy output is exactly plain decoding's, sampled output
    follows the same distribution. `timings` then also reports rounds, drafted and accepted tokens and
    the acceptance rate; `exit_depth` is N for every token (each is verified at full depth).
    """
    from loopus_jax.loop.model import LoopedLM
    from loopus_jax.models.transformer import Transformer

    if speculative is not None:
        spec = _check_speculative(model, speculative, n_recursion, halting, cache)
        halting = "none"
    if isinstance(model, LoopedLM):
        run, p0, p1 = model.options(n_recursion=n_recursion, halting=halting, q_threshold=q_threshold, **loop_options)
    elif isinstance(model, Transformer):
        given = dict(n_recursion=n_recursion, halting=halting, q_threshold=q_threshold, **loop_options)
        given = sorted(k for k, v in given.items() if v is not None)
        if given:
            raise LoopusError(f"option(s) {given} apply to looped models only; this is a base {model.config.architecture}")
        run, p0, p1 = None, 0.0, 0.0
    else:
        raise LoopusError(f"generate() got a {type(model).__name__}; expected a model from loopus_jax.load")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise LoopusError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    max_new_tokens = int(max_new_tokens)
    if cache_fill not in E.FILL_RULES:
        raise LoopusError(f"unknown cache_fill {cache_fill!r}; expected one of {', '.join(E.FILL_RULES)}")
    sampler = _check_sampling(float(temperature), top_k, top_p)
    ids, mask = check_batch(model, input_ids, attention_mask)
    n_real = mask.astype(bool).sum(axis=1)
    if ids.shape[0] == 0 or n_real.min() == 0:
        raise LoopusError("every prompt needs at least one real token (attention_mask 1); got an empty row")
    ctx_len = model.config.max_position_embeddings
    if n_real.max() + max_new_tokens > ctx_len:
        raise LoopusError(
            f"prompt of {n_real.max()} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of {ctx_len} "
            "tokens; shorten the prompt or lower max_new_tokens"
        )
    try:
        cdt = jnp.dtype(cache_dtype or model.compute_dtype).name
    except TypeError:
        raise LoopusError(f"unsupported cache_dtype {cache_dtype!r}; expected float32 or bfloat16") from None
    scan = jax.default_backend() != "cpu" if scan_layers is None else bool(scan_layers)
    plan = E.Plan(run, bool(cache), scan, cache_fill, cdt, max_new_tokens, sampler, bool(return_logits))
    if speculative is not None:
        plan = dataclasses.replace(plan, speculative=spec)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id or 0
    dyn = Dynamic(
        E.Thresholds(jnp.float32(p0), jnp.float32(p1)),
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        jax.random.key(seed),
        jnp.asarray(_stop_array(model, stop_tokens)),
        jnp.int32(pad),
    )
    p_ids, p_mask, _ = _left_pad(ids, mask, bucket(int(n_real.max())))
    p_ids, p_mask = jnp.asarray(p_ids), jnp.asarray(p_mask)
    graphdef, state = nnx.split(model)

    prefill, c1 = _compiled(_prefill_jit, graphdef, plan, state, p_ids, p_mask, dyn)
    t0 = time.perf_counter()
    dstate, buf = jax.block_until_ready(prefill(state, p_ids, p_mask, dyn))
    t1 = time.perf_counter()
    loop, c2 = _compiled(_loop_jit, graphdef, plan, state, dstate, buf, dyn)
    t2 = time.perf_counter()
    _, buf = jax.block_until_ready(loop(state, dstate, buf, dyn))
    t3 = time.perf_counter()

    lengths = np.asarray(buf.lengths)
    new = int(lengths.max())
    produced = int(lengths.sum())
    timings = {
        "prefill_s": t1 - t0,
        "decode_s": t3 - t2,
        "compile_s": c1 + c2,
        "new_tokens": produced,
        "tokens_per_s": produced / max(t1 - t0 + t3 - t2, 1e-9),
        "prompt_bucket": int(p_ids.shape[1]),
    }
    if speculative is not None:
        rounds, drafted, kept = (int(x) for x in np.asarray(buf.speculation))
        timings.update(rounds=rounds, drafted=drafted, accepted=kept, acceptance_rate=kept / max(drafted, 1))
    return GenerateOutput(
        tokens=np.asarray(buf.tokens)[:, :new],
        exit_depth=np.asarray(buf.exit_depth)[:, :new],
        lengths=lengths,
        timings=timings,
        logits=None if buf.logits is None else np.asarray(buf.logits)[:, :new],
    )
