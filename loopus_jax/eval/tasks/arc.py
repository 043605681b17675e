"""ARC-Easy / ARC-Challenge (AI2 release JSONL), as lm-eval's `arc_easy` / `arc_challenge`:
"Question: {stem}\nAnswer:", choices the choice texts, gold the index of `answerKey` among the labels."""

from __future__ import annotations

from pathlib import Path

from loopus_jax.eval.tasks.base import MultipleChoice, field, read_jsonl


def mc_question_docs(task: MultipleChoice, path: Path, prompt: str) -> list[dict]:
    """ARC and OpenBookQA share the release format: question.stem, question.choices[{text, label}], answerKey."""
    docs = []
    for n, row in enumerate(read_jsonl(task, path), 1):
        stem = field(task, path, row, n, "question", "stem")
        choices = field(task, path, row, n, "question", "choices")
        key = str(field(task, path, row, n, "answerKey")).lstrip()
        try:
            texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        except (TypeError, KeyError):
            raise task.bad(path, f"row {n}", "question.choices must be a list of {text, label}") from None
        if key not in labels:
            raise task.bad(path, f"row {n}", f"answerKey {key!r} is not one of the labels {labels}")
        docs.append({"id": row.get("id"), "query": prompt.format(stem), "choices": texts, "gold": labels.index(key)})
    return docs


class Arc(MultipleChoice):
    def __init__(self, name: str, folder: str, file: str):
        self.name, self.files = name, (f"{folder}/{file}",)
        self.layout = (
            f"{folder}/{file}: the AI2 ARC release JSONL, "
            "one {id, question: {stem, choices: [{text, label}]}, answerKey} per line"
        )

    def load(self, paths: list[Path]) -> list[dict]:
        return mc_question_docs(self, paths[0], "Question: {}\nAnswer:")


ARC_EASY = Arc("arc_easy", "arc_easy", "ARC-Easy-Test.jsonl")
ARC_CHALLENGE = Arc("arc_challenge", "arc_challenge", "ARC-Challenge-Test.jsonl")
