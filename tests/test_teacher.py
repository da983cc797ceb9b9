import math

import pytest
import torch
from torch import nn

from autokd.data import load_data
from autokd.models import build_model
from autokd.train.teacher import (
    evaluate,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train_and_save,
    train_classifier,
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


class _Constant(nn.Module):
    """Logits that do not depend on the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_evaluate_counts_and_averages(digits):
    acc, ce = evaluate(_Constant(torch.zeros(10)), digits.test, batch_size=7)
    assert acc == pytest.approx(float((digits.test.labels == 0).float().mean()))  # argmax ties -> 0
    assert ce == pytest.approx(math.log(10), rel=1e-5)
    onehot = torch.full((10,), -1e4)
    onehot[3] = 0
    acc3, _ = evaluate(_Constant(onehot), digits.test)
    assert acc3 == pytest.approx(float((digits.test.labels == 3).float().mean()))
    with pytest.raises(ValueError, match="empty"):
        evaluate(_Constant(torch.zeros(10)), load_data("digits", val_fraction=0.0).val)


def test_training_history_and_learning(digits):
    model = build_model("digits_student", num_classes=10, in_channels=1)
    before, _ = evaluate(model, digits.test)
    seen = []
    history = train_classifier(model, digits, epochs=4, seed=0, progress=False, log=seen.append)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and len(seen) == 4
    assert all(math.isfinite(h[k]) for h in history for k in ("train_loss", "val_acc", "val_loss"))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] < 0.01  # cosine schedule reaches ~0 at the end
    assert evaluate(model, digits.test)[0] > before + 0.2


def test_training_is_reproducible(digits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("digits_student", num_classes=10, in_channels=1)
        train_classifier(model, digits, epochs=1, seed=3, progress=False)
        runs.append(model.fc.weight.detach().clone())
    assert torch.allclose(runs[0], runs[1])


def test_divergence_is_reported(digits):
    model = _Constant(torch.full((10,), float("nan")))
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train_classifier(model, digits, epochs=1, progress=False)


def test_bad_arguments(digits):
    model = build_model("digits_student", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(model, digits, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_classifier(model, digits, epochs=1, batch_size=0)


@pytest.mark.slow
def test_digits_teacher_reaches_good_accuracy(digits):
    # Measured on this machine: 97.5-98.1% test accuracy after 10 epochs (2 seeds), ~6 s alone.
    torch.manual_seed(0)
    model = build_model("digits_teacher", num_classes=10, in_channels=1)
    train_classifier(model, digits, epochs=10, seed=0, progress=False)
    acc, ce = evaluate(model, digits.test)
    assert acc >= 0.94 and ce < 0.25


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path, digits):
    model = build_model("digits_student", num_classes=10, in_channels=1).eval()
    meta = {
        "model": "digits_student",
        "num_classes": 10,
        "in_channels": 1,
        "data": digits.identity,
        "accuracy": 0.5,
        "history": [{"epoch": 1, "loss": 2.0}],
    }
    path = tmp_path / "ckpt" / "student.pt"
    save_checkpoint(str(path), model, meta)
    fresh = build_model("digits_student", num_classes=10, in_channels=1).eval()
    state, meta2 = load_checkpoint(str(path), fresh)
    assert meta2 == meta and set(state) == set(model.state_dict())
    x = digits.test.images[:8]
    assert torch.equal(fresh(x), model(x))
    rebuilt, meta3 = load_model(str(path))
    assert torch.equal(rebuilt(x), model(x)) and meta3["data"] == digits.identity


def test_checkpoint_of_another_model(tmp_path):
    path = str(tmp_path / "t.pt")
    save_checkpoint(
        path,
        build_model("digits_teacher", num_classes=10, in_channels=1),
        {"model": "digits_teacher"},
    )
    with pytest.raises(ValueError, match=r"digits_teacher.*missing keys.*unexpected keys"):
        load_checkpoint(path, build_model("resnet8", num_classes=10, in_channels=1))
    mismatch = r"shape mismatches \(fc.bias: checkpoint \[10\], model \[7\]"
    with pytest.raises(ValueError, match=mismatch):
        load_checkpoint(path, build_model("digits_teacher", num_classes=7, in_channels=1))
    with pytest.raises(ValueError, match="lacks num_classes, in_channels"):
        load_model(path)


def test_foreign_and_bad_checkpoints(tmp_path):
    model = build_model("digits_student", num_classes=10, in_channels=1)
    plain = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, plain)  # DDP-style
    state, meta = load_checkpoint(str(plain), build_model("digits_student", 10, 1))
    assert meta == {} and "fc.weight" in state
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(str(tmp_path / "x.pt"), model, {"model": object()})


def test_train_and_save(tmp_path, digits):
    path = str(tmp_path / "student.pt")
    model, meta = train_and_save("digits_student", digits, 1, path, seed=2, progress=False)
    assert meta["model"] == "digits_student" and meta["data"] == digits.identity
    assert meta["accuracy"] == pytest.approx(evaluate(model, digits.test)[0])
    rebuilt, meta2 = load_model(path)
    assert meta2 == meta
    assert torch.equal(rebuilt(digits.test.images[:4]), model(digits.test.images[:4]))
