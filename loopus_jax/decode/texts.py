"""Text in, text out: prompts encoded (optionally through the chat template), batched left-padded
through `generate`, and decoded with each token's exit depth. `loopus generate` and the demo use it."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from loopus_jax.errors import LoopusError


def encode(tokenizer: Any, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt; with `chat`, the prompt as a user turn of the chat template plus the generation prompt."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LoopusError("this tokenizer has no chat template; drop --chat")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


def stop_tokens(model: nnx.Module, tokenizer: Any) -> list[int]:
    """The config's EOS id(s) and the tokenizer's."""
    eos = model.config.eos_token_id
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return sorted(stops)


def pad_id(model: nnx.Module, tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.config.pad_token_id or 0)


def generate_texts(
    model: nnx.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    chat: bool = False,
    batch_size: int = 8,
    **generate_kw: Any,
) -> tuple[list[dict], dict]:
    """Generate for every prompt; returns (per prompt {prompt, text, tokens, exit_depths}, summary).

    `generate_kw` goes to `loopus_jax.generate` (max_new_tokens, sampling, looped options, cache
    settings). The summary holds new_tokens, seconds (prefill + decode, compile excluded as `generate`
    reports them), tokens_per_s and mean_exit_depth over the generated tokens (and acceptance_rate,
    the share of speculative drafts kept, with `speculative`).
    """
    from loopus_jax.decode.generation import generate
    from loopus_jax.progress import progress

    if batch_size < 1:
        raise LoopusError(f"batch size must be >= 1, got {batch_size}")
    encoded = encode(tokenizer, prompts, chat)
    if any(len(e) == 0 for e in encoded):
        raise LoopusError("a prompt encodes to no tokens; give some text")
    pad = pad_id(model, tokenizer)
    generate_kw.setdefault("stop_tokens", stop_tokens(model, tokenizer))
    results, seconds, produced = [], 0.0, 0
    drafted = accepted = 0
    starts = range(0, len(encoded), batch_size)
    for s in progress(starts, "generate", total=len(starts), unit="batch"):
        rows = encoded[s : s + batch_size]
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        out = generate(model, ids, mask, pad_token_id=pad, **generate_kw)
        seconds += out.timings["prefill_s"] + out.timings["decode_s"]
        produced += out.timings["new_tokens"]
        drafted, accepted = drafted + out.timings.get("drafted", 0), accepted + out.timings.get("accepted", 0)
        for i, prompt in enumerate(prompts[s : s + batch_size]):
            n = int(out.lengths[i])
            toks = out.tokens[i, :n].tolist()
            text = tokenizer.decode(toks, skip_special_tokens=True)
            results.append({"prompt": prompt, "text": text, "tokens": toks, "exit_depths": out.exit_depth[i, :n].tolist()})
    depths = [d for r in results for d in r["exit_depths"]]
    summary = {
        "new_tokens": produced,
        "seconds": seconds,
        "tokens_per_s": produced / max(seconds, 1e-9),
        "mean_exit_depth": float(np.mean(depths)) if depths else 0.0,
    }
    if generate_kw.get("speculative") is not None:
        summary["acceptance_rate"] = accepted / max(drafted, 1)
    return results, summary
