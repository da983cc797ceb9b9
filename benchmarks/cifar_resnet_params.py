"""Parameter sets of the CIFAR ResNets (He et al. 2016, option-A shortcuts, no projection
weights): shapes only, no model, for the optimizer-step benchmarks.

ResNet-20 has 0.28 M parameters in 59 tensors, ResNet-56 0.86 M in 167 (100 classes). The
masked ones follow SparsityManager's default exclusions: every conv weight but the first;
biases, BatchNorm and the last Linear stay dense.
"""
from __future__ import annotations

from typing import List, Tuple

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
