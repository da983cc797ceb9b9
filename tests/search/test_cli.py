"""autokd-cli end to end on the embedded digits data, at toy scale."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from autokd.cli import main

# Toy scale: a teacher of 2 epochs, trials of 1 epoch on 20% of the data.
TOY = [
    "--teacher-epochs",
    "2",
    "--epochs",
    "5",
    "--stop-fraction",
    "0.2",
    "--views",
    "2",
    "--quiet",
]


def _cli(*args):
    return [sys.executable, "-m", "autokd.cli", *args]


def _trials(out):
    db = sqlite3.connect(os.path.join(out, "journal.sqlite"))
    try:
        return db.execute("SELECT id, design, reward FROM trials ORDER BY id").fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search"))
    r = CliRunner().invoke(main, ["search", "--out", out, "--budget", "4", *TOY])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_search_writes_spec_report_and_journal(searched):
    out, output = searched
    assert "best spec:" in output and "report:" in output
    for name in (
        "best.yaml",
        "top.yaml",
        "report.html",
        "journal.sqlite",
        "teacher.pt",
        "teacher_features.akds",
    ):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(_trials(out)) == 4
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == 3


def test_best_spec_is_ready_for_distill(searched):
    out, _ = searched
    r = CliRunner().invoke(
        main,
        [
            "distill",
            "--out",
            out,
            "--spec",
            os.path.join(out, "best.yaml"),
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    result = json.load(open(os.path.join(out, "distill-best-0", "result.json")))
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_same_command_resumes_without_rerunning(searched):
    out, _ = searched
    before = _trials(out)
    r = CliRunner().invoke(main, ["search", "--out", out, "--budget", "5", *TOY])
    assert r.exit_code == 0, r.output
    after = _trials(out)
    assert after[:4] == before and len(after) == 5
    assert "resuming: 4 finished trials" in r.output


def test_report_renders_from_journal(searched):
    out, _ = searched
    os.remove(os.path.join(out, "report.html"))
    r = CliRunner().invoke(main, ["report", "--out", out])
    assert r.exit_code == 0, r.output
    assert os.path.getsize(os.path.join(out, "report.html")) > 10_000


def test_search_killed_with_sigkill_resumes_losing_nothing(tmp_path):
    out = str(tmp_path / "s")
    # A budget far above what runs before the kill: trials take ~0.1-1 s, the poll 0.05 s.
    budget = 30
    args = _cli("search", "--out", out, "--budget", str(budget), *TOY)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if os.path.exists(os.path.join(out, "journal.sqlite")):
                try:
                    if len(_trials(out)) >= 2:
                        break
                except sqlite3.OperationalError:
                    pass
            if proc.poll() is not None:
                pytest.fail("search ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("search made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = _trials(out)
    assert 2 <= len(killed) < budget
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    final = _trials(out)
    assert len(final) == budget
    assert final[: len(killed)] == killed


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--data", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
        (["search", "--student", "resnet21"], "resnet21"),
        (["search", "--data", "imagenet21k"], "imagenet21k"),
        (["distill", "--spec", "no_such_distiller"], "unknown distiller 'no_such_distiller'"),
        (["report", "--out", "/nonexistent/run"], "does not exist"),
        (
            ["search", "--select-seeds", "3", "--select-max-seeds", "2"],
            "expected max_seeds an integer >= seeds (3), got 2",
        ),
    ],
)
def test_bad_inputs_get_one_line_messages(tmp_path, args, message):
    r = CliRunner().invoke(
        main,
        [*args, *(["--out", str(tmp_path)] if "--out" not in args else [])]
        if args[0] != "report"
        else args,
    )
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output


def test_corrupt_journal_is_named(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "journal.sqlite").write_bytes(b"garbage" * 100)
    r = CliRunner().invoke(main, ["report", "--out", str(out)])
    assert r.exit_code != 0 and "not an autokd journal" in r.output


def test_store_of_another_teacher_is_refused(searched, tmp_path):
    out, _ = searched
    other = tmp_path / "other"
    other.mkdir()
    # The same store file and data, a different teacher (trained for 1 epoch instead of 2).
    os.symlink(os.path.join(out, "teacher_features.akds"), other / "teacher_features.akds")
    r = CliRunner().invoke(
        main, ["cache", "--out", str(other), "--teacher-epochs", "1", "--views", "2"]
    )
    assert r.exit_code != 0
    assert "teacher" in r.output.lower() and "Traceback" not in r.output
