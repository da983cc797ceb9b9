"""The measurements behind the mixed-precision and memory-format choices
(autokd/train/precision.py, autokd.nn.blocks.DistillLoss):

1. A ResNet-20 training step (forward, CE, backward, SGD step; [64, 3, 32, 32]) in fp32 and
   bf16 autocast, with contiguous inputs, channels-last inputs, and a channels-last model and
   inputs: whether channels-last helps, and whether converting the parameters adds anything
   (the masked fused optimizer steps of a sparse proxy need contiguous parameters).
2. DistillLoss forward + backward on a bfloat16 student (what autocast hands over): cast once to
   float32 and run with autocast off (what autokd does) against the kernels run on bfloat16
   inputs, with the loss's relative error against float32 inputs recorded for both.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_precision.py -s

Each test times its variants interleaved (ROUNDS rounds) and records medians and ratios to the
first variant in extra_info; figures: benchmarks/results/throughput.md.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from autokd.models import build_model
from autokd.nn.blocks import DistillLoss
from autokd.space import DistillerSpec, load_distiller

ROUNDS = 5
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the ratios stable
    yield
    torch.set_num_threads(n)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _interleaved(fns: dict, device: str, rounds: int, per_round: int = 3) -> dict:
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            _sync(device)
            times[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def _step(precision: str, layout: str, device: str):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=100, in_channels=3).to(device)
    if layout == "cl_model":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (64,), generator=g).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        xx = x.contiguous(memory_format=torch.channels_last) if layout != "contiguous" else x
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(xx)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@pytest.mark.benchmark(group="precision training step")
@pytest.mark.parametrize("device", DEVICES)
def test_training_step_precision_and_layout(benchmark, device):
    variants = {
        f"{p}_{lay}": _step(p, lay, device)
        for p in ("fp32", "bf16")
        for lay in ("contiguous", "cl_input", "cl_model")
    }
    rounds = 1 if benchmark.disabled else ROUNDS
    med = _interleaved(variants, device, rounds, 1 if benchmark.disabled else 3)
    base = med["fp32_contiguous"]
    for k, t in med.items():
        benchmark.extra_info[f"{k}_ms"] = 1e3 * t
        benchmark.extra_info[f"{k}_vs_fp32_contiguous"] = base / t
        print(f"\n{device} resnet20 step {k}: {1e3 * t:.1f} ms ({base / t:.2f}x fp32 contiguous)")
    benchmark.pedantic(variants["bf16_cl_input"], rounds=1 if benchmark.disabled else 3)


HEAVY = {
    "global_transform": "attention",
    "intra_spatial": "multi-scale",
    "inter_spatial": "channel-wise",
    "feature_distance": "kl",
    "feature_weight": 25,
    "logit_distance": "pearson",
    "temperature": 4,
    "logit_weight": 1,
}


@pytest.mark.benchmark(group="precision distill loss")
@pytest.mark.parametrize("design", ["kd", "cwd", "heavy"])
def test_distill_loss_cast_once_or_bf16(benchmark, design):
    spec = DistillerSpec.coerce(HEAVY) if design == "heavy" else load_distiller(design)
    loss = DistillLoss(spec, [(64, 64)])
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(64, 64, 8, 8, generator=g), torch.randn(64, 64, 8, 8, generator=g)
    ls, lt = torch.randn(64, 100, generator=g), torch.randn(64, 100, generator=g)
    fsb = fs.bfloat16().requires_grad_()
    lsb = ls.bfloat16().requires_grad_()

    def cast_once():  # what DistillLoss does with half inputs: float32, autocast off
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss([fsb], [ft], lsb, [lt])
        out.loss_kd.backward()

    def bf16_kernels():  # the kernels on bfloat16 inputs (teacher cast to the student's dtype)
        with torch.autocast("cpu", enabled=False):
            out = loss._forward([fsb], [ft.bfloat16()], lsb, [lt.bfloat16()], None)
        out.loss_kd.float().backward()

    rounds = 1 if benchmark.disabled else 30
    med = _interleaved({"cast_once": cast_once, "bf16": bf16_kernels}, "cpu", rounds, 1)
    with torch.no_grad():
        ref = float(loss([fs], [ft], ls, [lt]).loss_kd)
        a = float(loss([fsb.float()], [ft], lsb.float(), [lt]).loss_kd)
        b = float(loss._forward([fsb], [ft.bfloat16()], lsb, [lt.bfloat16()], None).loss_kd)
    info = {
        "cast_once_ms": 1e3 * med["cast_once"],
        "bf16_ms": 1e3 * med["bf16"],
        "cast_once_rel_error": abs(a - ref) / abs(ref),
        "bf16_rel_error": abs(b - ref) / abs(ref),
    }
    benchmark.extra_info.update(info)
    print(
        f"\n{design}: cast once {info['cast_once_ms']:.2f} ms (rel. error "
        f"{info['cast_once_rel_error']:.1e}), bf16 kernels {info['bf16_ms']:.2f} ms (rel. error "
        f"{info['bf16_rel_error']:.1e})"
    )
    benchmark.pedantic(cast_once, rounds=1 if benchmark.disabled else 10)
