"""`loopus generate`: text continuation from the command line, a thin wrapper over `loopus_jax.generate`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from loopus_jax.errors import LoopusError

GENERATE_HELP = """Continue one prompt (--prompt) or every non-empty line of a UTF-8 file (--prompts-file).

Prompts run in jitted batches (--batch-size, left-padded into power-of-two length buckets) with KV caches
(one per loop depth for a looped model), or recomputing the whole prefix every token with --no-cache.
Prints each continuation; --json prints {"results": [{"prompt", "text", "tokens", "exit_depths"}],
"tokens_per_s", "mean_exit_depth", ...} instead, where exit_depths[t] is the loop depth of the pass
that produced token t (0 for base models).

Self-speculative decoding (looped models): --draft-depth D --draft-tokens K drafts K tokens per round at
loop depth D with the model's own caches and verifies them at depth N in one pass: greedy output equals
plain decoding's exactly, sampled output follows the same distribution; --json adds acceptance_rate."""


def register(sub: Any) -> None:
    """Add the `generate` subcommand to the `loopus` parser's subparsers."""
    from loopus_jax.loop.criteria import add_cli_flags

    g = sub.add_parser(
        "generate",
        help="generate text with a base or looped model",
        description=GENERATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--model", required=True, help="a checkpoint directory or .gguf file ('default': the embedded SmolLM2)")
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompts-file", help="UTF-8 file, one prompt per non-empty line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template as a user turn")
    g.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per prompt (at most)")
    g.add_argument("--n-recursion", type=int, help="loop depth N (looped models; default: the checkpoint's)")
    add_cli_flags(g)
    g.add_argument("--cache-fill", default="latest", help="what deeper depths see of an early exit: latest (default) or skip")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole prefix for every token")
    g.add_argument("--draft-depth", type=int, help="self-speculative decoding: draft at this loop depth (with --draft-tokens)")
    g.add_argument("--draft-tokens", type=int, help="self-speculative decoding: tokens drafted per round (with --draft-depth)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per jitted batch (default 8)")
    g.add_argument("--json", action="store_true", help="print tokens, exit depths, tokens/s and mean exit depth as JSON")
    g.set_defaults(fn=cmd_generate)


def _prompts(a: argparse.Namespace) -> list[str]:
    from loopus_jax.cli import read_text_file

    if (a.prompt is None) == (a.prompts_file is None):
        raise LoopusError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if a.prompt is not None:
        if not a.prompt.strip():
            raise LoopusError("--prompt is empty; give some text")
        return [a.prompt]
    prompts = [line for line in read_text_file(a.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise LoopusError(f"prompts file {a.prompts_file} has no non-empty line")
    return prompts


def cmd_generate(a: argparse.Namespace) -> None:
    import loopus_jax as lj
    from loopus_jax.cli import _resolve
    from loopus_jax.decode.texts import generate_texts
    from loopus_jax.loop.criteria import params_from_flags
    from loopus_jax.tokenizer import require_tokenizer

    prompts = _prompts(a)
    if a.batch_size < 1:
        raise LoopusError(f"--batch-size must be >= 1, got {a.batch_size}")
    path = _resolve(a.model)
    model, tok = lj.load(path)
    tok = require_tokenizer(tok, path)
    looped = getattr(model, "loop", None) is not None
    params = params_from_flags(a.halting_threshold, a.halting_param)
    opts = dict(n_recursion=a.n_recursion, halting=a.halting, q_threshold=a.q_threshold, halting_params=params) if looped else {}
    if not looped and any(v is not None for v in (a.n_recursion, a.halting, a.q_threshold, params)):
        raise LoopusError(
            "--n-recursion, --halting, --q-threshold and --halting-* apply to looped models; this checkpoint is a base model"
        )
    if (a.draft_depth is None) != (a.draft_tokens is None):
        raise LoopusError("self-speculative decoding needs both --draft-depth D and --draft-tokens K")
    if a.draft_depth is not None:
        opts["speculative"] = {"draft_depth": a.draft_depth, "draft_tokens": a.draft_tokens}
    results, summary = generate_texts(
        model,
        tok,
        prompts,
        chat=a.chat,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        cache=not a.no_cache,
        cache_fill=a.cache_fill,
        **opts,
    )
    if a.json:
        print(json.dumps({"results": results, **{k: v for k, v in summary.items() if k != "seconds"}}))
        return
    for i, r in enumerate(results):
        if len(results) > 1:
            print(f"--- {i + 1}: {r['prompt']}")
        print(r["text"])
