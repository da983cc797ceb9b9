"""pearson (DIST inter + intra): autokd kernel vs the eager and the torch.compile'd reference.

Logits of real distillation: [128, 100] (CIFAR-100) and [256, 1000] (ImageNet). The loss is
inter + intra (DIST weights them beta = gamma = 1 by default). benchmark.extra_info holds the
peak bytes of one call above what was live before, and for the forward the bytes read per
second as a fraction of a plain copy, plus (CPU, autokd) the fraction it would reach with
its inputs in cache (common.in_cache_fraction), which tells memory-bound from compute-bound.

    pytest -o python_files='bench_*.py' benchmarks/bench_pearson.py --benchmark-json=pe.json
"""
import pytest
import torch

import autokd
from autokd.reference import pearson as reference
from common import bandwidth_fraction, in_cache_fraction
from common import peak_memory_bytes as peak_bytes

TAU = 4.0
HAS_CUDA = torch.cuda.is_available() and autokd.ops.WITH_CUDA

for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)

SHAPES = {"logits-128x100": (128, 100), "logits-256x1000": (256, 1000)}
PROVIDERS = ["eager", "compiled", "autokd"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
_compiled = []


def _loss(fn):
    def loss(s, t, tau):
        inter, intra = fn(s, t, tau)
        return inter + intra

    return loss


def _fn(provider):
    if provider == "autokd":
        return _loss(autokd.ops.pearson)
    if provider == "eager":
        return _loss(reference)
    if not _compiled:
        _compiled.append(torch.compile(_loss(reference), dynamic=False))
    return _compiled[0]


@pytest.mark.benchmark(max_time=0.5, min_rounds=5)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_pearson(benchmark, case, mode, provider, device):
    s = torch.randn(SHAPES[case], device=device)
    t = torch.randn(SHAPES[case], device=device)
    fn = _fn(provider)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    benchmark.group = f"pearson {device} {case} {mode}"
    if mode == "fwd":

        def call():
            with torch.no_grad():
                fn(s, t, TAU)
            sync()

        measured = call
    else:
        s.requires_grad_()

        def measured():
            fn(s, t, TAU).backward()
            sync()

        def call():
            s.grad = None
            measured()

    call()  # warm-up (and compilation for the compiled reference)
    benchmark(call)
    s.grad = None
    benchmark.extra_info["peak_bytes"] = peak_bytes(measured, device)
    benchmark.extra_info["input_bytes"] = 2 * s.numel() * s.element_size()
    if mode == "fwd" and benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["copy_fraction"] = bandwidth_fraction(
            2 * s.numel() * s.element_size(), benchmark.stats.stats.median, device=device)
        if device == "cpu" and provider == "autokd":
            # Below 0.5, arithmetic (two exps and the moments per element pair), not memory,
            # bounds this forward on this core (see common.in_cache_fraction).
            benchmark.extra_info["in_cache_fraction"] = in_cache_fraction(
                lambda a, b: fn(a, b, TAU), (s, t), 2 * s.numel() * s.element_size())
