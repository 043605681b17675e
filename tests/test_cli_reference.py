"""docs/cli.md is exactly what the parser prints (regenerate with `make docs`), and every `loopus`
command line in README.md parses with the real parser (its behaviour is tested where the command is)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loopus_jax.cli import build_parser
from loopus_jax.cli_reference import cli_reference

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), "docs/cli.md is stale: run `make docs`"


def test_cli_reference_covers_every_subcommand():
    text = cli_reference()
    for name in ("convert", "export", "info", "eval ppl", "eval tasks", "eval sweep", "analyze", "demo", "generate", "train"):
        assert f"## `loopus {name}`" in text, name


def readme_commands() -> list[str]:
    """`loopus ...` lines of README.md's bash blocks, with backslash continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.strip().startswith("loopus ")]


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    argv = shlex.split(line)[1:]
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or subcommand
    assert callable(args.fn)
