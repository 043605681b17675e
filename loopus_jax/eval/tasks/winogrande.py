"""WinoGrande xl dev (`dev.jsonl`), as lm-eval's `winogrande` (partial evaluation): each option fills
the blank to make a context, and both contexts score the same continuation, the text after the blank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loopus_jax.eval.requests import Loglikelihood, Request
from loopus_jax.eval.scorer import Score
from loopus_jax.eval.tasks.base import Task, field, read_jsonl


class Winogrande(Task):
    name = "winogrande"
    files = ("winogrande/dev.jsonl",)
    layout = (
        "winogrande/dev.jsonl: the WinoGrande 1.1 release JSONL, "
        "one {qID, sentence (with one '_'), option1, option2, answer ('1'/'2')} per line"
    )
    metrics = ("acc",)

    def load(self, paths: list[Path]) -> list[dict]:
        path, docs = paths[0], []
        for n, row in enumerate(read_jsonl(self, path), 1):
            sentence, answer = field(self, path, row, n, "sentence"), str(field(self, path, row, n, "answer"))
            if "_" not in sentence:
                raise self.bad(path, f"row {n}", "sentence has no blank '_'")
            if answer not in ("1", "2"):
                raise self.bad(path, f"row {n}", f"answer {answer!r} is not '1' or '2'")
            i = sentence.index("_")
            options = [field(self, path, row, n, "option1"), field(self, path, row, n, "option2")]
            docs.append(
                {
                    "id": row.get("qID"),
                    "contexts": [sentence[:i] + o for o in options],
                    "continuation": " " + sentence[i + 1 :].strip(),
                    "gold": int(answer) - 1,
                }
            )
        return docs

    def requests(self, doc: dict) -> list[Request]:
        return [Loglikelihood(c, doc["continuation"]) for c in doc["contexts"]]

    def process(self, doc: dict, scores: list[Score]) -> dict[str, Any]:
        return {"acc": float(np.argmax([s.loglikelihood for s in scores]) == doc["gold"])}
