"""cka: eager reference vs torch.compile'd reference vs autokd on [N, D] features, both inputs
requiring grad in the backward modes, as in a CKA loss between two trained networks (runner:
common.py; peak and workspace bytes in extra_info).

    pytest -o python_files='bench_*.py' benchmarks/bench_cka.py --benchmark-group-by=group
"""

import torch

import common
from autokd.ops import cka
from autokd.reference import cka as reference

PROVIDERS = common.op_providers(cka, reference)

# name: (N, Dx, Dy, debiased)
CASES = {
    "N128 Dx64 Dy512": (128, 64, 512, False),
    "N128 Dx4096 Dy1024 debiased": (128, 4096, 1024, True),
    "N256 Dx256 Dy4096": (256, 256, 4096, False),
    "N256 Dx1024 Dy2048 debiased": (256, 1024, 2048, True),
}


@common.parametrize_op(CASES, PROVIDERS)
def test_cka(benchmark, provider, mode, case, device):
    n, dx, dy, debiased = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dx, generator=gen).relu().to(device)  # post-ReLU features
    y = torch.randn(n, dy, generator=gen).relu().to(device)
    common.run_op(
        benchmark,
        "cka",
        provider,
        PROVIDERS[provider],
        (x, y, debiased),
        mode=mode,
        device=device,
        case=case,
        grad=(0, 1),
    )
