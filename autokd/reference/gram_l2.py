"""Eager reference of ``autokd::gram_l2``: G-L2 between normalised Gram matrices.

The spec the kernels are tested against (see csrc/ops/gram_l2.h for the math and gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Gram norms are sqrt(||G||_F^2 + GRAM_EPS^2): smooth at G = 0, negligible otherwise.
GRAM_EPS = 1e-12


def gram_l2(student: Tensor, teacher: Tensor, mode: str = "sample") -> Tensor:
    """|| G_S/n(G_S) - G_T/n(G_T) ||_F^2 with G = F F^T.

    mode "sample": student [N, Ds], teacher [N, Dt]; one N x N Gram each.
    mode "channel": student [N, C, Ls], teacher [N, C, Lt]; a C x C Gram per sample, each
    normalised on its own; the result is the mean over samples.
    The teacher is a constant target: no gradient flows to it.
    """
    teacher = teacher.detach()
    if mode == "sample":
        gs = student @ student.T  # [N, N]
        gt = teacher @ teacher.T
    elif mode == "channel":
        gs = student @ student.transpose(1, 2)  # [N, C, C]
        gt = teacher @ teacher.transpose(1, 2)
    else:
        raise ValueError(f"gram_l2: expected mode one of 'sample', 'channel', got {mode!r}")
    ns = torch.sqrt(gs.pow(2).sum((-2, -1), keepdim=True) + GRAM_EPS**2)
    nt = torch.sqrt(gt.pow(2).sum((-2, -1), keepdim=True) + GRAM_EPS**2)
    per_gram = (gs / ns - gt / nt).pow(2).sum((-2, -1))
    return per_gram.mean()
