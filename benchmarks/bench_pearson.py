"""pearson (DIST inter + intra): autokd kernel vs the eager and the torch.compile'd reference
(runner: common.py).

Logits of real distillation: [128, 100] (CIFAR-100) and [256, 1000] (ImageNet). The loss is
inter + intra (DIST weights them beta = gamma = 1 by default). Recorded besides the times
(common.run_op): peak and workspace bytes, and for the forward its copy-bandwidth fraction plus
(CPU, autokd) the fraction it would reach with its inputs in cache, which tells memory-bound
from compute-bound.

    pytest -o python_files='bench_*.py' benchmarks/bench_pearson.py --benchmark-json=pe.json
"""

import torch

import autokd
import common
from autokd.reference import pearson as reference

TAU = 4.0
CASES = {"logits-128x100": (128, 100), "logits-256x1000": (256, 1000)}


def _loss(pearson):
    def loss(s, t, tau):
        inter, intra = pearson(s, t, tau)
        return inter + intra

    return loss


PROVIDERS = common.op_providers(_loss(autokd.ops.pearson), _loss(reference))


@common.parametrize_op(CASES, PROVIDERS)
def test_pearson(benchmark, provider, mode, case, device):
    s = torch.randn(CASES[case], device=device)
    t = torch.randn(CASES[case], device=device)
    # Below 0.5, in_cache_fraction says arithmetic (two exps and the moments per element
    # pair), not memory, bounds this forward on this core.
    common.run_op(
        benchmark,
        "pearson",
        provider,
        PROVIDERS[provider],
        (s, t, TAU),
        mode=mode,
        device=device,
        case=case,
        bandwidth=True,
        in_cache=True,
    )
