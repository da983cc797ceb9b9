"""Eager reference of autokd::masked_sgd_step: a per-parameter loop of torch ops (the spec)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.no_grad()
def masked_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    momentum_buffers: Sequence[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
) -> None:
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        d = g + weight_decay * p
        if momentum != 0.0:
            b = momentum_buffers[i]
            if first_step:
                b.copy_(d)
            else:
                b.mul_(momentum).add_(d, alpha=1.0 - dampening)
            u = d + momentum * b if nesterov else b
        else:
            u = d
        p.sub_(lr * u)
        if m is not None:
            # where(), not a multiply: NaN/Inf in pruned entries must not survive.
            p.copy_(torch.where(m, p, torch.zeros((), dtype=p.dtype, device=p.device)))
            if momentum != 0.0:
                b.copy_(torch.where(m, b, torch.zeros((), dtype=b.dtype, device=b.device)))
