"""Eager reference of ``autokd::cka``: linear CKA with the biased or debiased HSIC estimator.

The spec the kernels are tested against (see csrc/ops/cka.h for the math and gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Lower clamp of HSIC(K, K) and HSIC(L, L) in the denominator.
CKA_EPS = 1e-12


def _hsic_biased(k: Tensor, lg: Tensor) -> Tensor:
    n = k.shape[0]
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    lc = lg - lg.mean(0, keepdim=True) - lg.mean(1, keepdim=True) + lg.mean()
    return (kc * lc).sum() / (n - 1) ** 2


def _hsic_unbiased(k: Tensor, lg: Tensor) -> Tensor:
    # Song et al. 2012, eq. (5), on the Grams with zeroed diagonals.
    n = k.shape[0]
    kt = k - torch.diag_embed(torch.diagonal(k))
    lt = lg - torch.diag_embed(torch.diagonal(lg))
    trace = (kt * lt).sum()
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(0) @ lt.sum(0))
    return (trace + term2 - term3) / (n * (n - 3))


def cka(x: Tensor, y: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA between x [N, Dx] and y [N, Dy] (rows are samples).

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = x x^T, L = y y^T; HSIC(K, K) and
    HSIC(L, L) are clamped below at CKA_EPS. ``debiased`` uses the unbiased HSIC estimator of
    Song et al. 2012 (N >= 4). Differentiable in both x and y.
    """
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"cka: expected N >= {4 if debiased else 2}, got {n}")
    k = x @ x.T  # [N, N]
    lg = y @ y.T  # [N, N]
    hsic = _hsic_unbiased if debiased else _hsic_biased
    kl, kk, ll = hsic(k, lg), hsic(k, k), hsic(lg, lg)
    return kl / (kk.clamp_min(CKA_EPS).sqrt() * ll.clamp_min(CKA_EPS).sqrt())
