"""autokd::masked_adamw_step against ``torch.optim.AdamW(foreach=True)`` followed by mask
multiplies of the weights and both moments, and against the per-parameter Python loop of the
eager reference; for scale, the dense AdamW(foreach=True) step without masks too. Parameter
sets of ResNet-20 and ResNet-56 (CIFAR-100) at 50% sparsity (runner and parameter sets:
common.py).

pytest (pytest-benchmark; bench_*.py are not collected by default):
    python -m pytest benchmarks/bench_masked_adamw_step.py -o python_files='bench_*.py'
Table with ratios measured in the same run and bytes/s against copy bandwidth:
    python benchmarks/bench_masked_adamw_step.py [--repeats 200]
"""

from __future__ import annotations

import pytest
import torch

import autokd
import common
from autokd.reference import masked_adamw_step as reference_step

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 1e-2
HP = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD}
DEPTHS = (20, 56)
IMPLS = ("fused", "foreach_then_mask", "python_loop", "dense_foreach")


def build(impl: str, depth: int, device: str = "cpu"):
    """A zero-argument callable doing one steady-state AdamW step with ``impl``."""
    params, grads, masks = common.make_step_inputs(depth, device=device)
    if impl in ("fused", "python_loop"):
        m1 = [torch.zeros_like(p) for p in params]
        m2 = [torch.zeros_like(p) for p in params]
        fn = autokd.ops.masked_adamw_step if impl == "fused" else reference_step
        # A fixed step count: the bias corrections cost the same at every step.
        return lambda: fn(params, grads, masks, m1, m2, 10, LR, BETAS[0], BETAS[1], EPS, WD)
    if impl == "foreach_then_mask":
        return common.optimizer_then_mask(
            torch.optim.AdamW, HP, params, grads, masks, state_keys=("exp_avg", "exp_avg_sq")
        )
    if impl == "dense_foreach":  # the dense step that sparse training replaces
        return common.optimizer_then_mask(torch.optim.AdamW, HP, params, grads, masks)
    raise ValueError(f"unknown impl {impl!r}")


def bytes_moved(depth: int) -> int:
    """Bytes the fused step must move: read p, g, exp_avg, exp_avg_sq, mask; write p and the
    two moments (fp32)."""
    params, _, masks = common.make_step_inputs(depth)
    return sum(p.numel() * 28 + (m.numel() if m is not None else 0) for p, m in zip(params, masks))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_adamw_step(benchmark, impl, depth):
    common.run_step(
        benchmark, build(impl, depth), f"masked_adamw_step resnet{depth}", bytes_moved(depth)
    )


if __name__ == "__main__":
    common.step_table_main(
        __doc__, build, bytes_moved, IMPLS, DEPTHS, "foreach_then_mask", "python_loop"
    )
