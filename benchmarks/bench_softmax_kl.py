"""softmax_kl: autokd kernel vs the eager and the torch.compile'd reference.

Cases are the views one kernel serves in real distillation: logits [128, 100] and [256, 1000];
features [N, C, H, W] viewed channel-wise ([N*C, H*W]), sample-wise ([N, C*H*W]) and as the
channel view f.view(N, C, H*W).transpose(0, 1) ([C, N, H*W], not contiguous). Each case
records in benchmark.extra_info the peak bytes allocated by one call above what was live
before, and for the forward the bytes read per second as a fraction of a plain copy, plus (CPU, autokd) the fraction it would reach with
its inputs in cache (common.in_cache_fraction), which tells memory-bound from compute-bound.

    pytest -o python_files='bench_*.py' benchmarks/bench_softmax_kl.py --benchmark-json=kl.json
"""
import pytest
import torch

import autokd
from autokd.reference import softmax_kl as reference
from common import bandwidth_fraction, in_cache_fraction
from common import peak_memory_bytes as peak_bytes

TAU = 4.0
HAS_CUDA = torch.cuda.is_available() and autokd.ops.WITH_CUDA

# Every (case, grad mode) is its own specialised graph: more than dynamo's default cache
# allows, which would silently fall back to eager.
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)


def _features(shape, view):
    def make(device):
        n, c, h, w = shape
        f = torch.randn(shape, device=device)
        g = torch.randn(shape, device=device)
        if view == "channelwise":
            return f.view(n * c, h * w), g.view(n * c, h * w)
        if view == "samplewise":
            return f.view(n, -1), g.view(n, -1)
        return f.view(n, c, h * w).transpose(0, 1), g.view(n, c, h * w).transpose(0, 1)

    return make


CASES = {
    "logits-128x100": lambda d: (torch.randn(128, 100, device=d), torch.randn(128, 100, device=d)),
    "logits-256x1000": lambda d: (torch.randn(256, 1000, device=d),
                                  torch.randn(256, 1000, device=d)),
    "64x64x32x32-channelwise": _features((64, 64, 32, 32), "channelwise"),
    "64x64x32x32-samplewise": _features((64, 64, 32, 32), "samplewise"),
    "64x64x32x32-channel_view": _features((64, 64, 32, 32), "channel_view"),
    "64x256x8x8-channel_view": _features((64, 256, 8, 8), "channel_view"),
    "8x512x28x28-channelwise": _features((8, 512, 28, 28), "channelwise"),
}
PROVIDERS = ["eager", "compiled", "autokd"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
_compiled = []


def _fn(provider):
    if provider == "autokd":
        return autokd.ops.softmax_kl
    if provider == "eager":
        return reference
    if not _compiled:
        _compiled.append(torch.compile(reference, dynamic=False))
    return _compiled[0]


@pytest.mark.benchmark(max_time=0.5, min_rounds=5)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_kl(benchmark, case, mode, provider, device):
    s, t = CASES[case](device)
    fn = _fn(provider)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    benchmark.group = f"softmax_kl {device} {case} {mode}"
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
        median = benchmark.stats.stats.median
        benchmark.extra_info["copy_fraction"] = bandwidth_fraction(
            2 * s.numel() * s.element_size(), median, device=device)
        if device == "cpu" and provider == "autokd":
            # Below 0.5, this op's arithmetic (two exps per element pair), not memory, bounds
            # its forward on this core (see common.in_cache_fraction).
            benchmark.extra_info["in_cache_fraction"] = in_cache_fraction(
                lambda a, b: fn(a, b, TAU), (s, t), 2 * s.numel() * s.element_size())
