"""HellaSwag validation (rowanz/hellaswag `hellaswag_val.jsonl`), as lm-eval's `hellaswag`: the query is
"{activity_label}: {ctx_a} {ctx_b.capitalize()}" and each ending, all cleaned of WikiHow artifacts."""

from __future__ import annotations

import re
from pathlib import Path

from loopus_jax.eval.tasks.base import MultipleChoice, field, read_jsonl


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoice):
    name = "hellaswag"
    files = ("hellaswag/hellaswag_val.jsonl",)
    layout = (
        "hellaswag/hellaswag_val.jsonl: the rowanz/hellaswag release JSONL, one "
        "{ind, activity_label, ctx_a, ctx_b, ctx, endings, label, ...} per line"
    )

    def load(self, paths: list[Path]) -> list[dict]:
        path, docs = paths[0], []
        for n, row in enumerate(read_jsonl(self, path), 1):
            f = lambda k: field(self, path, row, n, k)  # noqa: B023
            endings = f("endings")
            if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
                raise self.bad(path, f"row {n}", "endings must be a list of strings")
            try:
                gold = int(f("label"))
            except (TypeError, ValueError):
                raise self.bad(path, f"row {n}", f"label {f('label')!r} is not an integer") from None
            query = clean(f("activity_label") + ": " + f("ctx_a") + " " + f("ctx_b").capitalize())
            docs.append({"id": row.get("ind"), "query": query, "choices": [clean(e) for e in endings], "gold": gold})
        return docs
