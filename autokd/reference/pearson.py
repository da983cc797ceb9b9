"""Eager reference of ``autokd::pearson``: the spec of its kernels."""

import torch
from torch import Tensor

# Added to the product of the two norms in the correlation's denominator (csrc/ops/pearson.h).
EPS = 1e-8


def _corr(a: Tensor, b: Tensor, dim: int) -> Tensor:
    u = a - a.mean(dim, keepdim=True)
    v = b - b.mean(dim, keepdim=True)
    return (u * v).sum(dim) / (u.norm(dim=dim) * v.norm(dim=dim) + EPS)


def pearson(student: Tensor, teacher: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """DIST-style ``(inter, intra)`` of ``[N, K]`` logits.

    With ``P = softmax(student / tau, 1)`` and ``Q = softmax(teacher / tau, 1)``:
    ``inter = tau^2 * mean_n (1 - corr(P[n], Q[n]))``,
    ``intra = tau^2 * mean_k (1 - corr(P[:, k], Q[:, k]))``, where ``corr`` is the cosine of
    the centred vectors with ``EPS`` added to the product of their norms. The teacher is a
    constant target (detached), as in the kernel.
    """
    p = torch.softmax(student / tau, dim=1)  # [N, K]
    q = torch.softmax(teacher.detach() / tau, dim=1)  # [N, K]
    t2 = tau * tau
    inter = t2 * (1 - _corr(p, q, 1)).mean()
    intra = t2 * (1 - _corr(p, q, 0)).mean()
    return inter, intra
