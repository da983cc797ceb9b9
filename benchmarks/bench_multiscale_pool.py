"""multiscale_pool: autokd kernel vs the eager and the torch.compile'd reference.

Shapes are intermediate features of real distillation pairs; grids (1, 2, 4) are the search
space's multi-scale transform. Each case records, in benchmark.extra_info: peak memory of one
call above what was live before (benchmarks/common.py), the part of it beyond the output and
input gradient (workspace_bytes), and for the forward the bytes moved per second as a
fraction of a plain copy of the same bytes on the same machine.

    pytest -o python_files='bench_*.py' benchmarks/bench_multiscale_pool.py \
        --benchmark-json=bench.json           # CPU; add -k cuda for the CUDA cases only
"""
import pytest
import torch

import autokd
from autokd.ops import multiscale_pool
from autokd.reference import multiscale_pool as reference
from common import bandwidth_fraction, peak_memory_bytes

GRIDS = (1, 2, 4)
SHAPES = [(64, 64, 32, 32), (64, 256, 8, 8), (8, 512, 28, 28)]
HAS_CUDA = torch.cuda.is_available() and autokd.ops.WITH_CUDA
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]

# Every (device, shape, grad mode) is its own specialised graph of the same reference code:
# more than dynamo's default cache allows, which would silently fall back to eager.
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)

_compiled = {}


def provider_fn(provider):
    if provider == "autokd":
        return multiscale_pool
    if provider == "eager":
        return reference
    if provider not in _compiled:
        _compiled[provider] = torch.compile(reference, dynamic=False)
    return _compiled[provider]


def make_call(provider, mode, shape, device, dtype=torch.float32):
    fn = provider_fn(provider)
    x = torch.randn(shape, device=device, dtype=dtype)
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(x, GRIDS)

    else:
        x.requires_grad_(True)
        S = sum(s * s for s in GRIDS)
        grad = torch.randn(shape[0], shape[1], S, device=device, dtype=dtype)

        def call():
            return torch.autograd.grad(fn(x, GRIDS), x, grad)[0]

    if device == "cuda":

        def timed():
            out = call()
            torch.cuda.synchronize()
            return out

        return x, timed
    return x, call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["eager", "compiled", "autokd"])
def test_multiscale_pool(benchmark, provider, mode, shape, device):
    x, call = make_call(provider, mode, shape, device)
    call()  # compiles the torch.compile provider outside the timing
    call()
    benchmark.group = f"multiscale_pool-{device}-{mode}-{'x'.join(map(str, shape))}"
    rounds = 200 if device == "cuda" else 12
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    peak = peak_memory_bytes(call, device)
    out_bytes = shape[0] * shape[1] * sum(s * s for s in GRIDS) * x.element_size()
    benchmark.extra_info["peak_bytes"] = peak
    benchmark.extra_info["input_bytes"] = x.numel() * x.element_size()
    # Peak beyond the tensors the call must hold whatever the implementation: the pooled
    # output, and in fwdbwd also the input gradient. On 8 x 8 planes those alone are 0.56 of
    # eager's peak, so there the "extra peak <= half of eager's" target is out of reach for any
    # implementation, and this is the figure that shows what is left.
    held = out_bytes + (x.numel() * x.element_size() if mode == "fwdbwd" else 0)
    benchmark.extra_info["workspace_bytes"] = peak - held
    if mode == "fwd" and benchmark.stats is not None:  # None under --benchmark-disable
        moved = x.numel() * x.element_size() + out_bytes
        benchmark.extra_info["copy_bw_fraction"] = bandwidth_fraction(
            moved, benchmark.stats.stats.median, device
        )
