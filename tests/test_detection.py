"""Detectors and segmenters as students of autokd.Distiller: randomly initialised torchvision
Faster R-CNN (FPN) and DeepLabV3 on synthetic images (nothing downloaded), feature-only designs
on backbone/FPN taps. The KD loss is finite, its gradient reaches the student and never the
teacher, the model's own loss still trains, and a logit term is a clear error. The example in
examples/detection_distill.py runs here with small sizes."""

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import segmentation

from autokd.distill import Distiller

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _example():
    spec = importlib.util.spec_from_file_location(
        "detection_distill", ROOT / "examples" / "detection_distill.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g for g in grads if g is not None]


def _step_changes_own_loss(d, params, own_loss, kd_loss, recompute):
    """One SGD step on own + KD; the model's own loss on the same batch (same random draws)
    moves."""
    before = float(own_loss.detach())
    opt = torch.optim.SGD(params, lr=0.01)
    opt.zero_grad()
    (own_loss + kd_loss).backward()
    opt.step()
    after = float(recompute().detach())
    assert torch.isfinite(torch.tensor(after)) and after != before, (before, after)


def test_faster_rcnn_fpn_student_distils_on_fpn_levels():
    ex = _example()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    student, teacher = ex.build_models(SIZE, 3)
    images, targets = ex.synthetic_batch(2, SIZE, 3, g)
    d = Distiller(
        "cwd",
        student,
        ex.STUDENT_TAPS,
        teacher_taps=ex.TEACHER_TAPS,
        teacher=teacher,
        example_input=images,
    )
    assert not any(p is q for p in d.parameters() for q in teacher.parameters())
    d.train()
    torch.manual_seed(1)  # the detector samples proposals at random: same draws before and after
    out = d(images, targets)
    assert out.student_logits is None and set(out.student_output) >= {
        "loss_classifier",
        "loss_objectness",
    }
    assert out.student_features["backbone:0"].shape[1] == 256
    assert torch.isfinite(out.loss_kd) and out.loss_kd > 0
    fpn = list(student.backbone.fpn.parameters())
    assert any(g.abs().sum() > 0 for g in _grads(out.loss_kd, fpn))
    assert all(p.grad is None for p in teacher.parameters())
    own = sum(out.student_output.values())

    def recompute():
        torch.manual_seed(1)
        return sum(d(images, targets).student_output.values())

    _step_changes_own_loss(d, list(d.parameters()), own, out.loss_kd, recompute)


def test_deeplabv3_student_distils_on_backbone_dict_output():
    torch.manual_seed(0)
    student = segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    teacher = segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )
    x = torch.randn(2, 3, SIZE, SIZE)
    masks = torch.randint(0, 3, (2, SIZE, SIZE))
    # "backbone:out": entry "out" of the dict the backbone returns; 960 vs 2048 channels and
    # 4x4 vs 8x8 maps: an adapter and pooling bridge them
    d = Distiller("cwd", student, ["backbone:out"], teacher=teacher, example_input=x)
    assert d.loss.pairs[0].adapter.conv.weight.shape == (2048, 960, 1, 1)
    d.train()
    out = d(x)
    assert out.student_logits is None and out.student_output["out"].shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(out.loss_kd) and out.loss_kd > 0
    assert any(g.abs().sum() > 0 for g in _grads(out.loss_kd, list(student.backbone.parameters())))
    own = F.cross_entropy(out.student_output["out"], masks)
    _step_changes_own_loss(
        d,
        list(d.parameters()),
        own,
        out.loss_kd,
        lambda: F.cross_entropy(d(x).student_output["out"], masks),
    )


def test_a_logit_term_on_a_student_without_class_logits_is_a_clear_error():
    torch.manual_seed(0)
    student = segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(
        ValueError,
        match=r"design 'kd' has a logit term \('kl'\), but the student "
        r"returns OrderedDict with keys \['out'\], not class "
        r"logits \[N, K\].*logit_distance none",
    ):
        Distiller("kd", student, teacher=student, example_input=x)
    # without an example input the first forward says the same
    d = Distiller("kd", student, teacher=student)
    with pytest.raises(ValueError, match=r"has a logit term \('kl'\), but the student returns"):
        d(x)


def test_detection_example_runs():
    history = _example().main(["--steps", "2", "--image-size", str(SIZE), "--batch", "2"])
    assert len(history) == 2
    assert all(torch.isfinite(torch.tensor([h["detector"], h["kd"]])).all() for h in history)
