"""Eager reference of autokd::masked_adamw_step: a per-parameter loop of torch ops (the spec)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


@torch.no_grad()
def masked_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> None:
    step_size = lr / (1.0 - beta1**step)
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for p, g, m, m1, m2 in zip(params, grads, masks, exp_avgs, exp_avg_sqs):
        p.mul_(1.0 - lr * weight_decay)
        m1.lerp_(g, 1.0 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.addcdiv_(m1, m2.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
        if m is not None:
            zero = torch.zeros((), dtype=p.dtype, device=p.device)
            p.copy_(torch.where(m, p, zero))
            m1.copy_(torch.where(m, m1, zero))
            m2.copy_(torch.where(m, m2, zero))
