"""gram_l2: eager reference vs torch.compile'd reference vs autokd, forward and forward+backward
on features of real distillation layers (CPU float32; CUDA too when present).

    pytest benchmarks/bench_gram_l2.py --benchmark-group-by=group
Peak memory of one call (bytes above what was live before) is in extra_info.
"""
import pytest
import torch
from common import peak_memory_bytes

from autokd.ops import gram_l2
from autokd.reference import gram_l2 as ref_gram_l2

# Every (case, pass) is its own static graph; keep them all compiled rather than falling back.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 256

PROVIDERS = {
    "eager": ref_gram_l2,
    "compiled": torch.compile(ref_gram_l2, dynamic=False),
    "autokd": gram_l2,
}

# name: (mode, student shape, teacher shape); views of [N, C, H, W] feature maps.
CASES = {
    "sample[64,64x32x32]": ("sample", (64, 64 * 32 * 32), (64, 64 * 32 * 32)),
    "channel[64,64,32x32]": ("channel", (64, 64, 32 * 32), (64, 64, 32 * 32)),
    "sample[64,256x8x8]": ("sample", (64, 256 * 8 * 8), (64, 256 * 8 * 8)),
    "channel[64,256,8x8]": ("channel", (64, 256, 8 * 8), (64, 256, 8 * 8)),
    "channel[8,512,28x28]": ("channel", (8, 512, 28 * 28), (8, 512, 28 * 28)),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_gram_l2(benchmark, provider, passes, case, device):
    mode, s_shape, t_shape = CASES[case]
    f = PROVIDERS[provider]
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(s_shape, generator=gen).relu().to(device)  # post-ReLU features
    t = torch.randn(t_shape, generator=gen).relu().to(device)
    if passes == "fwd":

        def run():
            f(s, t, mode)
            _sync(device)

    else:
        s.requires_grad_()

        def run():
            s.grad = None
            f(s, t, mode).backward()
            _sync(device)

    run()  # compile / warm up
    benchmark.group = f"gram_l2 {device} {case} {passes}"
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(run, device)
    benchmark.pedantic(run, rounds=7 if device == "cpu" else 50, warmup_rounds=1, iterations=1)
