"""softmax_kl: autokd kernel vs the eager and the torch.compile'd reference (runner: common.py).

Cases are the views one kernel serves in real distillation: logits [128, 100] and [256, 1000];
features [N, C, H, W] viewed channel-wise ([N*C, H*W]), sample-wise ([N, C*H*W]) and as the
channel view f.view(N, C, H*W).transpose(0, 1) ([C, N, H*W], not contiguous). Recorded besides
the times (common.run_op): peak and workspace bytes, and for the forward its copy-bandwidth
fraction plus (CPU, autokd) the fraction it would reach with its inputs in cache, which tells
memory-bound from compute-bound.

    pytest -o python_files='bench_*.py' benchmarks/bench_softmax_kl.py --benchmark-json=kl.json
"""

import torch

import autokd
import common
from autokd.reference import softmax_kl as reference

TAU = 4.0
PROVIDERS = common.op_providers(autokd.ops.softmax_kl, reference)


def _logits(n, k):
    return lambda d: (torch.randn(n, k, device=d), torch.randn(n, k, device=d))


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
    "logits-128x100": _logits(128, 100),
    "logits-256x1000": _logits(256, 1000),
    "64x64x32x32-channelwise": _features((64, 64, 32, 32), "channelwise"),
    "64x64x32x32-samplewise": _features((64, 64, 32, 32), "samplewise"),
    "64x64x32x32-channel_view": _features((64, 64, 32, 32), "channel_view"),
    "64x256x8x8-channel_view": _features((64, 256, 8, 8), "channel_view"),
    "8x512x28x28-channelwise": _features((8, 512, 28, 28), "channelwise"),
}


@common.parametrize_op(CASES, PROVIDERS)
def test_softmax_kl(benchmark, provider, mode, case, device):
    # Below 0.5, in_cache_fraction says the op's arithmetic (two exps per element pair), not
    # memory, bounds its forward on this core.
    common.run_op(
        benchmark,
        "softmax_kl",
        provider,
        PROVIDERS[provider],
        (*CASES[case](device), TAU),
        mode=mode,
        device=device,
        case=case,
        bandwidth=True,
        in_cache=True,
    )
