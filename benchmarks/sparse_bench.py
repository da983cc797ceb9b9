"""Shared pieces of the masked optimizer-step benchmarks (bench_masked_sgd_step.py,
bench_masked_adamw_step.py): parameter sets of the CIFAR ResNets (He et al. 2016, option-A
shortcuts, no projection weights; shapes only, no model) and an interleaved timing table.

ResNet-20 has 0.28 M parameters in 59 tensors, ResNet-56 0.86 M in 167 (100 classes). The
masked ones follow SparsityManager's default exclusions: every conv weight but the first;
biases, BatchNorm and the last Linear stay dense.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import torch


def resnet_cifar_shapes(depth: int, num_classes: int = 100) -> List[Tuple[str, tuple, bool]]:
    """(name, shape, masked) for each parameter of ResNet-<depth> (depth = 6n + 2)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    out = [("conv1.weight", (16, 3, 3, 3), False), ("bn1.weight", (16,), False),
           ("bn1.bias", (16,), False)]
    cin = 16
    for s, c in enumerate((16, 32, 64), start=1):
        for b in range(n):
            for k in (1, 2):
                pre = f"layer{s}.{b}"
                out.append((f"{pre}.conv{k}.weight", (c, cin if k == 1 else c, 3, 3), True))
                out.append((f"{pre}.bn{k}.weight", (c,), False))
                out.append((f"{pre}.bn{k}.bias", (c,), False))
            cin = c
    out += [("fc.weight", (num_classes, 64), False), ("fc.bias", (num_classes,), False)]
    return out


def make_step_inputs(depth: int, sparsity: float = 0.5, dtype=torch.float32, device="cpu",
                     seed: int = 0):
    """params, grads and masks (None for dense parameters) of ResNet-<depth>; each masked tensor
    keeps exactly round((1 - sparsity) * numel) weights, zeroed elsewhere."""
    g = torch.Generator().manual_seed(seed)
    params, grads, masks = [], [], []
    for _, shape, masked in resnet_cifar_shapes(depth):
        p = torch.randn(shape, generator=g, dtype=dtype) * 0.1
        gr = torch.randn(shape, generator=g, dtype=dtype) * 0.01
        m = None
        if masked:
            n = p.numel()
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=g)[: round((1 - sparsity) * n)]] = True
            m = flat.view(shape)
            p.mul_(m)
        params.append(p.to(device))
        grads.append(gr.to(device))
        masks.append(None if m is None else m.to(device))
    return params, grads, masks


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int,
                        rounds: int = 5) -> Dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds so that load
    from other processes on a shared machine hits every function alike."""
    per = max(repeats // rounds, 1)
    got = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            got[k].append(median_seconds(fn, per))
    return {k: _median(v) for k, v in got.items()}


def copy_fn(nbytes: int) -> Callable[[], object]:
    """A plain copy moving ``nbytes`` in all (reads nbytes/2, writes nbytes/2): the bandwidth
    yardstick, timed in the same rounds as the steps (see common.bandwidth_fraction)."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def print_table(title: str, fns: Dict[str, Callable[[], object]], nbytes: int, baseline: str,
                loop: str, repeats: int) -> None:
    fns = dict(fns, copy=copy_fn(nbytes))
    med = interleaved_medians(fns, repeats)
    for name in fns:
        if name == "copy":
            continue
        t = med[name]
        print(f"| {title} | {name} | {t * 1e6:.0f} | {med[baseline] / t:.2f}x | "
              f"{med[loop] / t:.2f}x | {nbytes / t / 1e9:.1f} | {med['copy'] / t:.2f} |")
