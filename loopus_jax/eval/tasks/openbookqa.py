"""OpenBookQA main test (release JSONL), as lm-eval's `openbookqa`: the prompt is the bare question stem."""

from __future__ import annotations

from pathlib import Path

from loopus_jax.eval.tasks.arc import mc_question_docs
from loopus_jax.eval.tasks.base import MultipleChoice


class OpenBookQA(MultipleChoice):
    name = "openbookqa"
    files = ("openbookqa/test.jsonl",)
    layout = (
        "openbookqa/test.jsonl: the OpenBookQA Main release JSONL, "
        "one {id, question: {stem, choices: [{text, label}]}, answerKey} per line"
    )

    def load(self, paths: list[Path]) -> list[dict]:
        return mc_question_docs(self, paths[0], "{}")
