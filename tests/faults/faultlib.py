"""Helpers of the fault-injection tests: the CLI in-process, the one-line-error check, a
read-only folder, and the fault counts (imported by name: ``conftest`` is ambiguous when the
whole suite runs, tests/store has one too)."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import traceback

import pytest
from click.testing import CliRunner

from autokd.cli import main

_PROGRESS = re.compile(r"\d+%\|")
COUNTS: collections.OrderedDict[str, list] = collections.OrderedDict()


class FaultLog:
    """Counts per kind of fault: injected, survived (handled as a user needs), rows lost."""

    def injected(self, kind: str, n: int = 1) -> None:
        COUNTS.setdefault(kind, [0, 0, 0])[0] += n

    def survived(self, kind: str, n: int = 1) -> None:
        COUNTS.setdefault(kind, [0, 0, 0])[1] += n

    def lost_rows(self, kind: str, n: int) -> None:
        COUNTS.setdefault(kind, [0, 0, 0])[2] += n


def cli(*args):
    """autokd-cli in this process (click's runner: stdout and stderr kept apart)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles) -> str:
    """The command failed with one line on stderr ("Error: ...") holding every needle, and no
    exception escaped (CliRunner keeps an escaped exception instead of printing its traceback,
    so that is what is checked)."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        pytest.fail(f"a traceback reached the user ({type(exc).__name__}):\n{tb}")
    assert result.exit_code != 0, result.output
    # progress bars (tqdm, on stderr) of work done before the failure are not messages
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _PROGRESS.search(ln)]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "Traceback" not in result.output
    for n in needles:
        assert str(n) in line, f"{n!r} not in {line!r}"
    return line


def _writable(path) -> bool:
    probe = os.path.join(path, ".probe")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def read_only(path):
    """``path`` (a folder) read-only for this process: chmod for a normal user; root ignores
    modes, so there the immutable attribute (chattr +i, which binds root too). Skips the test
    where neither works."""
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    how = None
    try:
        if os.geteuid() != 0:
            os.chmod(path, 0o555)
            how = "chmod"
        elif (
            subprocess.run(["chattr", "+i", path], capture_output=True, check=False).returncode == 0
        ):
            how = "chattr"
        if how is None or _writable(path):
            pytest.skip("cannot make a folder read-only here")
        yield path
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", path], capture_output=True, check=False)
        elif how == "chmod":
            os.chmod(path, mode)
