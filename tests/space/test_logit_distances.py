"""The logit distances beyond KL and DIST: DKD, MLKD and their logit-standardised variants, each
against a reference written here from the papers' definitions in float64 (probabilities and
explicit sums, not the log-space code of autokd.nn.blocks), with gradients, edge cases, and the
labels that DKD reads travelling through DistillLoss, Distiller and the training loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autokd.distill import Distiller
from autokd.nn import DistillLoss
from autokd.space import LOGIT_DISTANCES, DistillerSpec, SpecError, load_distiller, load_space

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def zscore(z):
    """Per-row z-score with the unbiased std, written out."""
    k = z.shape[1]
    mean = z.sum(1, keepdim=True) / k
    std = (((z - mean) ** 2).sum(1, keepdim=True) / (k - 1)).sqrt()
    return (z - mean) / (std + 1e-7)


def dkd_reference(s, t, y, tau, alpha, beta, standardize=False):
    """Zhao et al. 2022, Eq. (1)-(4): per sample, b = [p_y, 1 - p_y] and p_hat_j = p_j / (1 - p_y)
    over j != y from p = softmax(z / tau); TCKD = KL(b^T || b^S), NCKD = KL(p_hat^T || p_hat^S);
    loss = tau^2 * batch mean of alpha * TCKD + beta * NCKD."""
    if standardize:
        s, t = zscore(s), zscore(t)
    ps, pt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    total = 0.0
    n, k = s.shape
    for i in range(n):
        c = int(y[i])
        bs = torch.stack([ps[i, c], 1 - ps[i, c]])
        bt = torch.stack([pt[i, c], 1 - pt[i, c]])
        tckd = (bt * torch.log(bt / bs)).sum()
        others = [j for j in range(k) if j != c]
        hs = ps[i, others] / (1 - ps[i, c])
        ht = pt[i, others] / (1 - pt[i, c])
        nckd = (ht * torch.log(ht / hs)).sum()
        total = total + alpha * tckd + beta * nckd
    return tau**2 * total / n


def mlkd_reference(s, t, tau, temps, weights=(1.0, 1.0, 1.0), standardize=False):
    """Jin et al. 2023: instance (tau^2 KL), batch (N x N Gram, / N) and class (K x K Gram, / K)
    alignment of softmax(z / T), summed over T in {tau} + temps."""
    if standardize:
        s, t = zscore(s), zscore(t)
    n, k = s.shape
    total = 0.0
    for temp in [tau] + list(temps):
        ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
        inst = sum((pt[i] * torch.log(pt[i] / ps[i])).sum() for i in range(n)) / n * temp**2
        bat = (
            sum(
                (torch.dot(ps[i], ps[j]) - torch.dot(pt[i], pt[j])) ** 2
                for i in range(n)
                for j in range(n)
            )
            / n
        )
        cls = (
            sum(
                (torch.dot(ps[:, a], ps[:, b]) - torch.dot(pt[:, a], pt[:, b])) ** 2
                for a in range(k)
                for b in range(k)
            )
            / k
        )
        total = total + weights[0] * inst + weights[1] * bat + weights[2] * cls
    return total


def logits(n=5, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, dtype=DT, generator=g).requires_grad_(True)
    t = 3 * torch.randn(n, k, dtype=DT, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return s, t, y


def assert_same_value_and_grad(ours, theirs, s):
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12), (ours.item(), theirs.item())
    (ga,) = torch.autograd.grad(ours, s)
    (gb,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ga, gb, rtol=1e-8, atol=1e-12), (ga - gb).abs().max()


# -- DKD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 8.0])
@pytest.mark.parametrize("n,k", [(5, 7), (1, 10), (6, 2), (3, 100)])
def test_dkd_matches_reference(tau, n, k):
    s, t, y = logits(n, k, seed=n * 1000 + k)
    d = LOGIT_DISTANCES.build({"key": "dkd", "kwargs": {"alpha": 1.5, "beta": 8}})
    assert_same_value_and_grad(d(s, t, tau, y), dkd_reference(s, t, y, tau, 1.5, 8.0), s)


def test_dkd_std_matches_reference():
    s, t, y = logits(6, 9, seed=3)
    d = LOGIT_DISTANCES.build({"key": "dkd_std", "kwargs": {"alpha": 2, "beta": 3}})
    assert_same_value_and_grad(d(s, t, 2.0, y), dkd_reference(s, t, y, 2.0, 2.0, 3.0, True), s)


def test_dkd_gradcheck():
    s, t, y = logits(3, 5, seed=4)
    d = LOGIT_DISTANCES.build("dkd")
    assert torch.autograd.gradcheck(lambda z: d(z, t, 4.0, y), (s,))
    ds = LOGIT_DISTANCES.build("dkd_std")
    assert torch.autograd.gradcheck(lambda z: ds(z, t, 2.0, y), (s,))


def test_dkd_decomposes_kd():
    # the paper's identity KD = TCKD + (1 - p_y^T) NCKD, per sample (a batch of one)
    s, t, y = logits(1, 8, seed=5)
    d = LOGIT_DISTANCES.build("dkd")
    for tau in (1.0, 4.0):
        tckd, nckd = d.parts(s, t, tau, y)
        p_target = torch.softmax(t / tau, 1)[0, y[0]]
        kd = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
        kd = kd * tau**2
        assert torch.allclose(tckd + (1 - p_target) * nckd, kd, rtol=1e-10)


def test_dkd_two_classes_has_no_non_target_term():
    s, t, y = logits(4, 2, seed=6)
    d = LOGIT_DISTANCES.build({"key": "dkd", "kwargs": {"alpha": 1, "beta": 8}})
    _, nckd = d.parts(s, t, 4.0, y)
    assert nckd.item() == 0.0
    kd = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(d(s, t, 4.0, y), kd, rtol=1e-10)  # with K = 2, TCKD is KD


def test_dkd_is_zero_when_student_equals_teacher_and_finite_for_extreme_logits():
    _, t, y = logits(4, 6, seed=7)
    d = LOGIT_DISTANCES.build("dkd")
    assert d(t.clone().requires_grad_(True), t, 4.0, y).abs().item() < 1e-12
    big = torch.tensor([[300.0, -300.0, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    out = d(big, big.detach().flip(1), 1.0, torch.tensor([0, 1]))
    (g,) = torch.autograd.grad(out, big)
    assert torch.isfinite(out) and torch.isfinite(g).all()


def test_dkd_half_precision_inputs_compute_in_float32():
    s, t, y = logits(4, 10, seed=8)
    d = LOGIT_DISTANCES.build("dkd")
    ref = d(s.detach(), t, 4.0, y)
    low = d(s.detach().to(torch.bfloat16), t.to(torch.bfloat16), 4.0, y)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item()) + 1e-3


@pytest.mark.parametrize(
    "labels,match",
    [
        (None, r"needs the ground-truth labels; pass labels="),
        (
            torch.tensor([0.0, 1.0, 2.0]),
            r"expected labels as an integer tensor of class indices \[N\], got torch.float32",
        ),
        (
            torch.tensor([0, 1]),
            r"expected labels of shape \[3\] \(one class index per sample\), got \[2\]",
        ),
        (torch.tensor([0, 1, 7]), r"expected labels in \[0, 6\], got values from 0 to 7"),
        (torch.tensor([-1, 1, 2]), r"expected labels in \[0, 6\], got values from -1 to 2"),
    ],
)
def test_dkd_label_mistakes_are_named(labels, match):
    loss = DistillLoss(load_distiller("dkd"))
    s, t, _ = logits(3, 7)
    with pytest.raises(ValueError, match=match):
        loss(student_logits=s, teacher_logits=t, labels=labels)


def test_dkd_needs_two_classes_and_valid_kwargs():
    d = LOGIT_DISTANCES.build("dkd")
    with pytest.raises(ValueError, match=r"with K >= 2 classes, got \[3, 1\]"):
        d(torch.randn(3, 1), torch.randn(3, 1), 1.0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(SpecError, match=r"dkd beta: expected a finite number >= 0, got -1"):
        DistillerSpec.from_dict({"logit_distance": {"key": "dkd", "kwargs": {"beta": -1}}})
    with pytest.raises(SpecError, match=r"unknown kwargs \['gamma'\] for 'dkd'; valid: alpha"):
        DistillerSpec.from_dict({"logit_distance": {"key": "dkd", "kwargs": {"gamma": 1}}})


def test_only_dkd_needs_labels():
    keys = LOGIT_DISTANCES.keys()
    needing = sorted(k for k in keys if LOGIT_DISTANCES.get(k).needs_labels)
    assert needing == ["dkd", "dkd_std"]
    # every other distance still takes (s, t, tau) alone
    s, t, _ = logits(3, 7)
    for key in keys:
        if key not in needing:
            spec = DistillerSpec.from_dict({"logit_distance": key})
            out = DistillLoss(spec)(student_logits=s, teacher_logits=t)
            assert torch.isfinite(out.loss_kd)


# -- DKD's warm-up --------------------------------------------------------------------------


def test_dkd_spec_is_the_published_cifar100_setting_with_its_epoch_warm_up():
    spec = load_distiller("dkd")
    assert spec.logit_distance.key == "dkd" and spec.temperature == 4 and spec.logit_weight == 1
    d = LOGIT_DISTANCES.build(spec.logit_distance.as_config())
    assert (d.alpha, d.beta) == (1.0, 8.0)
    loss = DistillLoss(spec)
    # DKD: min(epoch / 20, 1) for epochs 1..240, constant within an epoch
    steps_per_epoch = 7
    total = 240 * steps_per_epoch
    for epoch in range(1, 241):
        for j in range(steps_per_epoch):
            loss.set_progress(((epoch - 1) * steps_per_epoch + j) / total)
            expect = min(epoch / 20, 1.0)
            assert loss.weight_factor() == pytest.approx(expect, abs=1e-12), (epoch, j)


def test_warm_up_stages_validation():
    with pytest.raises(SpecError, match=r"stages: expected an integer >= 0 \(0: continuous\)"):
        DistillerSpec.from_dict({"schedule": {"key": "warm-up", "kwargs": {"stages": 2.5}}})


def test_ls_dkd_is_the_released_run():
    # --logit-stand --kd-weight 9 on the DKD config: alpha 9, beta 81, tau 4, z-scored logits
    spec = load_distiller("ls_dkd")
    s, t, y = logits(5, 7, seed=9)
    loss = DistillLoss(spec)
    loss.set_progress(0.5)  # past the warm-up
    ours = loss(student_logits=s, teacher_logits=t, labels=y).loss_kd
    assert_same_value_and_grad(ours, dkd_reference(s, t, y, 4.0, 9.0, 81.0, True), s)


# -- MLKD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(5, 7), (1, 4), (4, 2)])
def test_mlkd_matches_reference(n, k):
    s, t, _ = logits(n, k, seed=10 + n)
    d = LOGIT_DISTANCES.build({"key": "mlkd", "kwargs": {"instance": 1, "batch": 2, "klass": 0.5}})
    ref = mlkd_reference(s, t, 4.0, (2, 3, 5, 6), (1.0, 2.0, 0.5))
    assert_same_value_and_grad(d(s, t, 4.0), ref, s)


def test_mlkd_std_and_custom_temperatures_match_reference():
    s, t, _ = logits(4, 6, seed=11)
    d = LOGIT_DISTANCES.build({"key": "mlkd_std", "kwargs": {"temperatures": [1.5]}})
    assert_same_value_and_grad(d(s, t, 2.0), mlkd_reference(s, t, 2.0, (1.5,), standardize=True), s)
    spec = DistillerSpec.from_dict(
        {"logit_distance": {"key": "mlkd", "kwargs": {"temperatures": [2, 3]}}}
    )
    assert hash(spec) == hash(DistillerSpec.from_yaml(spec.to_yaml()))  # list kwargs hash


def test_mlkd_gradcheck_and_zero_at_match():
    s, t, _ = logits(3, 4, seed=12)
    d = LOGIT_DISTANCES.build("mlkd")
    assert torch.autograd.gradcheck(lambda z: d(z, t, 4.0), (s,))
    assert d(t.clone(), t, 4.0).abs().item() < 1e-12


# -- the labels reach the loss from Distiller and the training loop ---------------------------


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def test_distiller_passes_labels_to_dkd():
    s, t = Tiny(0), Tiny(1)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    d = Distiller("dkd", s, teacher=t)
    assert d.needs_labels and not Distiller("kd", s, teacher=t).needs_labels
    d.set_progress(1.0)
    out = d(x, labels=y)
    expect = dkd_reference(s(x).double(), t(x).double(), y, 4.0, 1.0, 8.0)
    assert torch.allclose(out.loss_kd.double(), expect, rtol=1e-5)
    out.loss_kd.backward()
    assert s.fc.weight.grad is not None and s.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"design 'dkd' uses the logit distance 'dkd', which need"):
        d(x)


def test_training_loop_feeds_labels_to_dkd():
    from types import SimpleNamespace

    from autokd.train.loop import TrainConfig, train_student

    g = torch.Generator().manual_seed(0)
    train = SimpleNamespace(
        images=torch.randn(24, 1, 8, 8, generator=g), labels=torch.arange(24) % 5
    )
    s, t = Tiny(0), Tiny(1)
    d = Distiller("dkd", s, teacher=t)
    before = [p.detach().clone() for p in s.parameters()]
    cfg = TrainConfig(epochs=2, batch_size=8, offline=False)
    res = train_student(d, s, SimpleNamespace(train=train), cfg)
    assert math.isfinite(res.final_loss) and res.steps == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, s.parameters()))


def test_extended_space_holds_the_new_logit_distances():
    space = load_space("extended")
    options = next(lv.options for lv in space.levels if lv.name == "logit_distance")
    assert {"dkd", "dkd_std", "kl_std", "mlkd", "mlkd_std"} <= set(options)
    for key in ("dkd", "dkd_std", "mlkd", "mlkd_std"):
        design = {
            "feature_distance": "none",
            "logit_distance": key,
            "temperature": "4",
            "logit_weight": "1",
            "schedule": "warm-up",
        }
        spec = space.spec_from_design(design)
        assert space.design_from_spec(spec) == design
        s, t, y = logits(4, 6)
        out = DistillLoss(spec)(student_logits=s, teacher_logits=t, labels=y)
        assert torch.isfinite(out.loss_kd)
