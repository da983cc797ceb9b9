"""Distiller on real (tiny) models: hooks, adapters, online and offline teachers, multi-layer
and multi-teacher train-free weights against a hand computation."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from autokd.distill import Distiller
from autokd.space import DistillerSpec

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, c1, c2, stride2, classes=5):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=stride2, padding=1), nn.ReLU())
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


def student():
    return Net(4, 6, 2)  # layer2: [N, 6, 4, 4] on 8x8


def teacher(seed=1, c1=8, c2=10):
    torch.manual_seed(seed)
    return Net(c1, c2, 1)  # layer2: [N, 10, 8, 8]


def images(n=4):
    return torch.randn(n, 3, 8, 8)


SPEC = DistillerSpec.from_dict(
    {
        "global_transform": "attention",
        "intra_spatial": "multi-scale",
        "inter_spatial": "channel-wise",
        "feature_distance": "kl",
        "feature_weight": 5,
        "logit_distance": "pearson",
        "temperature": 4,
        "logit_weight": 0.5,
    }
)


def test_online_builds_adapters_and_trains_student_and_adapters_only():
    s, t = student(), teacher()
    x = images()
    d = Distiller(SPEC, s, ["layer2"], teacher=t, example_input=x[:2])
    names = {n for n, _ in d.named_parameters()}
    assert any(n.startswith("loss.pairs.0.adapter.conv") for n in names)
    assert not any(p is q for p in d.parameters() for q in t.parameters())
    assert d.loss.pairs[0].adapter.conv.weight.shape == (10, 6, 1, 1)
    out = d(x)
    assert out.student_features["layer2"].shape == (4, 6, 4, 4)
    assert out.teacher_features[0]["layer2"].shape == (4, 10, 8, 8)
    assert torch.allclose(out.loss_kd, out.loss_feature + out.loss_logit)
    out.loss_kd.backward()
    assert d.loss.pairs[0].adapter.conv.weight.grad is not None
    assert s.layer2[0].weight.grad is not None
    assert all(p.grad is None for p in t.parameters())
    assert not t.training


def test_offline_equals_online():
    s, t = student(), teacher()
    x = images()
    online = Distiller(SPEC, s, ["layer2"], teacher=t, example_input=x[:2])
    shapes = {"layer2": (10, 8, 8), "logits": (5,)}
    offline = Distiller(
        SPEC, copy.deepcopy(s), ["layer2"], teacher_shapes=shapes, example_input=x[:2]
    )
    offline.load_state_dict(online.state_dict())
    with torch.no_grad():
        t_logits = t(x)
        feats = {}
        h = t.layer2.register_forward_hook(lambda m, i, o: feats.__setitem__("layer2", o))
        t(x)
        h.remove()
    torch.manual_seed(3)
    a = online(x)
    torch.manual_seed(3)
    b = offline(x, teacher_features=feats, teacher_logits=t_logits)
    assert torch.allclose(a.loss_kd, b.loss_kd, rtol=1e-6)
    assert torch.allclose(a.loss_feature, b.loss_feature, rtol=1e-6)


def test_logit_only_and_no_kd():
    s, t = student(), teacher()
    x = images()
    d = Distiller("kd", s, teacher=t)
    out = d(x)
    assert out.loss_feature.item() == 0 and out.loss_logit.item() > 0
    assert len(list(d.adapter_parameters())) == 0
    d = Distiller("none", s)
    out = d(x)
    assert out.loss_kd.item() == 0 and out.student_logits.shape == (4, 5)


def hand_entropy(t):
    x = t.reshape(t.shape[0], -1).double().numpy()
    vals = []
    for row in x:
        p = np.exp(row - row.max())
        p /= p.sum()
        vals.append(-(p * np.log(p)).sum() / math.log(len(row)))
    return float(np.mean(vals))


def hand_cka(a, b):
    x = a.reshape(a.shape[0], -1).double().numpy()
    y = b.reshape(b.shape[0], -1).double().numpy()
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, lg):
        return np.trace(k @ h @ lg @ h) / (n - 1) ** 2

    k, lg = x @ x.T, y @ y.T
    return hsic(k, lg) / math.sqrt(hsic(k, k) * hsic(lg, lg))


def hand_gram_l2(a, b):
    x = a.reshape(a.shape[0], -1).double().numpy()
    y = b.reshape(b.shape[0], -1).double().numpy()
    gx, gy = x @ x.T, y @ y.T
    return float(((gx / np.linalg.norm(gx) - gy / np.linalg.norm(gy)) ** 2).sum())


SP_SPEC = DistillerSpec.from_dict(
    {"inter_spatial": "sample-wise", "feature_distance": "gram_l2", "feature_weight": 25}
)


def test_multi_layer_train_free_weights_match_hand_computation():
    s, t = student(), teacher()
    x = images(5)
    d = Distiller(SP_SPEC, s, ["layer1", "layer2"], teacher=t, example_input=x[:2])
    out = d(x)
    sf, tf = out.student_features, out.teacher_features[0]
    raw = [hand_entropy(tf[k]) * hand_cka(sf[k].detach(), tf[k]) for k in ("layer1", "layer2")]
    mu = np.array(raw) / sum(raw)
    assert np.allclose(out.mu.numpy(), mu, rtol=1e-4)
    expect = 25 * sum(
        m * hand_gram_l2(sf[k].detach(), tf[k]) for m, k in zip(mu, ("layer1", "layer2"))
    )
    assert math.isclose(out.loss_feature.item(), expect, rel_tol=1e-4)


def test_multi_teacher_weights_and_logits_match_hand_computation():
    s = student()
    teachers = [teacher(1), teacher(2, c1=5, c2=7)]
    x = images(6)
    spec = SP_SPEC.replace(logit_distance="kl", temperature=2, logit_weight=0.5)
    d = Distiller(
        spec,
        s,
        ["layer2"],
        teacher_taps=[["layer2"], ["layer1"]],
        teacher=teachers,
        example_input=x[:2],
    )
    out = d(x)
    f = out.student_features["layer2"].detach()
    tfs = [out.teacher_features[0]["layer2"], out.teacher_features[1]["layer1"]]
    raw = [hand_entropy(t) * hand_cka(f, t) for t in tfs]
    mu = np.array(raw) / sum(raw)
    assert np.allclose(out.mu.numpy(), mu, rtol=1e-4)
    expect_f = 25 * sum(m * hand_gram_l2(f, t) for m, t in zip(mu, tfs))
    assert math.isclose(out.loss_feature.item(), expect_f, rel_tol=1e-4)
    ls = out.student_logits.detach().double()
    kls = []
    for tl in out.teacher_logits:
        p = torch.softmax(tl.double() / 2, 1)
        kls.append(4 * (p * (p.log() - torch.log_softmax(ls / 2, 1))).sum(1).mean().item())
    assert math.isclose(out.loss_logit.item(), 0.5 * sum(kls) / 2, rel_tol=1e-5)
    # offline: a list of feature dicts and a list of logits, shapes from the store schema
    shapes = [{"layer2": (10, 8, 8), "logits": (5,)}, {"layer1": (5, 8, 8), "logits": (5,)}]
    off = Distiller(
        spec,
        copy.deepcopy(s),
        ["layer2"],
        teacher_taps=[["layer2"], ["layer1"]],
        teacher_shapes=shapes,
        example_input=x[:2],
    )
    off.load_state_dict(d.state_dict())
    b = off(x, teacher_features=out.teacher_features, teacher_logits=out.teacher_logits)
    assert torch.allclose(b.loss_kd, out.loss_kd, rtol=1e-6)


def test_mean_and_sum_layer_weighting():
    s, t = student(), teacher()
    x = images()
    outs = {}
    for mode in ("mean", "sum"):
        d = Distiller(
            SP_SPEC.replace(layer_weighting=mode),
            s,
            ["layer1", "layer2"],
            teacher=t,
            example_input=x[:2],
        )
        outs[mode] = d(x)
    assert torch.allclose(outs["mean"].mu, torch.tensor([0.5, 0.5]))
    assert torch.allclose(outs["sum"].loss_feature, 2 * outs["mean"].loss_feature)


def test_set_progress_reaches_the_schedule():
    s, t = student(), teacher()
    x = images()
    d = Distiller(
        SPEC.replace(schedule="early-stop"), s, ["layer2"], teacher=t, example_input=x[:2]
    )
    assert d(x).loss_kd.item() != 0
    d.set_progress(0.9)
    assert d(x).loss_kd.item() == 0


def test_errors():
    s, t = student(), teacher()
    x = images()
    with pytest.raises(
        ValueError,
        match=r"student: 'layer3' names no module of Net; did you mean "
        r"'layer2', 'layer1'.*Module paths: layer1, layer2, fc",
    ):
        Distiller(SPEC, s, ["layer3"], teacher=t, example_input=x[:2])
    with pytest.raises(ValueError, match="example_input is needed"):
        Distiller(SPEC, s, ["layer2"], teacher=t)
    with pytest.raises(ValueError, match=r"teacher_shapes\[0\] lacks tap 'layer2'"):
        Distiller(SPEC, s, ["layer2"], teacher_shapes={"layer1": (8, 8, 8)}, example_input=x[:2])
    with pytest.raises(ValueError, match="distils features; give student_taps"):
        Distiller(SPEC, s, [], teacher=t, example_input=x[:2])
    d = Distiller(SPEC, s, ["layer2"], teacher_shapes={"layer2": (10, 8, 8)}, example_input=x[:2])
    with pytest.raises(ValueError, match="needs teacher logits"):
        d(x, teacher_features={"layer2": torch.randn(4, 10, 8, 8)})
