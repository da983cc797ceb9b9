"""One dispatch point for every loss primitive that has a fused kernel.

Each function here calls ``autokd.ops.<name>`` (the compiled ``torch.ops.autokd`` kernel) when
that op is present, else the op's eager reference ``autokd.reference.<name>`` when present, else
the eager formula below. The eager formulas restate the ops' contracts so that the search space
works on a build without kernels; once the ops and references are present they are never used.
Nothing else in autokd.space or autokd.nn computes these five primitives.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

import autokd


def _impl(name):
    op = getattr(autokd.ops, name, None)
    if op is not None:
        return op
    ref = getattr(autokd.reference, name, None)
    if ref is not None:
        return ref
    return _EAGER[name]


def backend(name: str) -> str:
    """Which implementation ``name`` dispatches to: "op", "reference" or "eager"."""
    if getattr(autokd.ops, name, None) is not None:
        return "op"
    if getattr(autokd.reference, name, None) is not None:
        return "reference"
    return "eager"


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


# Eager formulas, used only while neither the op nor its reference exists in this build.

def _softmax_kl(student, teacher, tau):
    s = student.reshape(student.shape[0], -1) / tau  # [R, L]
    t = teacher.reshape(teacher.shape[0], -1) / tau
    log_q = F.log_softmax(s, dim=1)
    log_p = F.log_softmax(t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.mean() * tau * tau


def _corr_distance(a, b, dim):
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    num = (a * b).sum(dim=dim)
    den = a.pow(2).sum(dim=dim).sqrt() * b.pow(2).sum(dim=dim).sqrt()
    return 1.0 - num / (den + 1e-8)


def _pearson(student, teacher, tau):
    p = F.softmax(student / tau, dim=1)  # [N, K]
    q = F.softmax(teacher / tau, dim=1)
    inter = _corr_distance(p, q, 1).mean() * tau * tau
    intra = _corr_distance(p, q, 0).mean() * tau * tau
    return inter, intra


def _normalized_gram(x):
    g = torch.matmul(x, x.transpose(-1, -2))
    norm = g.flatten(-2).norm(dim=-1).clamp_min(1e-12)
    return g / norm[..., None, None]


def _gram_l2(student, teacher, mode):
    if mode == "sample":
        d = _normalized_gram(student) - _normalized_gram(teacher)
        return d.pow(2).sum()
    d = _normalized_gram(student) - _normalized_gram(teacher)  # [N, C, C]
    return d.pow(2).sum(dim=(1, 2)).mean()


def _cka(x, y, debiased):
    n = x.shape[0]
    kx = x @ x.t()
    ky = y @ y.t()
    if debiased:
        def hsic(a, b):
            a = a - torch.diag(torch.diagonal(a))
            b = b - torch.diag(torch.diagonal(b))
            ones = torch.ones(n, 1, dtype=a.dtype, device=a.device)
            t1 = (a * b).sum()
            t2 = (ones.t() @ a @ ones) * (ones.t() @ b @ ones) / ((n - 1) * (n - 2))
            t3 = 2.0 * (ones.t() @ a @ b @ ones) / (n - 2)
            return (t1 + t2.squeeze() - t3.squeeze()) / (n * (n - 3))
    else:
        def hsic(a, b):
            h = torch.eye(n, dtype=a.dtype, device=a.device) - 1.0 / n
            return ((h @ a @ h) * (h @ b @ h)).sum() / ((n - 1) ** 2)
    xy = hsic(kx, ky)
    return xy / (hsic(kx, kx) * hsic(ky, ky)).clamp_min(1e-24).sqrt()


def _multiscale_pool(x, grids):
    return torch.cat([F.adaptive_avg_pool2d(x, g).flatten(2) for g in grids], dim=2)


_EAGER = {
    "softmax_kl": _softmax_kl,
    "pearson": _pearson,
    "gram_l2": _gram_l2,
    "cka": _cka,
    "multiscale_pool": _multiscale_pool,
}
