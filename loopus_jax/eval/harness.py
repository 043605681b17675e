"""lm-evaluation-harness adapter: the `loopus` model, backed by the same scorer as `loopus eval tasks`.

    import loopus_jax.eval.harness  # registers "loopus"
    lm_eval.simple_evaluate(model="loopus", model_args="path=ckpt,n_recursion=8,halting=threshold", tasks=[...])

or, from the shell, `loopus-lm-eval --model loopus --model_args path=...,n_recursion=8 --tasks ...` (lm-eval's own
command line with the adapter registered; lm-eval 0.4 has no plugin entry point for models, so its bare
`lm_eval` command cannot see a model it has not imported). Needs the `eval` extra (`pip install loopus-jax[eval]`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from loopus_jax.errors import LoopusError

try:
    # lm-eval fills its model registry lazily, and only while the registry is empty: load its own
    # models first, or registering "loopus" would hide "hf" and the rest from `simple_evaluate`.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise LoopusError("the lm-eval adapter needs lm-evaluation-harness: pip install 'loopus-jax[eval]'") from e

from loopus_jax.eval.requests import Loglikelihood, Rolling
from loopus_jax.eval.scorer import Scorer, length_buckets, mean_exit_depth
from loopus_jax.eval.scoring import greedy_next_tokens
from loopus_jax.progress import progress

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256
GEN_ROWS = 8


def _opt(v: Any, kind: type) -> Any:
    return None if v is None or v == "" else kind(v)


@register_model("loopus")
class LoopusLM(LM):
    """`path` (any checkpoint `loopus_jax.load` reads, or 'default'), the looped options `n_recursion`,
    `halting` (any exit criterion), `q_threshold`, `q_eval_interval`, `convergence_epsilon`, `q_source`,
    the criterion's parameters as `halting_<name>` (e.g. `halting_threshold=5e-4`, `halting_min_p=0.1`),
    and `batch_size` ('auto' or rows per batch), `max_length`, `dtype`, `mesh`."""

    def __init__(
        self,
        path: str = "default",
        n_recursion: int | None = None,
        halting: str | None = None,
        q_threshold: float | None = None,
        q_eval_interval: int | None = None,
        convergence_epsilon: float | None = None,
        q_source: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        mesh: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        **unused: Any,
    ):
        super().__init__()
        import loopus_jax as lj
        from loopus_jax.tokenizer import require_tokenizer

        params = {k[len("halting_") :]: v for k, v in unused.items() if k.startswith("halting_") and v not in (None, "")}
        unused = {k: v for k, v in unused.items() if not k.startswith("halting_")}
        if unused:
            log.info("loopus: ignoring model arguments %s", sorted(unused))
        if model is None:
            src = lj.default_model_path() if path == "default" else path
            model, tokenizer = lj.load(src, dtype=dtype, mesh=mesh)
            tokenizer = require_tokenizer(tokenizer, src)
        bs = None if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        options = {
            "n_recursion": _opt(n_recursion, int),
            "halting": _opt(halting, str),
            "q_threshold": _opt(q_threshold, float),
            "q_eval_interval": _opt(q_eval_interval, int),
            "convergence_epsilon": _opt(convergence_epsilon, float),
            "q_source": _opt(q_source, str),
            "halting_params": params or None,
        }
        self.scorer = Scorer(model, tokenizer, batch_size=bs, max_length=_opt(max_length, int), **options)
        self.tokenizer = tokenizer
        self.exit_depths: list[float] = []  # mean exit depth of each call, for looped models with halting

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "loopus").replace("/", "__")

    def _record(self, scores: list) -> None:
        d = mean_exit_depth(scores)
        if d is not None:
            self.exit_depths.append(d)
            log.info("loopus: mean exit depth %.3f over %d requests", d, len(scores))

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self.scorer.score([Loglikelihood(*r.args[:2]) for r in requests])
        self._record(scores)
        return [(s.loglikelihood, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        scores = self.scorer.score([Rolling(r.args[0]) for r in requests])
        self._record(scores)
        return [s.loglikelihood for s in scores]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        enc, tok = self.scorer.encoder, self.tokenizer
        eos_text = tok.decode([enc.eot_token_id]) if enc.eot_token_id is not None else None
        out: list[str] = []
        for r in progress(requests, desc="generate_until", unit="req"):
            context, kw = r.args[0], dict(r.args[1] or {})
            if kw.pop("do_sample", False) and float(kw.get("temperature", 1.0) or 0) > 0:
                raise LoopusError("the loopus adapter decodes greedily only; use do_sample=False")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = enc.encode(context)[-max(1, self.scorer.max_length - max_new) :]
            # The one generation call site: switch to `loopus_jax.generate` (cached decoding) when it exists.
            tokens = generate_greedy_nocache(self.scorer, prompt, max_new, lambda t, u=until: any(s in tok.decode(t) for s in u))
            text = tok.decode(tokens)
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def generate_greedy_nocache(scorer: Scorer, prompt: list[int], max_new: int, stop: Any) -> list[int]:
    """Greedy decoding without a KV cache: one jitted full forward per new token over a right-padded
    buffer whose width is a length bucket (compiled once per bucket); stops when `stop(tokens)` or at
    the EOS token or after `max_new` tokens."""
    if not prompt:
        prompt = [scorer.encoder.prefix_token_id]
    width = next(b for b in length_buckets(scorer.max_length) if b >= min(scorer.max_length, len(prompt) + max_new))
    ids = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, : len(prompt)], mask[0, : len(prompt)] = prompt, 1
    n, new = len(prompt), []
    eos = scorer.encoder.eot_token_id
    while len(new) < max_new and n < width:
        t = int(greedy_next_tokens(scorer.model, ids, mask, [n - 1], **scorer.options)[0])
        new.append(t)
        if t == eos or stop(new):
            break
        ids[0, n], mask[0, n] = t, 1
        n += 1
    return new


def cli() -> None:
    """`loopus-lm-eval`: lm-eval's command line with the `loopus` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
