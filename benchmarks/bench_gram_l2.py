"""gram_l2: eager reference vs torch.compile'd reference vs autokd on views of the feature maps
of real distillation layers (runner: common.py; peak and workspace bytes in extra_info).

    pytest -o python_files='bench_*.py' benchmarks/bench_gram_l2.py --benchmark-group-by=group
"""

import torch

import common
from autokd.ops import gram_l2
from autokd.reference import gram_l2 as reference

PROVIDERS = common.op_providers(gram_l2, reference)

# name: (mode, student shape, teacher shape); views of [N, C, H, W] feature maps.
CASES = {
    "sample[64,64x32x32]": ("sample", (64, 64 * 32 * 32), (64, 64 * 32 * 32)),
    "channel[64,64,32x32]": ("channel", (64, 64, 32 * 32), (64, 64, 32 * 32)),
    "sample[64,256x8x8]": ("sample", (64, 256 * 8 * 8), (64, 256 * 8 * 8)),
    "channel[64,256,8x8]": ("channel", (64, 256, 8 * 8), (64, 256, 8 * 8)),
    "channel[8,512,28x28]": ("channel", (8, 512, 28 * 28), (8, 512, 28 * 28)),
}


@common.parametrize_op(CASES, PROVIDERS)
def test_gram_l2(benchmark, provider, mode, case, device):
    view, s_shape, t_shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(s_shape, generator=gen).relu().to(device)  # post-ReLU features
    t = torch.randn(t_shape, generator=gen).relu().to(device)
    common.run_op(
        benchmark,
        "gram_l2",
        provider,
        PROVIDERS[provider],
        (s, t, view),
        mode=mode,
        device=device,
        case=case,
    )
