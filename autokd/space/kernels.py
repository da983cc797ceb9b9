"""One dispatch point for every loss primitive that has a fused kernel.

Each function here calls ``autokd.ops.<name>`` (the compiled ``torch.ops.autokd`` kernel), or
the op's eager reference ``autokd.reference.<name>`` where a build lacks that kernel. Nothing
else in autokd.space or autokd.nn computes these five primitives.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

import autokd


def _impl(name):
    op = getattr(autokd.ops, name, None)
    if op is not None:
        return op
    return getattr(autokd.reference, name)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean over rows of KL(softmax(t/tau) || softmax(s/tau)); rank 2 [R, L] or rank 3
    [R, A, B] (softmax over A*B jointly). The teacher gets no gradient."""
    return _impl("softmax_kl")(student, teacher.detach(), float(tau))


def pearson(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIST distances (inter, intra) of softmax(./tau) over [N, K] logits."""
    return _impl("pearson")(student, teacher.detach(), float(tau))


def gram_l2(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> torch.Tensor:
    """||G_S/||G_S|| - G_T/||G_T|| ||_F^2; mode "sample" ([N, D], N x N Gram) or "channel"
    ([N, C, L], C x C Gram per sample, mean over samples)."""
    return _impl("gram_l2")(student, teacher.detach(), mode)


def cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA between [N, Dx] and [N, Dy]."""
    return _impl("cka")(x, y, bool(debiased))


def multiscale_pool(x: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, sum s^2]: adaptive average pool to each s x s grid, concatenated."""
    return _impl("multiscale_pool")(x, [int(g) for g in grids])
