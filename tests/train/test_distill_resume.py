"""`distill` interrupted between epochs resumes to the same student as an uninterrupted run."""

import pytest
import torch

from autokd.data import load_data
from autokd.pipeline import load_or_train_teacher, make_augment, resolve_taps
from autokd.train import final
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = load_data("digits", val_fraction=0.1, seed=0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    teacher = load_or_train_teacher(
        data, "digits_teacher", None, path, epochs=1, log=lambda m: None
    )
    return data, teacher


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_resume_matches_uninterrupted(setup, tmp_path, monkeypatch, sparsity):
    data, teacher = setup
    spec = resolve_spec("kd")
    taps = resolve_taps("digits_student", None)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, sparsity=sparsity, offline=False, seed=3)
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
    real_save, saves = torch.save, []

    def save_then_die(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        saves.append(path)
        if len(saves) == 2:  # two finished epochs are on disk: the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(final.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(final.torch, "save", real_save)
    resumed = run(tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"student tensor {k} differs after resume")
    assert resumed.test_accuracy == full.test_accuracy
    if sparsity:
        zeros = sum(
            int((v == 0).sum()) for k, v in b.items() if k.endswith("weight") and v.dim() > 1
        )
        assert zeros > 0
