"""Fault injection: shared tools.

Every test here injects faults (flipped bits, truncations, kills, read-only folders, a full
disk, malformed inputs) and checks that autokd survives each one the way a user needs: damaged
data never reaches a student, finished work is never lost, and every refusal is one line that
names the problem (no traceback). ``faults`` counts what was injected and what survived; the
counts are printed at the end of the run (benchmarks/RESULTS.md records them).
"""

from __future__ import annotations

import pytest
from faultlib import COUNTS, FaultLog


@pytest.fixture
def faults():
    return FaultLog()


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    tr = terminalreporter
    tr.section("faults injected / survived / lost rows")
    total = [0, 0, 0]
    for kind, (inj, ok, lost) in COUNTS.items():
        tr.write_line(f"{kind:<58} {inj:>5} {ok:>5} {lost:>5}")
        total = [total[0] + inj, total[1] + ok, total[2] + lost]
    tr.write_line(f"{'total':<58} {total[0]:>5} {total[1]:>5} {total[2]:>5}")


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A digits teacher checkpoint (1 epoch: these tests need a teacher, not a good one)."""
    from autokd.data import load_data
    from autokd.pipeline import load_or_train_teacher

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    data = load_data("digits", val_fraction=0.1, seed=0)
    load_or_train_teacher(
        data, "digits_teacher", None, path, epochs=1, log=lambda m: None, progress=False
    )
    return path
