"""The task registry: lm-eval's task names, each reading its public release files from a data directory."""

from __future__ import annotations

from loopus_jax.errors import LoopusError
from loopus_jax.eval.tasks.arc import ARC_CHALLENGE, ARC_EASY
from loopus_jax.eval.tasks.base import MultipleChoice, Task
from loopus_jax.eval.tasks.hellaswag import HellaSwag
from loopus_jax.eval.tasks.lambada import LambadaOpenAI
from loopus_jax.eval.tasks.mmlu import SUBJECTS, Group, MmluSubject, mmlu_group
from loopus_jax.eval.tasks.openbookqa import OpenBookQA
from loopus_jax.eval.tasks.piqa import Piqa
from loopus_jax.eval.tasks.wikitext import WikiText
from loopus_jax.eval.tasks.winogrande import Winogrande

TASKS: dict[str, Task] = {
    t.name: t for t in (ARC_EASY, ARC_CHALLENGE, HellaSwag(), Piqa(), Winogrande(), OpenBookQA(), LambadaOpenAI(), WikiText())
}
TASK_NAMES = (*TASKS, "mmlu")

__all__ = ["TASKS", "TASK_NAMES", "Group", "MultipleChoice", "Task", "layout_help", "resolve"]


def layout_help() -> str:
    lines = [f"  {t.name}: {t.layout}" for t in TASKS.values()]
    lines.append(
        "  mmlu (or mmlu_<subject>): mmlu/test/<subject>_test.csv for the 57 subjects, no header, question,A,B,C,D,answer"
    )
    return "\n".join(lines)


def resolve(names: str | list[str]) -> list[Task | Group]:
    """Tasks by lm-eval name ("arc_easy,mmlu" or a list); unknown names are an error listing the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise LoopusError(f"no task given; choose from {', '.join(TASK_NAMES)} (or mmlu_<subject>)")
    out: list[Task | Group] = []
    for n in names:
        if n in TASKS:
            out.append(TASKS[n])
        elif n == "mmlu":
            out.append(mmlu_group())
        elif n.startswith("mmlu_") and n[5:] in SUBJECTS:
            out.append(MmluSubject(n[5:]))
        else:
            raise LoopusError(
                f"unknown task {n!r}; known tasks: {', '.join(TASK_NAMES)} and mmlu_<subject> "
                f"(subjects: the 57 file names in mmlu/test/ without _test.csv)"
            )
    seen = [t.name for t in out]
    dup = next((n for n in seen if seen.count(n) > 1), None)
    if dup:
        raise LoopusError(f"task {dup!r} is listed twice")
    return out
