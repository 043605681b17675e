"""LAMBADA (OpenAI's detokenised test JSONL), as lm-eval's `lambada_openai`: the target is " " + the last
space-separated word; acc = every target token greedy, perplexity = exp(-mean ll) with a bootstrap stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopus_jax.eval import metrics as M
from loopus_jax.eval.requests import Loglikelihood, Request
from loopus_jax.eval.scorer import Score
from loopus_jax.eval.tasks.base import Task, field, read_jsonl


class LambadaOpenAI(Task):
    name = "lambada_openai"
    files = ("lambada_openai/lambada_test.jsonl",)
    layout = "lambada_openai/lambada_test.jsonl: OpenAI's LAMBADA test JSONL, one {text} per line"
    metrics = ("perplexity", "acc")

    def load(self, paths: list[Path]) -> list[dict]:
        path, docs = paths[0], []
        for n, row in enumerate(read_jsonl(self, path), 1):
            text = field(self, path, row, n, "text")
            if not isinstance(text, str) or " " not in text:
                raise self.bad(path, f"row {n}", "text must be a string of several words")
            words = text.split(" ")
            docs.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
        return docs

    def requests(self, doc: dict) -> list[Request]:
        return [Loglikelihood(doc["context"], doc["target"])]

    def process(self, doc: dict, scores: list[Score]) -> dict[str, Any]:
        return {"perplexity": scores[0].loglikelihood, "acc": int(scores[0].is_greedy)}

    def aggregate(self, per_doc: list[dict[str, Any]], bootstrap_iters: int) -> dict[str, float | None]:
        lls, acc = [d["perplexity"] for d in per_doc], [d["acc"] for d in per_doc]
        return {
            "perplexity": M.perplexity(lls),
            "perplexity_stderr": M.bootstrap_perplexity_stderr(lls, bootstrap_iters),
            "acc": M.mean(acc),
            "acc_stderr": M.mean_stderr(acc),
        }
