"""One exception type for every user-facing failure.

The CLI turns a `LoopusError` into one line on stderr and exit code 2; anything else is a bug.
"""

from __future__ import annotations


class LoopusError(Exception):
    """A problem with the user's input (path, checkpoint, config, option), with the fix in the text."""
