"""WikiText-2 raw test (`wiki.test.raw`), as lm-eval's `wikitext`: the file is cut into pages at top-level
" = Title = " headings (EleutherAI/wikitext_document_level), each page detokenized and scored as one rolling
log-likelihood; word/byte counts are of the page before detokenization."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loopus_jax.eval import metrics as M
from loopus_jax.eval.requests import Request, Rolling
from loopus_jax.eval.scorer import Score
from loopus_jax.eval.tasks.base import Task


def split_pages(raw: str) -> list[str]:
    pages, lines = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def detokenize(s: str) -> str:
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):  # fmt: skip
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):  # fmt: skip
        s = s.replace(a, b)
    return s


class WikiText(Task):
    name = "wikitext"
    files = ("wikitext-2-raw/wiki.test.raw",)
    layout = "wikitext-2-raw/wiki.test.raw: the WikiText-2 raw test file (UTF-8 text, ' = Title = ' page headings)"
    metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")

    def load(self, paths: list[Path]) -> list[dict]:
        try:
            raw = paths[0].read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise self.bad(paths[0], "", "not UTF-8") from None
        if not raw.strip():
            raise self.bad(paths[0], "", "empty")
        return [{"page": p} for p in split_pages(raw)]

    def requests(self, doc: dict) -> list[Request]:
        return [Rolling(detokenize(doc["page"]))]

    def process(self, doc: dict, scores: list[Score]) -> dict[str, Any]:
        ll, page = scores[0].loglikelihood, doc["page"]
        words, nbytes = len(re.split(r"\s+", page)), len(page.encode("utf-8"))
        return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes)}

    def aggregate(self, per_doc: list[dict[str, Any]], bootstrap_iters: int) -> dict[str, float | None]:
        return {
            "word_perplexity": M.weighted_perplexity([d["word_perplexity"] for d in per_doc]),
            "word_perplexity_stderr": None,
            "byte_perplexity": M.weighted_perplexity([d["byte_perplexity"] for d in per_doc]),
            "byte_perplexity_stderr": None,
            "bits_per_byte": M.bits_per_byte([d["bits_per_byte"] for d in per_doc]),
            "bits_per_byte_stderr": None,
        }
