"""Read-only folders, a full disk, SQLite errors, damaged journal rows and NaN teachers: found
before work starts where they can be, one line naming the file always, finished work kept."""

import errno
import json
import os
import random
import sqlite3
import subprocess

import numpy as np
import pytest
import torch
from faultlib import cli, one_line_error, read_only

from autokd import cli as cli_module
from autokd import fsutil
from autokd.search import report
from autokd.search.journal import Journal, JournalError
from autokd.space import load_space

SEED = 14
DESIGN = {
    "global_transform": "original",
    "intra_spatial": "original",
    "inter_spatial": "original",
    "feature_distance": "l2",
    "feature_weight": "1",
    "logit_distance": "kl",
    "temperature": "4",
    "logit_weight": "1",
}


def _no_data_loading(monkeypatch):
    """Fail the test if a command gets as far as reading its data (it must refuse earlier)."""

    def refuse(*a, **k):
        raise AssertionError("the command read its data before refusing")

    monkeypatch.setattr(cli_module, "_load", refuse)


@pytest.mark.parametrize("command", ["distill", "train-teacher", "cache", "search"])
def test_unwritable_output_folder_is_refused_before_any_work(
    tmp_path, monkeypatch, digits_teacher, command, faults
):
    out = tmp_path / "ro"
    out.mkdir()
    _no_data_loading(monkeypatch)
    args = {
        "distill": [
            "distill",
            "--spec",
            "kd",
            "--teacher-checkpoint",
            digits_teacher,
            "--run-dir",
            out,
        ],
        "train-teacher": ["train-teacher", "--out", out],
        "cache": ["cache", "--out", out],
        "search": ["search", "--out", out, "--budget", "1"],
    }[command]
    with read_only(out):
        faults.injected("read-only output folder")
        r = cli(*args, *(["--out", tmp_path / "w"] if command == "distill" else []))
        one_line_error(r, str(out), "not writable")
    faults.survived("read-only output folder")


def test_read_only_run_folder_is_not_called_a_corrupt_journal(tmp_path, faults):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "journal.sqlite"
    with Journal(str(path), {"space": "autokd"}) as j:
        j.add(DESIGN, 0.5, "ok")
    with read_only(out):
        faults.injected("journal in a read-only folder")
        r = cli("report", "--out", out)
        line = one_line_error(r, str(path), "read-only", "not damaged")
        assert "corrupt" not in line and "move it away" not in line
    with Journal(str(path)) as j:
        assert len(j.trials()) == 1  # intact
    faults.survived("journal in a read-only folder")


def test_a_read_only_journal_is_found_when_a_search_opens_it(tmp_path, faults):
    path = tmp_path / "journal.sqlite"
    with Journal(str(path), {"space": "autokd"}) as j:
        j.add(DESIGN, 0.5, "ok")
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode:
            pytest.skip("cannot make a file read-only here")
    else:
        os.chmod(path, 0o444)
    try:
        faults.injected("read-only journal file")
        with pytest.raises(JournalError) as e:
            Journal(str(path), {"space": "autokd"})  # a search: it will append trials
        assert "read-only" in str(e.value) and "while opening" in str(e.value), str(e.value)
        with Journal(str(path)) as j:  # reading (autokd-cli report) still works
            assert len(j.trials()) == 1
        faults.survived("read-only journal file")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        else:
            os.chmod(path, 0o644)


def _row_offsets(raw: bytes, marker: bytes):
    k = raw.find(marker)
    assert k > 0
    return k


def test_a_damaged_journal_row_is_named(tmp_path, faults):
    rng = random.Random(SEED)
    path = tmp_path / "journal.sqlite"
    with Journal(str(path), {"space": "autokd"}) as j:
        for i in range(30):
            j.add({**DESIGN, "feature_weight": str(i + 1)}, 0.5, "ok", {"val_acc": 0.5})
    # one checkpoint of the WAL into the main file, so the rows live in its pages
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    good = path.read_bytes()
    for trial in rng.sample(range(30), 6):
        for how in ("zeroed", "garbled"):
            raw = bytearray(good)
            # the design JSON of this trial, and the record header before it
            k = _row_offsets(raw, f'"feature_weight": "{trial + 1}"'.encode())
            start = raw.rfind(b'{"feature_distance"', 0, k)
            lo = start - 12 if how == "zeroed" else start
            raw[lo:k] = (
                bytes(k - lo)
                if how == "zeroed"
                else bytes(rng.randrange(256) for _ in range(k - lo))
            )
            bad = tmp_path / f"bad-{trial}-{how}.sqlite"
            bad.write_bytes(bytes(raw))
            faults.injected(f"journal row {how} inside a page")
            with pytest.raises(JournalError) as e, Journal(str(bad)) as j:
                j.trials()
            msg = str(e.value)
            assert (
                "is damaged" in msg and str(bad) in msg and "DELETE FROM trials WHERE id=" in msg
            ), msg
            faults.survived(f"journal row {how} inside a page")
    r = cli("report", "--out", tmp_path)  # the intact journal still reports
    assert r.exit_code == 0, r.output


class _FailingDb:
    """A connection whose writes fail as SQLite reports them (errors it cannot be made to
    produce on demand in a test: a full disk, an I/O error, a lock held for 30 s)."""

    def __init__(self, db, message, name):
        self._db, self._message, self._name = db, message, name

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith("INSERT"):
            e = sqlite3.OperationalError(self._message)
            e.sqlite_errorname = self._name
            raise e
        return self._db.execute(sql, *args)

    def close(self):
        self._db.close()


@pytest.mark.parametrize(
    "message, name, words",
    [
        ("database or disk is full", "SQLITE_FULL", "disk is full"),
        ("disk I/O error", "SQLITE_IOERR_WRITE", "I/O error"),
        ("database is locked", "SQLITE_BUSY", "locked by another process"),
    ],
)
def test_sqlite_errors_are_one_line_naming_the_journal(tmp_path, message, name, words, faults):
    path = str(tmp_path / "journal.sqlite")
    j = Journal(path, {"space": "autokd"})
    j.add(DESIGN, 0.5, "ok")
    j._db = _FailingDb(j._db, message, name)
    faults.injected(f"journal write: {name}")
    with pytest.raises(JournalError) as e:
        j.add(DESIGN, 0.6, "ok")
    msg = str(e.value)
    assert path in msg and words in msg and "\n" not in msg, msg
    j.close()
    with Journal(path) as again:
        assert len(again.trials()) == 1  # the finished trial is kept
        faults.lost_rows(f"journal write: {name}", 1 - len(again.trials()))
    faults.survived(f"journal write: {name}")


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_enospc(obj, f, *a, **k):
    """What torch.save does on a full disk: its writer raises a RuntimeError while handling
    the OSError of the failed write (measured on a full tmpfs, torch 2.14)."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_disk_full_in_the_report_keeps_the_previous_files(tmp_path, monkeypatch, faults):
    from autokd.search.journal import Trial

    space = load_space("autokd")
    trials = [
        Trial(i + 1, {**DESIGN, "feature_weight": w}, r, "ok", {"val_acc": r})
        for i, (w, r) in enumerate([("1", 0.3), ("5", 0.6)])
    ]
    report.write_outputs(str(tmp_path), trials, space, log=lambda m: None)
    before = {n: (tmp_path / n).read_bytes() for n in ("best.yaml", "top.yaml", "report.html")}
    trials.append(Trial(3, {**DESIGN, "feature_weight": "25"}, 0.9, "ok", {"val_acc": 0.9}))
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    faults.injected("disk full while writing the report")
    with pytest.raises(OSError) as e:
        report.write_outputs(str(tmp_path), trials, space, log=lambda m: None)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "best.yaml")
    for n, content in before.items():
        assert (tmp_path / n).read_bytes() == content, f"{n} changed"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], "temporary files left"
    faults.survived("disk full while writing the report")


def test_disk_full_in_distill_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, digits_teacher, faults
):
    out = tmp_path / "run"
    args = [
        "distill",
        "--spec",
        "kd",
        "--teacher-checkpoint",
        digits_teacher,
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--quiet",
        "--out",
        tmp_path,
        "--run-dir",
        out,
    ]
    real = torch.save
    saves = []

    def full_after_first(obj, f, *a, **k):
        saves.append(1)
        if len(saves) > 1:
            return _torch_enospc(obj, f)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_after_first)
    faults.injected("disk full while writing a distill checkpoint")
    r = cli(*args)
    one_line_error(r, str(out / "checkpoint.pt"), "disk is full", "run the same command again")
    monkeypatch.setattr(torch, "save", real)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0  # the first epoch's checkpoint is intact
    r = cli(*args)
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    faults.survived("disk full while writing a distill checkpoint")


def test_disk_full_while_building_the_store(tmp_path, monkeypatch, digits_teacher, faults):
    from autokd import _engine
    from autokd.store import feature_store

    class FullWriter(_engine.StoreWriter):
        def append(self, buffers, n):
            raise OSError(errno.ENOSPC, "No space left on device (pwrite)", self.partial_path)

    monkeypatch.setattr(feature_store._engine, "StoreWriter", FullWriter)
    faults.injected("disk full while building the store")
    r = cli("cache", "--out", tmp_path, "--teacher-checkpoint", digits_teacher, "--views", "1")
    one_line_error(r, "teacher_features.akds.partial", "disk is full")
    assert not os.path.exists(tmp_path / "teacher_features.akds.partial")
    assert not os.path.exists(tmp_path / "teacher_features.akds")
    faults.survived("disk full while building the store")


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def test_a_really_full_disk(tmp_path, digits_teacher, faults):
    """The same faults for real on a tiny tmpfs, where this process may mount one (root here);
    skipped elsewhere (the monkeypatched tests above cover the same paths)."""
    mnt = tmp_path / "tiny"
    if not _mount_tmpfs(mnt, "96k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        # the store writer (C++ pwrite), through the CLI
        faults.injected("real full disk: store build")
        r = cli("cache", "--out", mnt, "--teacher-checkpoint", digits_teacher, "--views", "4")
        one_line_error(r, str(mnt / "teacher_features.akds.partial"), "disk is full")
        assert os.listdir(mnt) == []
        faults.survived("real full disk: store build")
        # torch.save of a checkpoint (through a file object, so the OSError is seen)
        faults.injected("real full disk: checkpoint")
        with pytest.raises(OSError) as e:
            fsutil.atomic_torch_save({"x": torch.zeros(64_000)}, str(mnt / "ck.pt"))
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(mnt / "ck.pt")
        assert os.listdir(mnt) == []
        faults.survived("real full disk: checkpoint")
        # SQLite
        faults.injected("real full disk: journal")
        j = Journal(str(mnt / "journal.sqlite"), {"space": "autokd"})
        with pytest.raises(JournalError) as e:
            for i in range(10_000):
                j.add({**DESIGN, "feature_weight": str(i)}, 0.5, "ok", {"pad": "x" * 2000})
        assert "disk is full" in str(e.value) and str(mnt / "journal.sqlite") in str(e.value)
        n_added = i
        j.close()
        with Journal(str(mnt / "journal.sqlite")) as again:
            faults.lost_rows("real full disk: journal", n_added - len(again.trials()))
            assert len(again.trials()) == n_added
        faults.survived("real full disk: journal")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def test_nan_teacher_is_refused_at_load(tmp_path, digits_teacher, faults):
    ck = torch.load(digits_teacher, weights_only=True)
    name = min(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][name] = torch.full_like(ck["state_dict"][name], float("nan"))
    bad = tmp_path / "nan_teacher.pt"
    torch.save(ck, bad)
    for args in (["distill", "--spec", "kd"], ["cache"]):
        faults.injected("teacher checkpoint with NaN weights")
        r = cli(*args, "--teacher-checkpoint", bad, "--out", tmp_path / "out")
        one_line_error(r, str(bad), name, "NaN or Inf")
        faults.survived("teacher checkpoint with NaN weights")


def test_empty_held_out_split_is_refused_before_the_teacher_trains(tmp_path, faults):
    rng = np.random.default_rng(SEED)
    y = np.repeat(np.arange(4), 5)  # 5 images per class: 10% of 5 rounds to 0
    f = tmp_path / "few.npz"
    np.savez(
        f,
        x_train=rng.random((20, 8, 8, 1), dtype=np.float32),
        y_train=y,
        x_test=rng.random((8, 8, 8, 1), dtype=np.float32),
        y_test=y[:8],
    )
    for command in ("search", "train-teacher"):
        faults.injected("empty held-out split")
        r = cli(
            command,
            "--data",
            f"npz:{f}",
            "--out",
            tmp_path / command,
            "--teacher",
            "digits_teacher",
            "--student",
            "digits_student",
            "--teacher-epochs",
            "1",
        )
        one_line_error(r, "held-out split is empty", "at least 6")
        assert not (tmp_path / command / "teacher.pt").exists()
        faults.survived("empty held-out split")


def test_a_refused_command_leaves_what_it_found(tmp_path, digits_teacher, faults):
    """A store of another teacher or of another --seed, and a run folder of another spec, are
    refused by name and left byte for byte as they were (never rebuilt over)."""
    out = tmp_path / "out"
    assert (
        cli("cache", "--out", out, "--teacher-checkpoint", digits_teacher, "--views", "1").exit_code
        == 0
    )
    run = tmp_path / "run"
    base = [
        "distill",
        "--teacher-checkpoint",
        digits_teacher,
        "--epochs",
        "1",
        "--quiet",
        "--out",
        out,
        "--run-dir",
        run,
    ]
    assert cli(*base, "--spec", "kd").exit_code == 0

    def snapshot():
        return {
            p: (d / p).read_bytes() for d in (out, run) for p in os.listdir(d) if (d / p).is_file()
        }

    before = snapshot()
    other = tmp_path / "other.pt"
    ck = torch.load(digits_teacher, weights_only=True)
    ck["state_dict"] = {
        k: v + 1 if v.is_floating_point() else v for k, v in ck["state_dict"].items()
    }
    torch.save(ck, other)
    store = str(out / "teacher_features.akds")
    cases = [
        (
            ["cache", "--out", out, "--teacher-checkpoint", other, "--views", "1"],
            (store, "another teacher", "left as it is"),
        ),
        (
            [
                "cache",
                "--out",
                out,
                "--teacher-checkpoint",
                digits_teacher,
                "--views",
                "1",
                "--seed",
                "1",
            ],
            (store, "another --seed", "left as it is"),
        ),
        (
            [
                "distill",
                "--offline",
                "--spec",
                "kd",
                "--out",
                out,
                "--teacher-checkpoint",
                other,
                "--views",
                "1",
                "--run-dir",
                tmp_path / "run2",
                "--quiet",
            ],
            (store, "another teacher", "left as it is"),
        ),
        ([*base, "--spec", "dist"], ("another distill run",)),
    ]
    for args, needles in cases:
        faults.injected("refused command over an existing store or run")
        one_line_error(cli(*args), *needles)
        assert snapshot() == before, f"{args[0]} changed what it found"
        faults.survived("refused command over an existing store or run")
    json.loads((run / "result.json").read_text())
