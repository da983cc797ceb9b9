"""Parallel search: local worker processes and Ray tasks, on the embedded digits data at toy scale.

Every parallel run reuses the teacher and the feature store of one serial run (copied into its
own --out folder), so what is measured is the executor, not the teacher's training.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from autokd.cli import main
from autokd.pipeline import default_proxy, default_training
from autokd.search.driver import SearchConfig, run_search
from autokd.search.executors import KILL_ENV, RAY_MISSING
from autokd.search.reward import reward_floor
from autokd.space import load_space
from autokd.train.loop import TrainConfig

TOY = [
    "--teacher-epochs",
    "1",
    "--epochs",
    "5",
    "--stop-fraction",
    "0.2",
    "--views",
    "2",
    "--quiet",
]
SEED = 0


def _cfg(out, budget, **kw):
    # the CLI's digits defaults (data_fraction among them), at the toy schedule of TOY
    accel = {**default_proxy("digits"), "stop_fraction": 0.2}
    proxy = TrainConfig(
        epochs=5,
        batch_size=32,
        lr=0.1,
        **accel,
        offline=True,
        seed=SEED,
        data_fraction=default_training("digits")["data_fraction"],
    )
    return SearchConfig(
        out=str(out), budget=budget, teacher_epochs=1, views=2, proxy=proxy, seed=SEED, **kw
    )


def _journal(out):
    db = sqlite3.connect(os.path.join(out, "journal.sqlite"))
    try:
        columns = [r[1] for r in db.execute("PRAGMA table_info(trials)")]
        rows = db.execute(
            "SELECT id, design, reward, status, metrics, seed FROM trials ORDER BY id"
        ).fetchall()
        config = json.loads(dict(db.execute("SELECT key, value FROM meta"))["config"])
    finally:
        db.close()
    return columns, rows, config


# In-process trials on one thread, as each CPU worker on this 2-core machine gets (module scope:
# the module-scoped `serial` search runs on one thread too).
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """A serial 4-trial search: the reference shape, and the teacher and store every test copies."""
    out = str(tmp_path_factory.mktemp("serial"))
    r = CliRunner().invoke(main, ["search", "--out", out, "--budget", "4", *TOY])
    assert r.exit_code == 0, r.output
    return out


def _prepared(serial, path):
    os.makedirs(path, exist_ok=True)
    for name in ("teacher.pt", "teacher_features.akds"):
        shutil.copy(os.path.join(serial, name), os.path.join(path, name))
    return str(path)


def _assert_same_shape(serial, out, n):
    columns, rows, config = _journal(out)
    s_columns, s_rows, s_config = _journal(serial)
    assert columns == s_columns
    assert config == s_config  # the same pinned configuration: executors are not part of it
    assert len(rows) == n
    space = load_space("autokd")
    for _, design, reward, status, metrics, seed in rows:
        space.spec_from_design(json.loads(design))  # a valid design of the space
        assert status in ("ok", "diverged", "failed")
        assert reward >= reward_floor(10)
    # Trial i in launch order has seed seed * 100003 + i, whichever worker ran it.
    assert sorted(r[5] for r in rows) == [SEED * 100_003 + i for i in range(n)]
    return rows


def test_local_workers_retry_a_killed_trial_then_record_it_failed(serial, tmp_path, monkeypatch):
    out = _prepared(serial, tmp_path / "local")
    # The worker running trial 0 dies on its first attempt (retried, then fine); trial 1's
    # worker dies on both attempts (recorded as failed).
    monkeypatch.setenv(KILL_ENV, "0@1,1@1,1@2")
    logs = []
    res = run_search(_cfg(out, 4, workers=2), log=logs.append, progress=False)
    assert res.new_trials == 4
    text = "\n".join(logs)
    assert (
        "trial 0 (attempt 1): worker process killed by SIGKILL" in text
        or "trial 0 (attempt 1): worker process exited with code 137" in text
    )
    assert "trial 0: retrying (attempt 2 of 2)" in text
    assert "trial 1: failed 2 times" in text
    rows = _assert_same_shape(serial, out, 4)
    by_seed = {r[5]: r for r in rows}
    failed = by_seed[SEED * 100_003 + 1]
    assert failed[3] == "failed" and failed[2] == pytest.approx(reward_floor(10))
    assert json.loads(failed[4])["attempts"] == 2
    assert by_seed[SEED * 100_003 + 0][3] != "failed"
    assert sum(r[3] == "failed" for r in rows) == 1
    # Concurrent asks carry a virtual loss: the workers got different designs.
    assert len({r[1] for r in rows}) == 4

    # Resume after the parallel run: the finished trials are replayed, never rerun.
    monkeypatch.delenv(KILL_ENV)
    logs.clear()
    res = run_search(_cfg(out, 6, workers=2), log=logs.append, progress=False)
    assert res.new_trials == 2
    assert "resuming: 4 finished trials" in "\n".join(logs)
    after = _journal(out)[1]
    assert after[:4] == rows and len(after) == 6
    assert sorted(r[5] for r in after) == [SEED * 100_003 + i for i in range(6)]


def test_ray_cluster_runs_the_search_and_retries_a_killed_task(serial, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    out = _prepared(serial, tmp_path / "ray")
    # Set before the cluster starts: its worker processes take the environment of the raylet.
    monkeypatch.setenv(KILL_ENV, "0@1")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        logs = []
        res = run_search(_cfg(out, 4, executor="ray", workers=2), log=logs.append, progress=False)
        assert ray.is_initialized()  # a cluster the search did not start is left running
    finally:
        ray.shutdown()
    text = "\n".join(logs)
    assert res.new_trials == 4
    assert "trial 0 (attempt 1): Ray task failed" in text
    assert "trial 0: retrying (attempt 2 of 2)" in text
    rows = _assert_same_shape(serial, out, 4)
    assert all(r[3] != "failed" for r in rows)


def test_serial_search_retries_out_of_memory_and_stops_when_every_trial_fails(
    serial, tmp_path, monkeypatch
):
    """The serial path (local, 1 worker) shares the retry rule: a CUDA out-of-memory error is a
    failed attempt, not the end of the search; trials that fail again and again stop it."""
    import torch

    from autokd.search.trial import TrialRunner

    real_run = TrialRunner.run
    calls = []

    def run(self, task):
        seed = task.seed
        calls.append(seed)
        # The first attempt of the first trial, then every attempt from the third trial on.
        if len(calls) == 1 or seed >= SEED * 100_003 + 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, task)

    monkeypatch.setattr(TrialRunner, "run", run)
    out = _prepared(serial, tmp_path / "oom")
    logs = []
    with pytest.raises(
        ValueError, match=r"3 trials in a row failed \(workers died or ran out of memory"
    ):
        run_search(_cfg(out, 8), log=logs.append, progress=False)
    assert "trial 0 (attempt 1): out of memory: CUDA out of memory" in "\n".join(logs)
    rows = _journal(out)[1]
    assert [r[3] for r in rows][:2] != ["failed", "failed"]
    assert [r[3] for r in rows] == [rows[0][3], rows[1][3], "failed", "failed", "failed"]
    assert [r[5] for r in rows] == [SEED * 100_003 + i for i in range(5)]
    assert calls[:2] == [SEED * 100_003, SEED * 100_003]  # trial 0 retried with its seed


@pytest.mark.slow
def test_ctrl_c_and_sigkill_leave_no_workers(serial, tmp_path):
    out = _prepared(serial, tmp_path / "kill")
    budget = 40
    args = [
        sys.executable,
        "-m",
        "autokd.cli",
        "search",
        "--out",
        out,
        "--budget",
        str(budget),
        "--workers",
        "2",
        *TOY,
    ]

    def start_and_wait_for(rows):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if len(_journal(out)[1]) >= rows:
                    return proc, _children(proc.pid)
            except (sqlite3.OperationalError, KeyError, FileNotFoundError):
                pass
            if proc.poll() is not None:
                pytest.fail("search ended early")
            time.sleep(0.05)
        proc.kill()
        pytest.fail("search made no progress")

    # Ctrl-C: the driver stops its workers and exits.
    proc, workers = start_and_wait_for(1)
    assert len(workers) == 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    _assert_gone(workers, 10)
    first = _journal(out)[1]

    # SIGKILL: the driver cannot stop anything; its workers notice and leave. The journal keeps
    # every finished trial (resuming from it is tested above).
    proc, workers = start_and_wait_for(len(first) + 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_gone(workers, 10)
    killed = _journal(out)[1]
    assert killed[: len(first)] == first and len(first) < len(killed) < budget


def _children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(p) for p in f.read().split()]
    # The spawn context's resource tracker is a child too; the workers are the trial workers.
    return [k for k in kids if "spawn_main" in _cmdline(k)]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _assert_gone(pids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if _cmdline(p)]
        if not alive:
            return
        time.sleep(0.1)
    pytest.fail(f"worker processes {alive} outlived the search")


def test_local_gpu_workers_are_pinned_round_robin(monkeypatch):
    """Worker i sees only visible GPU i mod G (read from the workers' environment: no GPU here)."""
    from autokd.search.executors import LocalExecutor
    from autokd.search.trial import TrialSetup

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ctx = TrialSetup(
        cfg=None,
        teacher_checkpoint="",
        teacher_hash="",
        data_identity="",
        store_path=None,
        student_taps=[],
    )
    ex = LocalExecutor(ctx, 3, "cuda", log=lambda _m: None)
    try:
        envs = []
        for w in ex._workers:
            # Read the environment once the worker runs its loop: while a spawned process is
            # still being exec'd, /proc/<pid>/environ can read empty.
            assert w.conn.poll(120), "worker did not start"
            assert w.conn.recv()[0] == "ready"
            with open(f"/proc/{w.proc.pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            envs.append((env.get(b"CUDA_VISIBLE_DEVICES"), env.get(b"OMP_NUM_THREADS")))
        threads = str(max(1, len(os.sched_getaffinity(0)) // 3)).encode()
        assert envs == [(b"3", threads), (b"5", threads), (b"3", threads)]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # the driver's own is left as it was
        pids = [w.proc.pid for w in ex._workers]
    finally:
        ex.close()
    assert not [p for p in pids if _cmdline(p)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "'--workers': 0 is not in the range x>=1"),
        (["--executor", "dask"], "'--executor': 'dask' is not one of 'local', 'ray'"),
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    ],
)
def test_bad_executor_options(tmp_path, args, message):
    r = CliRunner().invoke(main, ["search", "--out", str(tmp_path), *args])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = CliRunner().invoke(
        main, ["search", "--out", str(tmp_path), "--executor", "ray", "--workers", "2"]
    )
    assert r.exit_code != 0
    assert RAY_MISSING in r.output and "pip install 'autokd[ray]'" in r.output
    assert "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "teacher.pt")  # refused before any work


def test_search_config_checks_executor_settings():
    with pytest.raises(ValueError, match="expected workers an integer >= 1, got 0"):
        _cfg("x", 1, workers=0)
    with pytest.raises(ValueError, match="expected executor one of local, ray, got 'dask'"):
        _cfg("x", 1, executor="dask")
    with pytest.raises(ValueError, match="needs executor 'ray'"):
        _cfg("x", 1, ray_address="auto")


def test_search_config_default_proxy_follows_the_student():
    # From Python as from the CLI: a ViT student gets its optimizer (AdamW, warm-up) and, on
    # digits, its longer proxy trial; the CNN student the data set's SGD proxy.
    vit = SearchConfig(student="vit_compact").proxy
    assert (vit.optimizer, vit.lr, vit.warmup_epochs, vit.stop_fraction) == (
        "adamw",
        1e-3,
        5.0,
        0.33,
    )
    cnn = SearchConfig().proxy
    assert (cnn.optimizer, cnn.lr, cnn.stop_fraction) == ("sgd", 0.1, 0.1)


def test_the_trial_reward_is_pinned_in_the_journal_when_it_is_not_the_papers():
    # a journal of paper rewards keeps its keys (it still resumes); a calibrated search is
    # another search, and resuming it with the other reward is refused by the pin
    paper = SearchConfig().pinned("data", "hash")
    calibrated = SearchConfig(reward="calibrated").pinned("data", "hash")
    assert "reward" not in paper and calibrated["reward"] == "calibrated"
    assert {k: v for k, v in calibrated.items() if k != "reward"} == paper
    with pytest.raises(ValueError, match="reward one of paper, calibrated, got 'ce'"):
        SearchConfig(reward="ce")
