"""MMLU test (hendrycks `data/test/<subject>_test.csv`), as lm-eval's `mmlu` (zero-shot, default variant):
per subject, "The following are multiple choice questions (with answers) about {subject words}.\n\n"
then "{question.strip()}\nA. ...\nB. ...\nC. ...\nD. ...\nAnswer:", choices " A".." D", acc only.
`mmlu` and its four categories are size-weighted means over subjects with the pooled stderr."""

from __future__ import annotations

from pathlib import Path

from loopus_jax.eval import metrics as M
from loopus_jax.eval.tasks.base import MultipleChoice, read_csv

CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
}  # fmt: skip
SUBJECTS = tuple(sorted(s for subjects in CATEGORIES.values() for s in subjects))
LETTERS = ("A", "B", "C", "D")


class MmluSubject(MultipleChoice):
    metrics = ("acc",)

    def __init__(self, subject: str):
        self.subject = subject
        self.name = f"mmlu_{subject}"
        self.files = (f"mmlu/test/{subject}_test.csv",)
        self.layout = (
            f"mmlu/test/{subject}_test.csv: the hendrycks MMLU test CSV, no header, "
            "6 columns question,A,B,C,D,answer (answer a letter A-D)"
        )

    def load(self, paths: list[Path]) -> list[dict]:
        path = paths[0]
        head = f"The following are multiple choice questions (with answers) about {self.subject.replace('_', ' ')}.\n\n"
        docs = []
        for n, (q, a, b, c, d, answer) in enumerate(read_csv(self, path, 6), 1):
            if answer.strip() not in LETTERS:
                raise self.bad(path, f"row {n}", f"answer {answer!r} is not one of A, B, C, D")
            query = head + f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
            docs.append({"query": query, "choices": list(LETTERS), "gold": LETTERS.index(answer.strip())})
        return docs


class Group:
    """Tasks reported together: each leaf on its own, and the size-weighted mean of their `metric`
    with the pooled stderr for the group and each named subgroup."""

    def __init__(self, name: str, leaves: list[MmluSubject], subgroups: dict[str, list[str]], metric: str = "acc"):
        self.name, self.leaves, self.subgroups, self.metric = name, leaves, subgroups, metric

    def aggregate(self, leaf_results: dict[str, dict], sizes: dict[str, int]) -> dict[str, dict]:
        out = {}
        for gname, members in [(self.name, [t.name for t in self.leaves]), *self.subgroups.items()]:
            members = [m for m in members if m in leaf_results]
            if not members:
                continue
            vals = [leaf_results[m][self.metric] for m in members]
            ns = [sizes[m] for m in members]
            errs = [leaf_results[m][f"{self.metric}_stderr"] for m in members]
            out[gname] = {
                self.metric: M.weighted_mean(vals, ns),
                f"{self.metric}_stderr": None if None in errs else M.pooled_stderr(errs, ns),
            }
        return out


def mmlu_group() -> Group:
    leaves = [MmluSubject(s) for s in SUBJECTS]
    subgroups = {f"mmlu_{cat}": [f"mmlu_{s}" for s in subjects] for cat, subjects in CATEGORIES.items()}
    return Group("mmlu", leaves, subgroups)
