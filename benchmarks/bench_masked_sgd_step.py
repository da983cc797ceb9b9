"""autokd::masked_sgd_step against the two ways to get the same result from torch:
``torch.optim.SGD(foreach=True)`` followed by mask multiplies of the weights and momentum
buffers, and the per-parameter Python loop of the eager reference; for scale, the dense
``torch.optim.SGD(foreach=True)`` step without masks too. Parameter sets of ResNet-20
and ResNet-56 (CIFAR-100) at 50% sparsity, SGD with momentum 0.9, Nesterov, weight decay 5e-4
(runner and parameter sets: common.py).

pytest (pytest-benchmark; bench_*.py are not collected by default):
    python -m pytest benchmarks/bench_masked_sgd_step.py -o python_files='bench_*.py'
Table with ratios measured in the same run and bytes/s against copy bandwidth:
    python benchmarks/bench_masked_sgd_step.py [--repeats 200]
"""

from __future__ import annotations

import pytest
import torch

import autokd
import common
from autokd.reference import masked_sgd_step as reference_step

HP = {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0, "weight_decay": 5e-4, "nesterov": True}
DEPTHS = (20, 56)
IMPLS = ("fused", "foreach_then_mask", "python_loop", "dense_foreach")


def build(impl: str, depth: int, device: str = "cpu"):
    """A zero-argument callable doing one steady-state step (buffers exist) with ``impl``."""
    params, grads, masks = common.make_step_inputs(depth, device=device)
    if impl in ("fused", "python_loop"):
        bufs = [torch.zeros_like(p) for p in params]
        fn = autokd.ops.masked_sgd_step if impl == "fused" else reference_step
        return lambda: fn(params, grads, masks, bufs, **HP)
    if impl == "foreach_then_mask":
        return common.optimizer_then_mask(
            torch.optim.SGD, HP, params, grads, masks, state_keys=("momentum_buffer",)
        )
    if impl == "dense_foreach":  # the dense step that sparse training replaces
        return common.optimizer_then_mask(torch.optim.SGD, HP, params, grads, masks)
    raise ValueError(f"unknown impl {impl!r}")


def bytes_moved(depth: int) -> int:
    """Bytes the fused step must move: read p, g, buf, mask; write p, buf (fp32)."""
    params, _, masks = common.make_step_inputs(depth)
    return sum(p.numel() * 20 + (m.numel() if m is not None else 0) for p, m in zip(params, masks))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_sgd_step(benchmark, impl, depth):
    common.run_step(
        benchmark, build(impl, depth), f"masked_sgd_step resnet{depth}", bytes_moved(depth)
    )


if __name__ == "__main__":
    common.step_table_main(
        __doc__, build, bytes_moved, IMPLS, DEPTHS, "foreach_then_mask", "python_loop"
    )
