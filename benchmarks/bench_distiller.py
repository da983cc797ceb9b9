"""Distiller step overhead: one training step (forward, CE + KD loss, backward) of a CIFAR
ResNet-20 on 32x32 inputs with a Distiller, against the student's own step in the same run.

Offline teacher (features and logits given, as in the search): the overhead is the design's
loss, adapters and hooks, not teacher inference. Teacher tap: layer3 [N, 64, 8, 8] (a
ResNet-56/110 teacher) or [N, 256, 8, 8] (a ResNet32x4 teacher, so an adapter is built).

    pytest benchmarks/bench_distiller.py -s --benchmark-columns=median,iqr,rounds

Each design's test also times the student's own step interleaved with the distiller step
(ROUNDS pairs) and prints the median of the per-pair ratios (also in the JSON's extra_info):
the figure to quote, since a shared machine drifts between separate runs.
"""

import statistics
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autokd.distill import Distiller
from autokd.space import DistillerSpec

BATCH = 64
ROUNDS = 11


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels, 32x32 -> 8x8."""

    def __init__(self, classes=100):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = [Block(cin, c, 1 if i == 0 else 2)] + [Block(c, c, 1) for _ in range(2)]
            layers.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


SPECS = {
    "kd": "kd",
    "cwd": "cwd",
    "fitnet_adapter": "fitnet",
    "searched_heavy": {
        "global_transform": "attention",
        "intra_spatial": "multi-scale",
        "inter_spatial": "channel-wise",
        "feature_distance": "kl",
        "feature_weight": 25,
        "logit_distance": "pearson",
        "temperature": 4,
        "logit_weight": 1,
    },
    "sample_gram_local": {
        "global_transform": "mask",
        "intra_spatial": "local",
        "inter_spatial": "sample-wise",
        "feature_distance": "gram_l2",
        "feature_weight": 5,
        "logit_distance": "kl",
        "temperature": 4,
        "logit_weight": 1,
    },
}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the ratio stable
    yield
    torch.set_num_threads(n)


def _batch():
    torch.manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32), torch.randint(0, 100, (BATCH,))


@pytest.mark.benchmark(group="distiller-step")
def test_student_alone(benchmark):
    model = ResNet20()
    x, y = _batch()

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    benchmark.pedantic(step, rounds=7, warmup_rounds=1)


def _paired(step_a, step_b, rounds):
    """Interleaved timings (a, b, a, b, ...): on a loaded machine, per-round ratios cancel most
    of the drift that separate runs would see."""
    ta, tb = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step_a()
        t1 = time.perf_counter()
        step_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return ta, tb


@pytest.mark.benchmark(group="distiller-step")
@pytest.mark.parametrize("name", list(SPECS))
def test_distiller(benchmark, name):
    spec = DistillerSpec.coerce(SPECS[name])
    model = ResNet20()
    x, y = _batch()
    tc = 256 if name == "fitnet_adapter" else 64
    tf = {"layer3": torch.randn(BATCH, tc, 8, 8).relu()}
    tl = torch.randn(BATCH, 100) * 3
    d = Distiller(
        spec,
        model,
        ["layer3"],
        teacher_shapes={"layer3": (tc, 8, 8), "logits": (100,)},
        example_input=x[:2],
    )

    def student_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def step():
        d.zero_grad(set_to_none=True)
        out = d(x, teacher_features=tf, teacher_logits=tl)
        (F.cross_entropy(out.student_logits, y) + out.loss_kd).backward()

    step()
    student_step()
    ts, td = _paired(student_step, step, ROUNDS)
    ratios = sorted(b / a for a, b in zip(ts, td))
    info = {
        "student_median_ms": 1e3 * statistics.median(ts),
        "distiller_median_ms": 1e3 * statistics.median(td),
        "paired_ratio_median": statistics.median(ratios),
        "paired_ratio_iqr": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
    }
    benchmark.extra_info.update(info)
    print(
        f"\n{name}: student {info['student_median_ms']:.1f} ms, distiller "
        f"{info['distiller_median_ms']:.1f} ms, paired ratio {info['paired_ratio_median']:.3f} "
        f"(IQR {info['paired_ratio_iqr'][0]:.3f}-{info['paired_ratio_iqr'][1]:.3f})"
    )
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)
