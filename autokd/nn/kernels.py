"""One dispatch point for every loss primitive that has a fused kernel.

Each function here calls ``autokd.ops.<name>`` (the compiled ``torch.ops.autokd`` kernel,
present in every build: importing autokd loads it) with the argument conventions of the
blocks: the teacher side detached, scalars as Python numbers. Nothing else in autokd.nn
computes these five primitives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autokd import ops


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean over rows of KL(softmax(t/tau) || softmax(s/tau)); rank 2 [R, L] or rank 3
    [R, A, B] (softmax over A*B jointly). The teacher gets no gradient."""
    return ops.softmax_kl(student, teacher.detach(), float(tau))


def pearson(
    student: torch.Tensor, teacher: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST distances (inter, intra) of softmax(./tau) over [N, K] logits."""
    return ops.pearson(student, teacher.detach(), float(tau))


def gram_l2(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> torch.Tensor:
    """||G_S/||G_S|| - G_T/||G_T|| ||_F^2; mode "sample" ([N, D], N x N Gram) or "channel"
    ([N, C, L], C x C Gram per sample, mean over samples)."""
    return ops.gram_l2(student, teacher.detach(), mode)


def cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA between [N, Dx] and [N, Dy]."""
    return ops.cka(x, y, bool(debiased))


def multiscale_pool(x: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, sum s^2]: adaptive average pool to each s x s grid, concatenated."""
    return ops.multiscale_pool(x, [int(g) for g in grids])
