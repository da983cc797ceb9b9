"""A search from the CLI at toy scale: the selection stage's hand-back, compare, the run-folder
lock, and searches in which trials diverge."""

import json
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner

from autokd.cli import main
from autokd.search.driver import MAX_DIVERGED_IN_A_ROW, RunFolderLock

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOY = ["--teacher-epochs", "1", "--epochs", "4", "--views", "2", "--quiet"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stages"))
    r = CliRunner().invoke(
        main,
        ["search", "--out", out, "--budget", "6", "--finalists", "2", "--anchors", "kd,none", *TOY],
    )
    assert r.exit_code == 0, r.output
    return out, r.output


def _copy_teacher(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in ("teacher.pt", "teacher_features.akds"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def test_the_selection_stage_hands_back_its_winner_and_says_what_it_cost(searched):
    out, output = searched
    assert "selection stage" in output and "chosen: " in output and "cost: " in output
    line = output.split("chosen: ", 1)[1].splitlines()[0].strip()
    # the winner, then why: the search's best against the best classic, in the stage's metric
    chosen, why = line.split(" (", 1)
    assert " val_ce_ts" in why and "seeds)" in why
    head = open(os.path.join(out, "best.yaml")).readline()
    assert head.startswith(f"# chosen by the selection stage: {chosen} ")
    report = open(os.path.join(out, "report.html")).read()
    assert "Selection stage" in report and f"Chosen: {chosen} (" in report
    # `report` rebuilds the same hand-back from the journal alone
    r = CliRunner().invoke(main, ["report", "--out", out])
    assert r.exit_code == 0, r.output
    assert open(os.path.join(out, "best.yaml")).readline() == head


def test_a_resumed_search_reruns_no_selection_run(searched, tmp_path):
    out, _ = searched
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    r = CliRunner().invoke(
        main,
        [
            "search",
            "--out",
            copy,
            "--budget",
            "6",
            "--finalists",
            "2",
            "--anchors",
            "kd,none",
            *TOY,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "0 new" in r.output
    import sqlite3

    def rows(p):
        db = sqlite3.connect(os.path.join(p, "journal.sqlite"))
        return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]

    assert rows(copy) == rows(out)


def test_compare_trains_each_spec_with_each_seed_and_writes_the_table(searched, tmp_path):
    out, _ = searched
    run = _copy_teacher(out, tmp_path / "cmp")
    args = ["compare", "--out", run, "--specs", "kd,none", "--seeds", "2", *TOY]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    table = json.load(open(os.path.join(run, "compare.json")))["rows"]
    assert [row["spec"] for row in table] == ["kd", "none"]
    assert all(len(row["accuracies"]) == 2 and row["seeds"] == [0, 1] for row in table)
    md = open(os.path.join(run, "compare.md")).read()
    assert "| kd |" in md
    # and what the first spec was worth against the others, paired by seed
    assert "kd against each (points of test accuracy, same seeds):\n- none: " in md
    # a rerun trains nothing new: every run is read back, the table is the same
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert json.load(open(os.path.join(run, "compare.json")))["rows"] == table


def test_compare_defaults_to_the_search_hand_back_and_updates_its_report(searched, tmp_path):
    out, _ = searched
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    r = CliRunner().invoke(main, ["compare", "--out", copy, "--seeds", "1", *TOY])
    assert r.exit_code == 0, r.output
    specs = [row["spec"] for row in json.load(open(os.path.join(copy, "compare.json")))["rows"]]
    # best.yaml first, then every classic a user would try by hand but the one it may be
    chosen = yaml.safe_load(open(os.path.join(copy, "best.yaml"))).get("name")
    assert specs[0] == os.path.join(copy, "best.yaml")
    assert specs[1:] == [c for c in ("kd", "dkd", "dist", "none") if c != chosen]
    report = open(os.path.join(copy, "report.html")).read()
    assert "autokd-cli compare" in report
    # and what best.yaml was worth against each classic, as compare wrote it
    assert "best.yaml against each (points of test accuracy, same seeds):" in report
    assert "one seed: no spread to judge it by" in report
    # a search rerun that rewrites best.yaml: compare trains the new design, not an error
    # about the old runs, and keeps the runs of the earlier one
    before = sorted(os.listdir(os.path.join(copy, "compare")))
    best = os.path.join(copy, "best.yaml")
    spec = yaml.safe_load(open(best))
    spec["temperature"] = float(spec.get("temperature") or 4.0) + 1.0
    with open(best, "w") as f:
        yaml.safe_dump(spec, f)
    r = CliRunner().invoke(main, ["compare", "--out", copy, "--seeds", "1", *TOY])
    assert r.exit_code == 0, r.output
    after = sorted(os.listdir(os.path.join(copy, "compare")))
    assert set(before) < set(after) and len(after) == len(before) + 1


def test_a_second_search_on_a_busy_folder_is_refused_by_name(searched, tmp_path):
    out, _ = searched
    busy = _copy_teacher(out, tmp_path / "busy")
    with RunFolderLock(busy, "a test"):
        r = CliRunner().invoke(main, ["search", "--out", busy, "--budget", "2", *TOY])
    assert r.exit_code != 0
    assert "is in use by a test" in r.output and "Traceback" not in r.output


def test_a_search_where_no_trial_works_exits_non_zero(searched, tmp_path):
    out, _ = searched
    run = _copy_teacher(out, tmp_path / "nan")
    r = CliRunner().invoke(
        main,
        ["search", "--out", run, "--budget", "3", "--lr", "1e12", "--select-fidelity", "0", *TOY],
    )
    assert r.exit_code != 0
    assert "no trial worked: 3 diverged" in r.output and "--lr" in r.output


def test_a_run_of_diverged_trials_stops_the_search(searched, tmp_path):
    out, _ = searched
    run = _copy_teacher(out, tmp_path / "streak")
    r = CliRunner().invoke(
        main,
        ["search", "--out", run, "--budget", str(MAX_DIVERGED_IN_A_ROW + 5), "--lr", "1e12", *TOY],
    )
    assert r.exit_code != 0
    assert f"{MAX_DIVERGED_IN_A_ROW} trials in a row diverged" in r.output
    import sqlite3

    n = (
        sqlite3.connect(os.path.join(run, "journal.sqlite"))
        .execute("SELECT COUNT(*) FROM trials")
        .fetchone()[0]
    )
    assert n == MAX_DIVERGED_IN_A_ROW  # the finished trials are kept; resuming goes on


def test_compare_says_whether_the_first_spec_beats_each_other_beyond_the_seed_spread():
    from autokd.compare import CompareRow, worth_lines

    best = CompareRow("best.yaml", "searched", [0.78, 0.76, 0.78], [0, 1, 2], "aa")
    rows = [
        best,
        CompareRow("dist", "dist", [0.61, 0.76, 0.52], [0, 1, 2], "bb"),  # far below, noisy
        CompareRow("kd", "kd", [0.78, 0.76, 0.78], [0, 1, 2], "aa"),  # best.yaml is kd
        CompareRow("none", "none", [0.77, 0.77, 0.77], [0, 1, 2], "cc"),  # a tie
        CompareRow("fitnet", "fitnet", [0.90, 0.91, 0.92], [0, 1, 2], "dd"),  # far above
    ]
    lines = worth_lines(rows)
    assert lines[0] == "best.yaml against each (points of test accuracy, same seeds):"
    assert lines[1].startswith("- dist: +14.33 (per seed +17.00, +0.00, +26.00); above it by")
    assert lines[2] == "- kd: the same spec"
    assert lines[3].endswith("seed noise") and lines[3].startswith("- none: +0.33")
    assert "below it by more than one std" in lines[4]
    assert worth_lines(rows[:1]) == []
