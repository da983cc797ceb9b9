"""cka: eager reference vs torch.compile'd reference vs autokd, forward and forward+backward
(both inputs require grad, as in a CKA loss between two trained networks) on [N, D] features
(CPU float32; CUDA too when present).

    pytest benchmarks/bench_cka.py --benchmark-group-by=group
Peak memory of one call (bytes above what was live before) is in extra_info.
"""
import pytest
import torch
from common import peak_memory_bytes

from autokd.ops import cka
from autokd.reference import cka as ref_cka

torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 256

PROVIDERS = {
    "eager": ref_cka,
    "compiled": torch.compile(ref_cka, dynamic=False),
    "autokd": cka,
}

# name: (N, Dx, Dy, debiased)
CASES = {
    "N128 Dx64 Dy512": (128, 64, 512, False),
    "N128 Dx4096 Dy1024 debiased": (128, 4096, 1024, True),
    "N256 Dx256 Dy4096": (256, 256, 4096, False),
    "N256 Dx1024 Dy2048 debiased": (256, 1024, 2048, True),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_cka(benchmark, provider, passes, case, device):
    n, dx, dy, debiased = CASES[case]
    f = PROVIDERS[provider]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dx, generator=gen).relu().to(device)
    y = torch.randn(n, dy, generator=gen).relu().to(device)
    if passes == "fwd":

        def run():
            f(x, y, debiased)
            _sync(device)

    else:
        x.requires_grad_()
        y.requires_grad_()

        def run():
            x.grad = y.grad = None
            f(x, y, debiased).backward()
            _sync(device)

    run()  # compile / warm up
    benchmark.group = f"cka {device} {case} {passes}"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(run, device)
    benchmark.pedantic(run, rounds=9 if device == "cpu" else 50, warmup_rounds=1, iterations=1)
