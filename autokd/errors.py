"""Errors users see, at the bottom of the import graph: every layer may raise them, none of
them imports anything of autokd.

The CLI prints these as one line (``autokd-cli --debug`` shows the traceback); anything else
that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(ValueError):
    """A user-facing problem with the inputs of a command (printed without a traceback)."""
