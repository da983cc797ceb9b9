"""Building blocks of distillation losses: transforms, distances, schedules and the losses.

A feature design is a pipeline on a pair of feature maps (student, teacher), each [N, C, H, W]:

    align      student 1x1 conv + BN to the teacher's channels (where the design needs equal
               channels), adaptive average pooling of the larger map to the smaller size
               (where the design needs equal sizes)
    global     [N, C, H, W] -> [N, C, H, W]      original | attention | mask | at_map
    intra      [N, C, H, W] -> [N', C, L]        original | multi-scale | local
    inter      [N', C, L]   -> [B, R, D]         original | sample-wise | channel-wise
    distance   ([B, R, D], [B, R, D]) -> scalar  l2 | kl | gram_l2

The inter-spatial view fixes what the distances compare: R "rows" per group b, each a vector
of D values. KL takes a softmax over D in every row (rows = B*R distributions); G-L2 compares
the R x R Gram matrices of each group; L2 compares all values (so L2 reads the same under every
view). Embedding distances (renyi, gram_l2_embed) work on globally pooled features [N, C] and
skip the transforms. Logit distances work on [N, K] logits.

Every block registers itself in ``autokd.nn.registry``; a ``DistillerSpec`` names blocks by
their keys. The primitives with fused kernels go through ``autokd.nn.kernels``. This layer
reads a spec's fields and never imports ``autokd.space`` (which sits above it and validates
specs against these registries).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from autokd.nn import kernels
from autokd.nn.registry import FEATURE_DISTANCES, LOGIT_DISTANCES, SCHEDULES, TRANSFORMS

Tensor = torch.Tensor


def _positive(name, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return kind(value)


# --------------------------------------------------------------------------------------------
# Global transforms: (s, t) [N, C, H, W] -> (s, t) [N, C', H, W]
# --------------------------------------------------------------------------------------------


@TRANSFORMS.register("global/original")
class GlobalOriginal(nn.Module):
    """Identity: f_S, f_T unchanged."""

    needs_same_size = False

    def forward(self, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        return s, t


@TRANSFORMS.register("global/attention")
class SpatialAttention(nn.Module):
    """Both maps scaled by one spatial attention map alpha computed from f_S and f_T.

    a_X[n, h, w] = mean_c |X[n, c, h, w]|, standardised over (h, w) per sample (zero mean, unit
    std; a constant map becomes 0), so the two maps weigh equally whatever their scales;
    alpha = H*W * softmax_{h,w}((a_S + a_T) / (2 * temperature)), so alpha > 0 and its mean is 1
    per sample (a uniform map gives alpha = 1, the identity). alpha carries no gradient: it
    re-weights positions, it is not a target the student can move. Needs equal H, W.
    """

    needs_same_size = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = _positive("attention temperature", temperature)

    @staticmethod
    def _standardized_map(x: Tensor) -> Tensor:
        a = x.abs().mean(dim=1).flatten(1)  # [N, H*W]
        a = a - a.mean(dim=1, keepdim=True)
        return a / (a.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-6)

    def attention(self, s: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            n, _, h, w = t.shape
            z = (self._standardized_map(s) + self._standardized_map(t)) / (2 * self.temperature)
            return (h * w * torch.softmax(z.float(), dim=1)).to(t.dtype).view(n, 1, h, w)

    def forward(self, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        alpha = self.attention(s, t)  # [N, 1, H, W]
        return s * alpha, t * alpha


@TRANSFORMS.register("global/mask")
class RandomMask(nn.Module):
    """Random spatial mask M in {0, 1}, drawn afresh each call, shared by both maps.

    keep = (u <= 1 - ratio) with u = torch.rand(N, 1, H, W) (the draw MGD makes), so a fraction
    ``ratio`` of positions is dropped on average. Default: M*f_S, M*f_T (Table 1: the distance
    only sees the kept positions). With ``generate=True`` (MGD): only the student is masked and
    a generator conv3x3-ReLU-conv3x3 (trainable, teacher channels) must rebuild the whole
    teacher map: G(M*f_S), f_T. Needs equal H, W (and equal channels when generating).
    """

    needs_same_size = True

    def __init__(self, channels: Optional[int] = None, ratio: float = 0.5, generate: bool = False):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio: expected a number in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self.generate = bool(generate)
        self.generator = None
        if self.generate:
            if not channels:
                raise ValueError(
                    "mask with generate=True: expected the teacher channel count, got none"
                )
            self.generator = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, padding=1),
            )

    def forward(self, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        n, _, h, w = s.shape
        u = torch.rand(n, 1, h, w, device=s.device)
        keep = (u <= 1.0 - self.ratio).to(s.dtype)  # [N, 1, H, W]
        if self.generator is not None:
            return self.generator(s * keep), t
        return s * keep, t * keep


@TRANSFORMS.register("global/at_map")
class AttentionMap(nn.Module):
    """Attention transfer map (AT): f -> a / ||a||_2 with a[n] = vec(mean_c |f[n, c]|^p), kept
    as [N, 1, H, W]. Channel counts may differ; needs equal H, W."""

    needs_same_size = True

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = _positive("at_map p", p)

    def _map(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        a = x.pow(self.p) if self.p == 2.0 else x.abs().pow(self.p)
        a = F.normalize(a.mean(dim=1).reshape(n, -1), dim=1)
        return a.view(n, 1, h, w)

    def forward(self, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        return self._map(s), self._map(t)


# --------------------------------------------------------------------------------------------
# Intra-spatial transforms: [N, C, H, W] -> [N', C, L]
# --------------------------------------------------------------------------------------------


@TRANSFORMS.register("intra/original")
class IntraOriginal(nn.Module):
    """[N, C, H, W] -> [N, C, H*W] (a view)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2)


@TRANSFORMS.register("intra/multi-scale")
class MultiScale(nn.Module):
    """Multi-scale pooling: average-pool to each s x s grid and concatenate,
    [N, C, H, W] -> [N, C, sum s^2]. Grids finer than min(H, W) would only repeat values and
    are dropped (the 1 x 1 grid always stays), so tiny maps still give a valid view."""

    def __init__(self, grids: Sequence[int] = (1, 2, 4)):
        super().__init__()
        grids = [int(g) for g in grids]
        if not grids or any(g < 1 for g in grids):
            raise ValueError(f"multi-scale grids: expected positive integers, got {grids!r}")
        self.grids = grids

    def forward(self, x: Tensor) -> Tensor:
        limit = min(x.shape[-2:])
        grids = [g for g in self.grids if g <= limit] or [1]
        return kernels.multiscale_pool(x, grids)


@TRANSFORMS.register("intra/local")
class LocalPatches(nn.Module):
    """Local: split H x W into n x n patches, each patch a sample:
    [N, C, H, W] -> [n*n*N, C, (H/n)*(W/n)], rows ordered (patch_row, patch_col, n). A size
    not divisible by n is first average-pooled to n*max(1, floor(size/n))."""

    def __init__(self, n: int = 2):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"local n: expected a positive integer, got {n!r}")
        self.n = n

    def forward(self, x: Tensor) -> Tensor:
        k = self.n
        n, c, h, w = x.shape
        ph, pw = max(1, h // k), max(1, w // k)
        if (h, w) != (ph * k, pw * k):
            x = F.adaptive_avg_pool2d(x, (ph * k, pw * k))
        x = x.reshape(n, c, k, ph, k, pw).permute(2, 4, 0, 1, 3, 5)  # [k, k, N, C, ph, pw]
        return x.reshape(k * k * n, c, ph * pw)


# --------------------------------------------------------------------------------------------
# Inter-spatial transforms: [N', C, L] -> [B, R, D]
# --------------------------------------------------------------------------------------------


@TRANSFORMS.register("inter/original")
class InterOriginal(nn.Module):
    """Position-wise view [N', L, C]: each position of each sample is a row of C channel values
    (KL: per-position softmax over channels, as pixel-wise KD; G-L2: per sample L x L position
    similarity, as pair-wise KD)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


@TRANSFORMS.register("inter/sample-wise")
class SampleWise(nn.Module):
    """Sample-wise view [1, N', C*L]: each sample is one row (KL: softmax over C*L per sample;
    G-L2: the N' x N' sample similarity of SP). Dimension-agnostic under G-L2."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(1, x.shape[0], -1)


@TRANSFORMS.register("inter/channel-wise")
class ChannelWise(nn.Module):
    """Channel-wise view [N', C, L]: each channel of each sample is a row over its positions
    (KL: per (n, c) softmax over positions = CWD; G-L2: per-sample C x C channel Gram = ICKD).
    Table 1 writes f^{C, NHW}; samples stay apart here as in CWD and ICKD."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------------------------
# Feature distances on [B, R, D] views (or [N, C] embeddings)
# --------------------------------------------------------------------------------------------


class FeatureDistance(nn.Module):
    embedding = False  # True: works on pooled [N, C] embeddings, transforms do not apply


@FEATURE_DISTANCES.register("l2")
class L2Distance(FeatureDistance):
    """||f_S - f_T||^2; reduction "mean" (over all values, MSE) or "batchmean" (sum / N, N the
    batch size before any transform, as MGD)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "batchmean"):
            raise ValueError(
                f"l2 reduction: expected one of ['batchmean', 'mean'], got {reduction!r}"
            )
        self.reduction = reduction

    def forward(self, s: Tensor, t: Tensor, batch_size: int) -> Tensor:
        d = (s - t.detach()).pow(2)
        return d.mean() if self.reduction == "mean" else d.sum() / batch_size


@FEATURE_DISTANCES.register("kl")
class KLDistance(FeatureDistance):
    """tau^2 * mean over rows of KL(softmax(t/tau) || softmax(s/tau)), softmax over D."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = _positive("kl tau", tau)

    def forward(self, s: Tensor, t: Tensor, batch_size: int) -> Tensor:
        d = s.shape[-1]
        return kernels.softmax_kl(s.reshape(-1, d), t.reshape(-1, d), self.tau)


@FEATURE_DISTANCES.register("gram_l2")
class GramL2Distance(FeatureDistance):
    """G-L2 between the R x R Gram matrices G = X X^T of each group.

    normalize "frobenius" (default, the fused kernel): ||G_S/||G_S||_F - G_T/||G_T||_F||_F^2,
    mean over groups. normalize "row" (SP, ICKD): each Gram row L2-normalised, squared
    differences summed and divided by ``divisor``: "entries" (B*R*R, SP's 1/b^2) or "rows"
    (B*R, ICKD's 1/(b*c)).
    """

    def __init__(self, normalize: str = "frobenius", divisor: str = "entries"):
        super().__init__()
        if normalize not in ("frobenius", "row"):
            raise ValueError(
                f"gram_l2 normalize: expected one of ['frobenius', 'row'], got {normalize!r}"
            )
        if divisor not in ("entries", "rows"):
            raise ValueError(
                f"gram_l2 divisor: expected one of ['entries', 'rows'], got {divisor!r}"
            )
        self.normalize, self.divisor = normalize, divisor

    def forward(self, s: Tensor, t: Tensor, batch_size: int) -> Tensor:
        if self.normalize == "frobenius":
            if s.shape[0] == 1:
                return kernels.gram_l2(s[0], t[0], "sample")
            return kernels.gram_l2(s, t, "channel")
        t = t.detach()
        gs = F.normalize(torch.matmul(s, s.transpose(1, 2)), dim=2)  # [B, R, R]
        gt = F.normalize(torch.matmul(t, t.transpose(1, 2)), dim=2)
        b, r = s.shape[:2]
        den = b * r * r if self.divisor == "entries" else b * r
        return (gs - gt).pow(2).sum() / den


@FEATURE_DISTANCES.register("gram_l2_embed")
class GramL2Embedding(FeatureDistance):
    """G-L2 on embeddings: N x N Grams of the globally pooled features [N, C] (fused kernel,
    sample mode). Any channel counts and sizes."""

    embedding = True

    def forward(self, s: Tensor, t: Tensor, batch_size: int) -> Tensor:
        return kernels.gram_l2(s, t, "sample")


@FEATURE_DISTANCES.register("renyi")
class RenyiDistance(FeatureDistance):
    """Renyi divergence of order alpha between the sample-similarity distributions of the
    embeddings [N, C] (any channel counts and sizes).

    P[i] = softmax_j(cos(e_T[i], e_T[j]) / tau), Q[i] likewise for the student;
    D = mean_i 1/(alpha-1) * log sum_j P[i,j]^alpha Q[i,j]^(1-alpha), computed in log space.
    Zero iff P = Q; cosines are bounded, so Q >= exp(-2/tau)/N and D stays finite.
    """

    embedding = True

    def __init__(self, alpha: float = 2.0, tau: float = 0.5):
        super().__init__()
        self.alpha = _positive("renyi alpha", alpha)
        if self.alpha == 1.0:
            raise ValueError(
                "renyi alpha: expected a positive number other than 1 (alpha=1 is KL), got 1"
            )
        self.tau = _positive("renyi tau", tau)

    def _log_similarity(self, e: Tensor) -> Tensor:
        e = F.normalize(e, dim=1)
        return F.log_softmax(e @ e.t() / self.tau, dim=1)  # [N, N]

    def forward(self, s: Tensor, t: Tensor, batch_size: int) -> Tensor:
        log_p = self._log_similarity(t.detach())
        log_q = self._log_similarity(s)
        a = self.alpha
        return (torch.logsumexp(a * log_p + (1.0 - a) * log_q, dim=1) / (a - 1.0)).mean()


# --------------------------------------------------------------------------------------------
# Logit distances on [N, K]
# --------------------------------------------------------------------------------------------


class LogitDistance(nn.Module):
    """A logit distance: ``forward(s [N, K], t [N, K], tau) -> scalar``. A distance that reads
    the ground-truth classes (DKD) sets ``needs_labels``; it is then called with ``labels`` [N]
    (class indices) as a fourth argument. Every other distance keeps the three-argument call."""

    needs_labels = False


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al. 2024): per sample z -> (z - mean(z)) / (std(z) + eps),
    unbiased std over the K classes, as the published code."""
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"standardisation eps: expected a number >= 0, got {eps!r}")
    return float(eps)


def _non_negative(name, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


@LOGIT_DISTANCES.register("kl")
class LogitKL(LogitDistance):
    """Hinton KD: tau^2 * mean_n KL(softmax(p_T/tau) || softmax(p_S/tau))."""

    def forward(self, s: Tensor, t: Tensor, tau: float) -> Tensor:
        return kernels.softmax_kl(s, t, tau)


@LOGIT_DISTANCES.register("pearson")
class LogitPearson(LogitDistance):
    """DIST: inter + intra, each tau^2 * mean of 1 - Pearson(softmax(p_S/tau), softmax(p_T/tau))
    over samples (inter, per row) and over classes (intra, per column)."""

    def __init__(self, inter: float = 1.0, intra: float = 1.0):
        super().__init__()
        self.inter, self.intra = float(inter), float(intra)

    def forward(self, s: Tensor, t: Tensor, tau: float) -> Tensor:
        inter, intra = kernels.pearson(s, t, tau)
        return self.inter * inter + self.intra * intra


@LOGIT_DISTANCES.register("kl_std")
class LogitStandardKL(LogitDistance):
    """KL on standardised logits (logit standardisation): z -> (z - mean(z)) / (std(z) + eps)
    per sample (unbiased std), then tau^2 * KL of softmax(z/tau); 1/tau is the scale factor of
    the z-scores."""

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = _check_eps(eps)

    def _standardize(self, z: Tensor) -> Tensor:
        return standardize_logits(z, self.eps)

    def forward(self, s: Tensor, t: Tensor, tau: float) -> Tensor:
        return kernels.softmax_kl(self._standardize(s), self._standardize(t), tau)


def _check_labels(labels, s: Tensor, who: str) -> Tensor:
    n, k = s.shape
    if (
        not isinstance(labels, Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        got = f"{labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"{who}: expected labels as an integer tensor of class indices [N], got {got}"
        )
    if labels.shape != (n,):
        raise ValueError(
            f"{who}: expected labels of shape [{n}] (one class index per sample), got "
            f"{list(labels.shape)}"
        )
    # one host sync per call; an out-of-range index would otherwise be a device-side assert
    if n and bool((labels.min() < 0) | (labels.max() >= k)):
        raise ValueError(
            f"{who}: expected labels in [0, {k - 1}], got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    return labels.to(device=s.device, dtype=torch.long)


@LOGIT_DISTANCES.register("dkd")
class LogitDKD(LogitDistance):
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD on softmax(p/tau), with the
    ground-truth class y of each sample (``labels``).

    TCKD = tau^2 * mean_n KL(b_T || b_S), b = [p_y, 1 - p_y] the binary target / non-target
    probabilities; NCKD = tau^2 * mean_n KL(q_T || q_S), q = softmax over the K - 1 non-target
    logits (the target class removed, not down-weighted). KD itself is TCKD + (1 - p_y^T) NCKD;
    DKD drops the (1 - p_y^T) factor and weighs the two parts freely. Published CIFAR-100
    setting: alpha 1, beta 8, tau 4, the loss weight ramped over the first 20 of 240 epochs
    (configs/distillers/dkd.yaml). Computed in log space (log(1 - p_y) is a logsumexp over the
    non-target logits), in float32 or wider. Needs K >= 2; with K = 2 NCKD is 0.
    """

    needs_labels = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0):
        super().__init__()
        self.alpha = _non_negative("dkd alpha", alpha)
        self.beta = _non_negative("dkd beta", beta)

    def _prepare(self, z: Tensor) -> Tensor:
        return z

    def parts(self, s: Tensor, t: Tensor, tau: float, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(TCKD, NCKD), each already times tau^2 and averaged over the batch."""
        who = f"logit distance {type(self).__name__}"
        if s.dim() != 2 or s.shape[1] < 2:
            raise ValueError(
                f"{who}: expected logits [N, K] with K >= 2 classes, got {list(s.shape)}"
            )
        labels = _check_labels(labels, s, who)
        dtype = torch.promote_types(s.dtype, torch.float32)
        zs = self._prepare(s.to(dtype)) / tau  # [N, K]
        zt = self._prepare(t.detach().to(dtype)) / tau
        n, k = zs.shape
        target = F.one_hot(labels, k).bool()  # [N, K]
        # the K - 1 non-target logits of each row, in class order: [N, K - 1]
        ns, nt = zs[~target].view(n, k - 1), zt[~target].view(n, k - 1)
        lse_s, lse_t = torch.logsumexp(zs, dim=1), torch.logsumexp(zt, dim=1)  # [N]
        lse_ns, lse_nt = torch.logsumexp(ns, dim=1), torch.logsumexp(nt, dim=1)
        y = labels[:, None]
        # log [p_y, 1 - p_y] per sample: [N, 2]
        log_bs = torch.stack([zs.gather(1, y)[:, 0] - lse_s, lse_ns - lse_s], dim=1)
        log_bt = torch.stack([zt.gather(1, y)[:, 0] - lse_t, lse_nt - lse_t], dim=1)
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum(dim=1).mean()
        log_qs, log_qt = ns - lse_ns[:, None], nt - lse_nt[:, None]
        nckd = (log_qt.exp() * (log_qt - log_qs)).sum(dim=1).mean()
        return tckd * tau**2, nckd * tau**2

    def forward(self, s: Tensor, t: Tensor, tau: float, labels: Tensor) -> Tensor:
        tckd, nckd = self.parts(s, t, tau, labels)
        return self.alpha * tckd + self.beta * nckd


@LOGIT_DISTANCES.register("dkd_std")
class LogitStandardDKD(LogitDKD):
    """DKD on standardised logits (Sun et al. 2024): both logits z-scored per sample as in
    ``kl_std``, then ``dkd``. The released LS-DKD run on CIFAR-100 is
    configs/distillers/ls_dkd.yaml."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, eps: float = 1e-7):
        super().__init__(alpha, beta)
        self.eps = _check_eps(eps)

    def _prepare(self, z: Tensor) -> Tensor:
        return standardize_logits(z, self.eps)


@LOGIT_DISTANCES.register("mlkd")
class LogitMultiLevel(LogitDistance):
    """Multi-level logit distillation (Jin et al. 2023): instance-, batch- and class-level
    alignment of the predictions P = softmax(p/T) [N, K], summed over the temperatures
    T in {tau} + ``temperatures`` ("prediction augmentation"; the published CIFAR-100 setting is
    tau 4 plus 2, 3, 5, 6):

        instance: T^2 * mean_n KL(P_T[n] || P_S[n])
        batch:    ||P_S P_S^T - P_T P_T^T||_F^2 / N      (N x N sample similarity)
        class:    ||P_S^T P_S - P_T^T P_T||_F^2 / K      (K x K class correlation)

    each part times its weight (``instance``, ``batch``, ``klass``). This is the loss on one view
    of each image. The published method also trains on a weak and a strong augmentation of
    every image (two student and two teacher forwards per step) and masks the weak view's terms
    by teacher confidence: that is a training procedure, not a distance between one student
    and one teacher prediction, so it is not part of this distance (nor of the feature store,
    which caches one view per sample and epoch).
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (2.0, 3.0, 5.0, 6.0),
        instance: float = 1.0,
        batch: float = 1.0,
        klass: float = 1.0,
    ):
        super().__init__()
        if isinstance(temperatures, (int, float)):
            temperatures = [temperatures]
        temps = list(temperatures)
        for v in temps:
            _positive("mlkd temperatures entry", v)
        self.temperatures = [float(v) for v in temps]
        self.instance = _non_negative("mlkd instance", instance)
        self.batch = _non_negative("mlkd batch", batch)
        self.klass = _non_negative("mlkd klass", klass)

    def _prepare(self, z: Tensor) -> Tensor:
        return z

    def parts(self, s: Tensor, t: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(instance, batch, class), each summed over the temperatures, unweighted."""
        dtype = torch.promote_types(s.dtype, torch.float32)
        zs, zt = self._prepare(s.to(dtype)), self._prepare(t.detach().to(dtype))
        n, k = zs.shape
        inst = bat = cls = zs.new_zeros(())
        for temp in [float(tau)] + self.temperatures:
            log_ps, log_pt = F.log_softmax(zs / temp, dim=1), F.log_softmax(zt / temp, dim=1)
            ps, pt = log_ps.exp(), log_pt.exp()
            inst = inst + temp**2 * (pt * (log_pt - log_ps)).sum(dim=1).mean()
            bat = bat + (ps @ ps.t() - pt @ pt.t()).pow(2).sum() / n
            cls = cls + (ps.t() @ ps - pt.t() @ pt).pow(2).sum() / k
        return inst, bat, cls

    def forward(self, s: Tensor, t: Tensor, tau: float) -> Tensor:
        inst, bat, cls = self.parts(s, t, tau)
        return self.instance * inst + self.batch * bat + self.klass * cls


@LOGIT_DISTANCES.register("mlkd_std")
class LogitStandardMultiLevel(LogitMultiLevel):
    """``mlkd`` on standardised logits (both z-scored per sample, as ``kl_std``), the LS-MLKD
    combination of Sun et al. 2024."""

    def __init__(
        self,
        temperatures: Sequence[float] = (2.0, 3.0, 5.0, 6.0),
        instance: float = 1.0,
        batch: float = 1.0,
        klass: float = 1.0,
        eps: float = 1e-7,
    ):
        super().__init__(temperatures, instance, batch, klass)
        self.eps = _check_eps(eps)

    def _prepare(self, z: Tensor) -> Tensor:
        return standardize_logits(z, self.eps)


# --------------------------------------------------------------------------------------------
# Schedules of the loss weights: training progress in [0, 1] -> factor
# --------------------------------------------------------------------------------------------


@SCHEDULES.register("constant")
class Constant:
    """Factor 1 throughout."""

    def __call__(self, progress: float) -> float:
        return 1.0


@SCHEDULES.register("warm-up")
class WarmUp:
    """Linear ramp 0 -> 1 over the first ``fraction`` of training, then 1.

    ``stages`` = 0 (default): continuous, factor = min(1, progress / fraction). ``stages`` = E:
    the ramp moves in E equal steps that start at 1/E, factor = min(1, (floor(progress / fraction
    * E) + 1) / E): with fraction 20/240 and E = 20 that is DKD's per-epoch min(epoch / 20, 1)
    (epochs counted from 1) on its 240-epoch schedule, and the same shape on any other length.
    """

    def __init__(self, fraction: float = 0.2, stages: int = 0):
        self.fraction = _positive("warm-up fraction", fraction)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 0:
            raise ValueError(
                f"warm-up stages: expected an integer >= 0 (0: continuous), got {stages!r}"
            )
        self.stages = stages

    def __call__(self, progress: float) -> float:
        ramp = max(0.0, progress) / self.fraction
        if self.stages:
            return min(1.0, (math.floor(ramp * self.stages) + 1) / self.stages)
        return min(1.0, ramp)


@SCHEDULES.register("early-stop")
class EarlyStop:
    """Factor 1 until ``fraction`` of training, then 0 (the student trains on its own loss)."""

    def __init__(self, fraction: float = 0.75):
        self.fraction = _positive("early-stop fraction", fraction)

    def __call__(self, progress: float) -> float:
        return 1.0 if progress < self.fraction else 0.0


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _as_4d(x: Tensor, who: str) -> Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    raise ValueError(
        f"{who}: expected a feature tensor [N, C, H, W] or [N, C], got shape {list(x.shape)}"
    )


def needs_channel_match(spec) -> bool:
    """Whether the design compares student and teacher channel by channel (then a student
    adapter bridges unequal channel counts)."""
    if (
        spec.feature_distance.key == "none"
        or FEATURE_DISTANCES.get(spec.feature_distance.key).embedding
    ):
        return False
    g = spec.global_transform
    if g.key == "at_map":
        return False
    if g.key == "mask" and g.kwargs.get("generate", False):
        return True
    return not (spec.inter_spatial.key == "sample-wise" and spec.feature_distance.key == "gram_l2")


def needs_size_match(spec) -> bool:
    """Whether the design compares positions (then the larger map is pooled to the smaller)."""
    if (
        spec.feature_distance.key == "none"
        or FEATURE_DISTANCES.get(spec.feature_distance.key).embedding
    ):
        return False
    # A global transform that relates the two maps position by position declares it
    # (needs_same_size); then the maps are pooled to one size whatever the later levels.
    if TRANSFORMS.get(f"global/{spec.global_transform.key}").needs_same_size:
        return True
    return not (spec.inter_spatial.key == "sample-wise" and spec.feature_distance.key == "gram_l2")


class Adapter(nn.Module):
    """1x1 conv (no bias) + BN from the student's channels to the teacher's."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class FeatureLoss(nn.Module):
    """D_f(T_f(f_S, f_T)) for one (student, teacher) feature pair of a spec, unweighted.

    Built from the channel counts only (every trainable part depends on channels alone); sizes
    are aligned per call. ``student_channels`` / ``teacher_channels`` may be None when the
    design needs no adapter.
    """

    def __init__(
        self, spec, student_channels: Optional[int] = None, teacher_channels: Optional[int] = None
    ):
        super().__init__()
        self.spec = spec
        self.match_size = needs_size_match(spec)
        self.adapter = None
        adapter_mode = spec.adapter
        if needs_channel_match(spec) and adapter_mode != "never":
            if adapter_mode == "always" or student_channels != teacher_channels:
                if not student_channels or not teacher_channels:
                    raise ValueError(
                        f"FeatureLoss: design {spec.label()} needs the student and teacher channel "
                        f"counts to build its adapter, got {student_channels!r} and "
                        f"{teacher_channels!r}"
                    )
                self.adapter = Adapter(student_channels, teacher_channels)
        g = spec.global_transform
        extra = (
            {"channels": teacher_channels} if g.key == "mask" and g.kwargs.get("generate") else {}
        )
        self.global_transform = TRANSFORMS.build(
            {"key": "global/" + g.key, "kwargs": g.kwargs}, **extra
        )
        self.intra = TRANSFORMS.build(
            {"key": "intra/" + spec.intra_spatial.key, "kwargs": spec.intra_spatial.kwargs}
        )
        self.inter = TRANSFORMS.build(
            {"key": "inter/" + spec.inter_spatial.key, "kwargs": spec.inter_spatial.kwargs}
        )
        self.distance = FEATURE_DISTANCES.build(spec.feature_distance.as_config())

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        s = _as_4d(s, "FeatureLoss student")
        t = _as_4d(t, "FeatureLoss teacher").detach()
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"FeatureLoss: expected equal batch sizes, got student {list(s.shape)} "
                f"and teacher {list(t.shape)}"
            )
        batch = s.shape[0]
        if self.distance.embedding:
            return self.distance(s.mean(dim=(2, 3)), t.mean(dim=(2, 3)), batch)
        if self.adapter is not None:
            s = self.adapter(s)
        if self.match_size and s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s = F.adaptive_avg_pool2d(s, size) if s.shape[-2:] != size else s
            t = F.adaptive_avg_pool2d(t, size) if t.shape[-2:] != size else t
        s, t = self.global_transform(s, t)
        vs, vt = self.inter(self.intra(s)), self.inter(self.intra(t))
        if vs.shape[-1] != vt.shape[-1] and not isinstance(self.distance, GramL2Distance):
            raise ValueError(
                f"FeatureLoss: design {self.spec.label()} compares views of different widths "
                f"{list(vs.shape)} and {list(vt.shape)}; use adapter 'auto' or 'always'"
            )
        return self.distance(vs, vt, batch)


class LogitLoss(nn.Module):
    """D_p(p_S/tau, p_T/tau) of a spec, unweighted. ``labels`` [N] (class indices) reach the
    distances that read the ground truth (``needs_labels``, e.g. DKD) and are ignored by the
    others."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.tau = float(spec.temperature)
        self.distance = LOGIT_DISTANCES.build(spec.logit_distance.as_config())

    @property
    def needs_labels(self) -> bool:
        return bool(self.distance.needs_labels)

    def forward(self, s: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if s.dim() != 2 or s.shape != t.shape:
            raise ValueError(
                f"LogitLoss: expected student and teacher logits of one shape [N, K], "
                f"got {list(s.shape)} and {list(t.shape)}"
            )
        if not self.distance.needs_labels:
            return self.distance(s, t.detach(), self.tau)
        if labels is None:
            raise ValueError(
                f"LogitLoss: design {self.spec.label()} uses the logit distance "
                f"{self.spec.logit_distance.key!r}, which needs the ground-truth labels; pass "
                f"labels= (class indices [N]) with the logits"
            )
        return self.distance(s, t.detach(), self.tau, labels)


@dataclass
class LossOutput:
    """Weighted terms: loss_kd = loss_feature + loss_logit; ``mu`` holds the per-pair factors
    of the feature term (see ``DistillLoss``); ``pair_losses`` the unweighted D_f per pair."""

    loss_kd: Tensor
    loss_feature: Tensor
    loss_logit: Tensor
    mu: Tensor
    pair_losses: List[Tensor] = field(default_factory=list)


def _tensors(*groups):
    """The tensors of arguments that are a tensor, a list of tensors or None."""
    for g in groups:
        if isinstance(g, Tensor):
            yield g
        elif g is not None:
            yield from (x for x in g if isinstance(x, Tensor))


def _low_precision(*groups) -> bool:
    """Whether autocast is on for the inputs' device or any input is half precision."""
    first = next(_tensors(*groups), None)
    if first is None:
        return False
    if torch.is_autocast_enabled(first.device.type):
        return True
    return any(x.dtype in (torch.float16, torch.bfloat16) for x in _tensors(*groups))


def _to_float(x):
    """Half-precision tensors (alone or in a list) as float32; anything else as it is."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x is None:
        return None
    return [_to_float(t) for t in x]


def feature_entropy(t: Tensor) -> Tensor:
    """Normalised Shannon entropy of a teacher feature: per sample, softmax over all its values
    (D = C*H*W), entropy divided by log D (so 0..1 whatever the layer size), mean over samples.
    D = 1 gives 1."""
    x = t.reshape(t.shape[0], -1).float()
    d = x.shape[1]
    if d < 2:
        return torch.ones((), device=t.device)
    log_p = F.log_softmax(x, dim=1)
    return (-(log_p.exp() * log_p).sum(dim=1) / math.log(d)).mean()


def train_free_factors(students: Sequence[Tensor], teachers: Sequence[Tensor]) -> Tensor:
    """mu_q = entropy(f_T^q) * CKA(f_S^q, f_T^q), normalised to sum 1, without gradient.

    CKA is linear, biased, on the raw flattened features [N, D_S], [N, D_T] (no adapter, so the
    factors do not move with training). Normalising keeps W_f the total feature weight: one pair
    gets mu = 1, exactly Eq. (1). Fewer than two samples leave CKA undefined and it counts as 1;
    if every factor is 0 the pairs share equally.
    """
    with torch.no_grad():
        mus = []
        for s, t in zip(students, teachers):
            ent = feature_entropy(t)
            if s.shape[0] < 2:
                sim = torch.ones((), device=t.device)
            else:
                sim = kernels.cka(
                    s.reshape(s.shape[0], -1).float(), t.reshape(t.shape[0], -1).float(), False
                )
                sim = torch.nan_to_num(sim, nan=0.0).clamp(0.0, 1.0)
            mus.append(ent.float() * sim.float())
        mu = torch.stack(mus)
        total = mu.sum()
        if not bool(total > 0):
            return torch.full_like(mu, 1.0 / len(mus))
        return mu / total


class DistillLoss(nn.Module):
    """The whole loss of a ``DistillerSpec`` on given tensors:
    L_KD = s(progress) * (W_f * sum_q mu_q * D_f(T_f(f_S^q, f_T^q)) + W_p * mean_j D_p(p_S, p_T^j)).

    ``channels``: one (student_channels, teacher_channels) per feature pair (a bare pair for
    one). Feature pairs are compared in order; several pairs (layers or teachers) are weighted
    by ``spec.layer_weighting``: "tf" (train-free mu_q, sum 1), "mean" (1/Q) or "sum" (1 each).
    Usable on any features, e.g. an FPN level per pair in a detector.

    Several teachers' logits [N, K] each (a list): the logit term is the mean of the per-teacher
    distances, ``mean_j D_p(p_S, p_T^j)``, so W_p stays the total logit weight whatever the
    number of teachers (as mu_q keeps W_f the total feature weight). Why the mean of the losses
    rather than one distance to the teachers' mean probabilities: for KL the two are the same
    training signal (mean_j KL(q_j || s) = KL(mean_j q_j || s) + a term without the student,
    so equal gradients), while the other distances are defined on each teacher's own logits
    (Pearson correlation, standardisation, DKD's target/non-target split, MLKD's batch and
    class correlations), where averaging probabilities first has no meaning of its own.
    """

    def __init__(
        self, spec, channels: Union[None, Tuple[int, int], Sequence[Tuple[int, int]]] = None
    ):
        super().__init__()
        if isinstance(spec, (str, os.PathLike, Mapping)):
            # autokd.nn sits below autokd.space and never imports it: a name, a mapping or YAML
            # becomes a spec there
            raise TypeError(
                f"DistillLoss: expected a DistillerSpec, got {type(spec).__name__} {spec!r}; "
                "build one with autokd.space.DistillerSpec.coerce(...) (a classic distiller's "
                "name, a mapping, YAML text or a path)"
            )
        self.spec = spec
        if channels is None:
            channels = [(None, None)]
        elif len(channels) == 2 and all(isinstance(c, int) or c is None for c in channels):
            channels = [tuple(channels)]
        self.has_feature = spec.feature_distance.key != "none"
        self.has_logit = spec.logit_distance.key != "none"
        self.pairs = nn.ModuleList(
            [FeatureLoss(spec, cs, ct) for cs, ct in channels] if self.has_feature else []
        )
        self.logit = LogitLoss(spec) if self.has_logit else None
        self.schedule = SCHEDULES.build(spec.schedule.as_config())
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done, in [0, 1], for the weight schedule."""
        self.progress = float(fraction)

    def weight_factor(self) -> float:
        return float(self.schedule(self.progress))

    @property
    def needs_labels(self) -> bool:
        """Whether ``forward`` needs ``labels`` (the design's logit distance reads them)."""
        return self.logit is not None and self.logit.needs_labels

    def forward(
        self,
        student_features=None,
        teacher_features=None,
        student_logits=None,
        teacher_logits=None,
        labels=None,
    ) -> LossOutput:
        """``labels`` [N]: ground-truth class indices, read only by distances that need them
        (DKD); None is fine for every other design.

        Mixed precision: half-precision inputs (what autocast hands over) are cast to float32
        once, here, and the loss runs with autocast off, so every term is computed and
        returned in float32 whatever the caller's precision. Measured on CPU
        (benchmarks/bench_precision.py: bf16 student, [64, 64, 8, 8] features, [64, 100]
        logits, forward + backward, one thread): cast-once costs 0.27 / 0.97 / 2.56 ms for kd /
        cwd / a multi-scale attention KL + Pearson design against 0.25 / 0.99 / 2.57 ms with
        the kernels on bfloat16 inputs (they accept them): the same, within noise; the loss's
        relative error vs float32 is 3e-6..6e-5 against 1e-3..2e-3 in bfloat16 (the teacher's
        targets lose their low bits too), and some eager transforms (the random mask) refuse
        mixed dtypes. The loss is a small share of a step: float32 it is."""
        if _low_precision(student_features, teacher_features, student_logits, teacher_logits):
            device_type = next(
                x.device.type
                for x in _tensors(
                    student_features, teacher_features, student_logits, teacher_logits
                )
            )
            with torch.autocast(device_type, enabled=False):
                return self._forward(
                    _to_float(student_features),
                    _to_float(teacher_features),
                    _to_float(student_logits),
                    _to_float(teacher_logits),
                    labels,
                )
        return self._forward(
            student_features, teacher_features, student_logits, teacher_logits, labels
        )

    def _forward(
        self, student_features, teacher_features, student_logits, teacher_logits, labels
    ) -> LossOutput:
        factor = self.weight_factor()
        candidates = (
            [student_features]
            if isinstance(student_features, Tensor)
            else list(student_features or [])
        )
        ref = next((x for x in candidates + [student_logits] if isinstance(x, Tensor)), None)
        device = ref.device if ref is not None else None
        zero = torch.zeros((), device=device)
        loss_f, mu, pair_losses = zero, torch.ones(0, device=device), []
        if self.has_feature:
            fs = (
                [student_features]
                if isinstance(student_features, Tensor)
                else list(student_features or [])
            )
            ft = (
                [teacher_features]
                if isinstance(teacher_features, Tensor)
                else list(teacher_features or [])
            )
            if len(fs) != len(self.pairs) or len(ft) != len(self.pairs):
                raise ValueError(
                    f"DistillLoss: expected {len(self.pairs)} student and teacher feature "
                    f"tensors, got {len(fs)} and {len(ft)}"
                )
            pair_losses = [pair(s, t) for pair, s, t in zip(self.pairs, fs, ft)]
            q = len(pair_losses)
            mode = self.spec.layer_weighting
            if q == 1:
                mu = torch.ones(1, device=device)
            elif mode == "tf":
                mu = train_free_factors(fs, ft)
            elif mode == "mean":
                mu = torch.full((q,), 1.0 / q, device=device)
            else:
                mu = torch.ones(q, device=device)
            weighted = sum(m.to(pl.dtype) * pl for m, pl in zip(mu, pair_losses))
            loss_f = (self.spec.feature_weight * factor) * weighted
        loss_p = zero
        if self.has_logit:
            if student_logits is None or teacher_logits is None:
                raise ValueError(
                    f"DistillLoss: design {self.spec.label()} has a logit distance and "
                    "needs student and teacher logits"
                )
            tl = [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
            if not tl:
                raise ValueError(
                    f"DistillLoss: design {self.spec.label()} has a logit distance; "
                    "expected the logits of 1 or more teachers, got an empty list"
                )
            for j, t in enumerate(tl):
                if not isinstance(t, Tensor) or t.shape != student_logits.shape:
                    got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"DistillLoss: expected teacher {j}'s logits of the student's shape "
                        f"{list(student_logits.shape)}, got {got}"
                    )
            d = sum(self.logit(student_logits, t, labels) for t in tl) / len(tl)
            loss_p = (self.spec.logit_weight * factor) * d
        return LossOutput(loss_f + loss_p, loss_f, loss_p, mu, pair_losses)
