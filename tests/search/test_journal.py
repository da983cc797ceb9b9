import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from autokd.search.journal import Journal, JournalError

CFG = {"data": "digits:abc", "seed": 0, "proxy": {"epochs": 3, "subset": 0.2}, "taps": ("layer3",)}


def test_round_trip_and_order(tmp_path):
    p = tmp_path / "j.sqlite"
    with Journal(p, CFG) as j:
        j.add({"a": "x"}, 0.5, "ok", {"val_acc": 0.9}, 1.5, 7)
        j.add({"a": "y", "b": "z"}, -2.0, "diverged", {}, 0.1, 8, "random")
    with Journal(p, CFG) as j:
        ts = j.trials()
        assert len(j) == 2
    assert [t.design for t in ts] == [{"a": "x"}, {"a": "y", "b": "z"}]
    assert ts[0].reward == 0.5 and ts[0].metrics == {"val_acc": 0.9} and ts[0].seed == 7
    assert ts[1].status == "diverged" and ts[1].strategy == "random"


def test_other_configuration_is_refused(tmp_path):
    p = tmp_path / "j.sqlite"
    Journal(p, CFG).close()
    other = dict(CFG, seed=1)
    with pytest.raises(JournalError, match="seed: journal has 0, this run has 1"):
        Journal(p, other)


def test_not_a_journal(tmp_path):
    p = tmp_path / "j.sqlite"
    p.write_bytes(b"hello, this is not sqlite at all" * 10)
    with pytest.raises(JournalError, match="not an autokd journal"):
        Journal(p, CFG)
    q = tmp_path / "other.sqlite"
    db = sqlite3.connect(q)
    db.execute("CREATE TABLE x (a)")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="not an autokd journal"):
        Journal(q, CFG)


def test_corrupt_pages_are_reported(tmp_path):
    p = tmp_path / "j.sqlite"
    with Journal(p, CFG) as j:
        for i in range(200):
            j.add({"a": str(i)}, float(i), "ok", {"pad": "x" * 200})
    # Checkpoint the WAL so that the rows are in the main file, then wreck its middle pages.
    db = sqlite3.connect(p)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(p.read_bytes())
    for i in range(4096, len(data) - 4096):
        data[i] = 0xA5
    p.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="corrupt"):
        with Journal(p, CFG) as j:
            j.trials()


def test_rows_survive_sigkill(tmp_path):
    """A trial is durable once add() returns, even if the process is killed right after."""
    p = tmp_path / "j.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from autokd.search.journal import Journal
        j = Journal({str(p)!r}, {CFG!r})
        for i in range(5):
            j.add({{"i": str(i)}}, float(i), "ok")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert r.returncode == -9
    with Journal(p, CFG) as j:
        assert [t.design["i"] for t in j.trials()] == ["0", "1", "2", "3", "4"]
