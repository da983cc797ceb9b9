"""--workers-per-gpu: K local trial workers share each GPU (placement read from the workers'
environment: there is no GPU here, so what runs on the GPU is not measured by these tests)."""

import os

import pytest
from click.testing import CliRunner

from autokd.cli import main
from autokd.errors import PipelineError
from autokd.search.driver import SearchConfig
from autokd.search.executors import LocalExecutor, place_workers
from autokd.search.trial import TrialSetup
from autokd.train.loop import TrainConfig


def test_placement_fills_every_gpu_evenly():
    assert place_workers(4, ["0", "1"], None) == ["0", "1", "0", "1"]
    assert place_workers(None, ["0", "1"], 3) == ["0", "1", "0", "1", "0", "1"]
    assert place_workers(3, ["0", "1"], 2) == ["0", "1", "0"]  # fewer than K x G: spread
    assert place_workers(5, ["7"], None) == ["7"] * 5  # without K: oversubscribe as before
    with pytest.raises(
        PipelineError,
        match=r"--workers 5 with --workers-per-gpu 2: at most 2 x 2 "
        r"visible GPUs = 4 workers; expected --workers <= 4",
    ):
        place_workers(5, ["0", "1"], 2)
    with pytest.raises(PipelineError, match="no visible GPU"):
        place_workers(None, [], 2)


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def test_local_executor_starts_k_workers_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    setup = TrialSetup(
        cfg=None,
        teacher_checkpoint="",
        teacher_hash="",
        data_identity="",
        store_path=None,
        student_taps=[],
    )
    ex = LocalExecutor(setup, None, "cuda", log=lambda _m: None, workers_per_gpu=2)
    try:
        assert ex.slots == 2
        for w in ex._workers:
            assert w.conn.poll(120), "worker did not start"
            assert w.conn.recv()[0] == "ready"
            assert _environ(w.proc.pid).get(b"CUDA_VISIBLE_DEVICES") == b"3"
            # not daemonic: a trial worker may start DataLoader workers (streamed folders)
            assert not w.proc.daemon
    finally:
        ex.close()


def test_options_are_checked(tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["search", "--out", str(tmp_path), "--workers-per-gpu", "2"])
    assert (
        r.exit_code == 2 and "--workers-per-gpu needs --device cuda (got --device cpu)" in r.output
    )
    r = CliRunner().invoke(main, ["search", "--out", str(tmp_path), "--workers-per-gpu", "0"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output
    # too many workers for the GPUs: refused before any teacher is trained
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    r = CliRunner().invoke(
        main,
        [
            "search",
            "--out",
            str(tmp_path),
            "--device",
            "cuda",
            "--workers",
            "5",
            "--workers-per-gpu",
            "2",
        ],
    )
    assert r.exit_code == 1 and "expected --workers <= 4" in r.output
    assert not os.path.exists(tmp_path / "teacher.pt")
    with pytest.raises(PipelineError, match="workers_per_gpu needs device cuda, got 'cpu'"):
        SearchConfig(workers=None, workers_per_gpu=2, proxy=TrainConfig(epochs=5))
    with pytest.raises(PipelineError, match="expected workers, or workers_per_gpu"):
        SearchConfig(workers=None)
    cfg = SearchConfig(workers=None, workers_per_gpu=3, proxy=TrainConfig(epochs=5, device="cuda"))
    assert "workers_per_gpu" not in cfg.pinned("d", "t")  # a search may resume on other workers
