"""Eager reference of ``autokd::multiscale_pool``: the spec its kernels are tested against."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def multiscale_pool(input: torch.Tensor, grids: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Adaptive average pooling of ``input`` [N, C, H, W] to each s x s grid of ``grids``,
    flattened row-major and concatenated in the order of ``grids`` -> [N, C, sum s^2]."""
    return torch.cat([F.adaptive_avg_pool2d(input, s).flatten(2) for s in grids], dim=2)
