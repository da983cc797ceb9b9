"""The fused kernels as nn.Modules, for use inside any training code.

Each module is a thin, stateless face of one ``torch.ops.autokd`` op; they run on CPU and CUDA,
are differentiable, and compile under ``torch.compile(fullgraph=True)``.

    kd = autokd.nn.SoftmaxKL(tau=4.0)
    loss = kd(student_logits, teacher_logits.detach())
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from autokd import ops


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"expected {name} > 0, got {value!r}")
    return float(value)


class SoftmaxKL(nn.Module):
    """tau^2 * mean over rows of KL(softmax(t/tau) || softmax(s/tau)); rows are dim 0, the softmax
    runs over all other dims ([R, L] or [R, A, B], any strides). Hinton KD on logits; CWD on
    ``f.flatten(0, 1)`` of [N, C, H, W] features."""

    def __init__(self, tau: float = 4.0):
        super().__init__()
        self.tau = _positive("tau", tau)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ops.softmax_kl(student, teacher, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class DIST(nn.Module):
    """DIST: beta * inter-class + gamma * intra-class (1 - Pearson) on softmax(logits / tau)."""

    def __init__(self, tau: float = 1.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.tau, self.beta, self.gamma = _positive("tau", tau), float(beta), float(gamma)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        inter, intra = ops.pearson(student, teacher, self.tau)
        return self.beta * inter + self.gamma * intra

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}, gamma={self.gamma}"


class GramL2(nn.Module):
    """Squared distance of normalised Gram matrices: ``mode="sample"`` on [N, D] (N x N Gram, SP),
    ``mode="channel"`` on [N, C, L] (C x C Gram per sample, ICKD-style)."""

    MODES = ("sample", "channel")

    def __init__(self, mode: str = "sample"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"expected mode one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ops.gram_l2(student, teacher, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class CKALoss(nn.Module):
    """1 - linear CKA between [N, Dx] and [N, Dy] (biased or debiased HSIC)."""

    def __init__(self, debiased: bool = False):
        super().__init__()
        self.debiased = bool(debiased)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - ops.cka(x, y, self.debiased)

    def extra_repr(self) -> str:
        return f"debiased={self.debiased}"


class MultiScalePool(nn.Module):
    """[N, C, H, W] -> [N, C, sum s^2]: average pooling to each s x s grid, concatenated."""

    def __init__(self, grids: Sequence[int] = (1, 2, 4)):
        super().__init__()
        self.grids = [int(g) for g in grids]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.multiscale_pool(x, self.grids)

    def extra_repr(self) -> str:
        return f"grids={self.grids}"
