"""`distill` stopped after epoch k, or killed with SIGKILL at a random point, and resumed trains
the very student an uninterrupted run trains: bit for bit, also for designs that draw random
numbers (the random spatial mask of `mask`, MGD's mask and generator)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from autokd.data import load_data
from autokd.pipeline import load_or_train_teacher, make_augment, resolve_taps
from autokd.space import DistillerSpec
from autokd.train import final
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 14
DESIGNS = {
    "mask": lambda: DistillerSpec.from_dict(
        {
            "name": "mask-l2",
            "global_transform": "mask",
            "feature_distance": "l2",
            "feature_weight": 5,
        }
    ),
    "mgd": lambda: resolve_spec("mgd"),
}


@pytest.fixture(scope="module")
def setup(digits_teacher):
    data = load_data("digits", val_fraction=0.1, seed=0)
    teacher = load_or_train_teacher(
        data, "digits_teacher", digits_teacher, None, epochs=1, log=lambda m: None, progress=False
    )
    return data, teacher


def _same_student(a_dir, b_dir):
    a = torch.load(os.path.join(a_dir, "student.pt"), weights_only=True)
    b = torch.load(os.path.join(b_dir, "student.pt"), weights_only=True)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed student differs from the uninterrupted one in {differ}"


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_stop_after_epoch_k_and_resume_is_bit_identical(
    setup, tmp_path, monkeypatch, design, faults
):
    data, teacher = setup
    spec = DESIGNS[design]()
    taps = resolve_taps("digits_student", None)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, offline=False, seed=3)
    aug = make_augment(data, 0)

    def run(out):
        return run_distill(
            spec,
            data,
            teacher,
            "digits_student",
            taps,
            cfg,
            str(out),
            augment=aug,
            log=lambda m: None,
            progress=False,
        )

    full = run(tmp_path / "full")
    k = random.Random(f"{SEED}:{design}").randrange(1, cfg.run_epochs)  # stop after epoch k
    real_save, saves = final.atomic_torch_save, []

    def save_then_stop(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == k:  # k epochs are on disk: the process "dies" here
            raise KeyboardInterrupt

    monkeypatch.setattr(final, "atomic_torch_save", save_then_stop)
    faults.injected(f"distill: stopped after epoch k ({design})")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(final, "atomic_torch_save", real_save)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == k - 1  # epochs 0 .. k-1 finished: the resume starts inside the run
    torch.manual_seed(12345)  # a new process would start from other global RNG states
    resumed = run(tmp_path / "cut")
    _same_student(tmp_path / "full", tmp_path / "cut")
    assert resumed.test_accuracy == full.test_accuracy
    faults.survived(f"distill: stopped after epoch k ({design})")


def test_distill_killed_with_sigkill_resumes_bit_identical(
    setup, tmp_path, digits_teacher, faults, one_thread
):
    """The real CLI in a child process, SIGKILL at a random moment after its first checkpoint
    (mid-epoch or mid-write), then the same command again, against an uninterrupted run. Every
    run on one thread (the child's OMP_NUM_THREADS=1 and the test's in-process runs): float
    sums over two threads may round otherwise, and bit identity is what is tested."""
    args = [
        "distill",
        "--spec",
        "mgd",
        "--teacher-checkpoint",
        digits_teacher,
        "--epochs",
        "6",
        "--batch-size",
        "64",
        "--seed",
        "3",
        "--quiet",
    ]
    from click.testing import CliRunner

    from autokd.cli import main

    full = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    out = tmp_path / "cut"
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "autokd.cli", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out / "distill-mgd-3" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(SEED).uniform(0.0, 0.5))  # somewhere in the next epochs
    faults.injected("distill: SIGKILL at a random point")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make it longer"
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    _same_student(tmp_path / "full" / "distill-mgd-3", out / "distill-mgd-3")
    faults.survived("distill: SIGKILL at a random point")
