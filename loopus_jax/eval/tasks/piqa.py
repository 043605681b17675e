"""PIQA validation (`valid.jsonl` + `valid-labels.lst`), as lm-eval's `piqa`: "Question: {goal}\nAnswer:"
with the two solutions; line i of the labels file is row i's gold (0: sol1, 1: sol2)."""

from __future__ import annotations

from pathlib import Path

from loopus_jax.eval.tasks.base import MultipleChoice, field, read_jsonl, read_lines


class Piqa(MultipleChoice):
    name = "piqa"
    files = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    layout = "piqa/valid.jsonl (one {goal, sol1, sol2} per line) and piqa/valid-labels.lst (one 0/1 label per line, same order)"

    def load(self, paths: list[Path]) -> list[dict]:
        rows, labels = read_jsonl(self, paths[0]), read_lines(self, paths[1])
        if len(rows) != len(labels):
            raise self.bad(paths[1], "", f"{len(labels)} labels for {len(rows)} rows of {paths[0].name}")
        docs = []
        for n, (row, label) in enumerate(zip(rows, labels), 1):
            if label not in ("0", "1"):
                raise self.bad(paths[1], f"line {n}", f"label {label!r} is not 0 or 1")
            goal, sol1, sol2 = (field(self, paths[0], row, n, k) for k in ("goal", "sol1", "sol2"))
            sols = [sol1, sol2]
            docs.append({"query": f"Question: {goal}\nAnswer:", "choices": sols, "gold": int(label)})
        return docs
