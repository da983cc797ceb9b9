"""Fault injection: shared tools.

Every test here injects faults (flipped bits, truncations, kills, read-only folders, a full
disk, malformed inputs) and checks that autokd survives each one the way a user needs: damaged
data never reaches a student, finished work is never lost, and every refusal is one line that
names the problem (no traceback). ``faults`` counts what was injected and what survived; the
counts are printed at the end of the run (benchmarks/RESULTS.md records them).
"""
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
_COUNTS: "collections.OrderedDict[str, list]" = collections.OrderedDict()


class FaultLog:
    def injected(self, kind: str, n: int = 1) -> None:
        _COUNTS.setdefault(kind, [0, 0, 0])[0] += n

    def survived(self, kind: str, n: int = 1) -> None:
        _COUNTS.setdefault(kind, [0, 0, 0])[1] += n

    def lost_rows(self, kind: str, n: int) -> None:
        _COUNTS.setdefault(kind, [0, 0, 0])[2] += n


@pytest.fixture
def faults():
    return FaultLog()


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    tr = terminalreporter
    tr.section("faults injected / survived / lost rows")
    total = [0, 0, 0]
    for kind, (inj, ok, lost) in _COUNTS.items():
        tr.write_line(f"{kind:<58} {inj:>5} {ok:>5} {lost:>5}")
        total = [total[0] + inj, total[1] + ok, total[2] + lost]
    tr.write_line(f"{'total':<58} {total[0]:>5} {total[1]:>5} {total[2]:>5}")


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
    lines = [ln for ln in result.stderr.splitlines()
             if ln.strip() and not _PROGRESS.search(ln)]
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
        elif subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0:
            how = "chattr"
        if how is None or _writable(path):
            pytest.skip("cannot make a folder read-only here")
        yield path
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", path], capture_output=True)
        elif how == "chmod":
            os.chmod(path, mode)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A digits teacher checkpoint (1 epoch: these tests need a teacher, not a good one)."""
    from autokd.data import load_data
    from autokd.pipeline import load_or_train_teacher

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    data = load_data("digits", val_fraction=0.1, seed=0)
    load_or_train_teacher(data, "digits_teacher", None, path, epochs=1, log=lambda m: None,
                          progress=False)
    return path
