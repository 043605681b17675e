"""Progress bars for long work (hidden when stderr is not a terminal, so logs stay clean)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    return tqdm(it, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)
