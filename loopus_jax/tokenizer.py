"""Tokenizers come from transformers; this module only finds them and reports clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopus_jax.errors import LoopusError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> Any:
    """The tokenizer stored with a checkpoint, or None when the directory holds none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if gguf_file is None and not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a config.json of model_type "lds" makes transformers warn needlessly
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for broken files
        raise LoopusError(f"cannot load the tokenizer from {path / (gguf_file or '')}: {str(e)[:300]}") from None
    finally:
        hf_logging.set_verbosity(level)


def require_tokenizer(tokenizer: Any, path: str | Path) -> Any:
    if tokenizer is None:
        raise LoopusError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); this command needs one")
    return tokenizer
