"""multiscale_pool: autokd kernel vs the eager and the torch.compile'd reference (runner:
common.py).

Shapes are intermediate features of real distillation pairs; grids (1, 2, 4) are the search
space's multi-scale transform. Recorded besides the times: peak memory of one call, the part of
it beyond the output and input gradient (workspace_bytes: on 8 x 8 planes those two alone are
0.56 of eager's peak, so there the "extra peak <= half of eager's" target is out of reach for
any implementation, and this is the figure that shows what is left), and for the forward the
bytes moved per second as a fraction of a plain copy of the same bytes.

    pytest -o python_files='bench_*.py' benchmarks/bench_multiscale_pool.py \
        --benchmark-json=bench.json           # CPU; add -k cuda for the CUDA cases only
"""

import torch

import common
from autokd.ops import multiscale_pool
from autokd.reference import multiscale_pool as reference

GRIDS = (1, 2, 4)
# The digits pair's features after the adapter (the one geometry with a kernel of its own),
# then ResNet layer1 / layer3 of CIFAR pairs and an ImageNet-sized map.
SHAPES = [(32, 64, 4, 4), (64, 64, 32, 32), (64, 256, 8, 8), (8, 512, 28, 28)]
CASES = {"x".join(map(str, s)): s for s in SHAPES}
PROVIDERS = common.op_providers(multiscale_pool, reference)


@common.parametrize_op(CASES, PROVIDERS)
def test_multiscale_pool(benchmark, provider, mode, case, device):
    x = torch.randn(CASES[case], device=device)
    common.run_op(
        benchmark,
        "multiscale_pool",
        provider,
        PROVIDERS[provider],
        (x, GRIDS),
        mode=mode,
        device=device,
        case=case,
        bandwidth=True,
    )
