"""What a task is: documents read from a data directory, the requests each document makes, the
per-document metrics computed from their scores, and the aggregation over documents."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from loopus_jax.errors import LoopusError
from loopus_jax.eval import metrics as M
from loopus_jax.eval.requests import Loglikelihood, Request
from loopus_jax.eval.scorer import Score


class Task:
    """One task. Subclasses set `name`, `files` (paths under the data directory) and `layout` (the
    release format, for error messages), and implement `load`, `requests` and `process`."""

    name: str = ""
    files: tuple[str, ...] = ()
    layout: str = ""
    metrics: tuple[str, ...] = ()

    def paths(self, data_dir: Path) -> list[Path]:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise LoopusError(f"data directory {data_dir} does not exist or is not a directory")
        paths = [data_dir / f for f in self.files]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise LoopusError(f"task {self.name}: {missing[0]} not found; expected {self.layout}")
        return paths

    def docs(self, data_dir: Path, limit: int | None = None) -> list[dict]:
        docs = self.load(self.paths(data_dir))
        return docs if limit is None else docs[:limit]

    def load(self, paths: list[Path]) -> list[dict]:
        raise NotImplementedError

    def requests(self, doc: dict) -> list[Request]:
        raise NotImplementedError

    def process(self, doc: dict, scores: list[Score]) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, per_doc: list[dict[str, Any]], bootstrap_iters: int) -> dict[str, float | None]:
        """Mean and sample stderr of each metric (the default: accuracies)."""
        out: dict[str, float | None] = {}
        for m in self.metrics:
            xs = [d[m] for d in per_doc]
            out[m], out[f"{m}_stderr"] = M.mean(xs), M.mean_stderr(xs)
        return out

    def bad(self, path: Path, where: str, why: str) -> LoopusError:
        return LoopusError(f"task {self.name}: {path} {where}: {why}; expected {self.layout}")


class MultipleChoice(Task):
    """Context + " " + each choice; acc = argmax ll, acc_norm = argmax ll / len(choice) in characters.

    Subclasses' `load` returns docs with `query`, `choices` and `gold`.
    """

    metrics = ("acc", "acc_norm")
    target_delimiter = " "

    def requests(self, doc: dict) -> list[Request]:
        return [Loglikelihood(doc["query"], self.target_delimiter + c) for c in doc["choices"]]

    def process(self, doc: dict, scores: list[Score]) -> dict[str, Any]:
        lls = np.array([s.loglikelihood for s in scores])
        lens = np.array([float(len(c)) for c in doc["choices"]])
        out = {"acc": float(np.argmax(lls) == doc["gold"])}
        if "acc_norm" in self.metrics:
            out["acc_norm"] = float(np.argmax(lls / lens) == doc["gold"])
        return out


def read_jsonl(task: Task, path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise task.bad(path, f"line {n}", "not a JSON object")
                    rows.append(row)
    except json.JSONDecodeError as e:
        raise task.bad(path, f"line {n}", f"not JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise task.bad(path, "", "not UTF-8") from None
    if not rows:
        raise task.bad(path, "", "no rows")
    return rows


def read_lines(task: Task, path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise task.bad(path, "", "not UTF-8") from None


def read_csv(task: Task, path: Path, columns: int) -> list[list[str]]:
    """Every field as text (so "0.50" or "None" stay strings), no header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise task.bad(path, "", f"not a UTF-8 CSV ({e})") from None
    for n, r in enumerate(rows, 1):
        if len(r) != columns:
            raise task.bad(path, f"row {n}", f"{len(r)} columns, not {columns}")
    if not rows:
        raise task.bad(path, "", "no rows")
    return rows


def field(task: Task, path: Path, row: dict, n: int, *keys: str) -> Any:
    """row[k1][k2]...; a missing or wrongly typed field is an error naming the row and the layout."""
    v: Any = row
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            raise task.bad(path, f"row {n}", f"no field {'.'.join(keys)!r}")
        v = v[k]
    return v
