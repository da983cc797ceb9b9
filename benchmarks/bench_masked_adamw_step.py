"""autokd::masked_adamw_step against ``torch.optim.AdamW(foreach=True)`` followed by mask
multiplies of the weights and both moments, and against the per-parameter Python loop of the
eager reference; for scale, the dense AdamW(foreach=True) step without masks too. Parameter
sets of ResNet-20 and ResNet-56 (CIFAR-100) at 50% sparsity.

pytest (pytest-benchmark; bench_*.py are not collected by default):
    python -m pytest benchmarks/bench_masked_adamw_step.py -o python_files='bench_*.py'
Table with ratios measured in the same run and bytes/s against copy bandwidth:
    python benchmarks/bench_masked_adamw_step.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

if __name__ == "__main__":  # run as a script: the repository root is not on sys.path
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import autokd  # noqa: E402
from autokd.reference import masked_adamw_step as reference_step  # noqa: E402
from common import bandwidth_fraction  # noqa: E402
from sparse_bench import make_step_inputs, print_table  # noqa: E402

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 1e-2
DEPTHS = (20, 56)


def build(impl: str, depth: int, device: str = "cpu"):
    """A zero-argument callable doing one steady-state AdamW step with ``impl``."""
    params, grads, masks = make_step_inputs(depth, device=device)
    if impl in ("fused", "python_loop"):
        m1 = [torch.zeros_like(p) for p in params]
        m2 = [torch.zeros_like(p) for p in params]
        fn = autokd.ops.masked_adamw_step if impl == "fused" else reference_step
        # A fixed step count: the bias corrections cost the same at every step.
        return lambda: fn(params, grads, masks, m1, m2, 10, LR, BETAS[0], BETAS[1], EPS, WD)
    if impl == "foreach_then_mask":
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        opt = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                foreach=True)
        opt.step()  # creates the state
        sparse = [i for i, m in enumerate(masks) if m is not None]
        sp = [leaves[i] for i in sparse]
        s1 = [opt.state[leaves[i]]["exp_avg"] for i in sparse]
        s2 = [opt.state[leaves[i]]["exp_avg_sq"] for i in sparse]
        sm = [masks[i].to(params[0].dtype) for i in sparse]

        def step():
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(sp, sm)
                torch._foreach_mul_(s1, sm)
                torch._foreach_mul_(s2, sm)

        return step
    if impl == "dense_foreach":
        # The dense step that sparse training replaces: no masks at all.
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        opt = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                foreach=True)
        opt.step()
        return opt.step
    raise ValueError(f"unknown impl {impl!r}")


def bytes_moved(depth: int) -> int:
    """Bytes the fused step must move: read p, g, exp_avg, exp_avg_sq, mask; write p and the
    two moments (fp32)."""
    params, _, masks = make_step_inputs(depth)
    return sum(p.numel() * 28 + (m.numel() if m is not None else 0)
               for p, m in zip(params, masks))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("impl", ["fused", "foreach_then_mask", "python_loop", "dense_foreach"])
def test_masked_adamw_step(benchmark, impl, depth):
    fn = build(impl, depth)
    fn()
    benchmark.group = f"masked_adamw_step resnet{depth}"
    nbytes = bytes_moved(depth)
    benchmark.extra_info["bytes_moved"] = nbytes
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = nbytes / median / 1e9
        benchmark.extra_info["fraction_of_copy_bandwidth"] = bandwidth_fraction(nbytes, median)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| params | impl | median us | vs foreach_then_mask | vs python_loop | GB/s | "
          "of copy bw |")
    print("|---|---|---|---|---|---|---|")
    for depth in DEPTHS:
        fns = {i: build(i, depth)
               for i in ("fused", "foreach_then_mask", "python_loop", "dense_foreach")}
        print_table(f"ResNet-{depth}", fns, bytes_moved(depth), "foreach_then_mask",
                    "python_loop", args.repeats)


if __name__ == "__main__":
    main()
