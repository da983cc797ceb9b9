"""Batched, replayable augmentation: random crop with zero padding (zero is the mean colour of
normalised images) and optional horizontal flip.

Split in two so a cache of teacher features can replay exactly the views it stored:
``sample_augmentation`` draws the parameters (crop offsets, flips) from a generator,
``apply_augmentation`` applies given parameters; ``augment`` does both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def default_padding(image_size: Tuple[int, int]) -> int:
    """Crop padding of 1/8 of the shorter image side, at least 1 (4 pixels on 32x32, 1 on 8x8,
    2 on 16x40): the one rule for teacher training (train/teacher.py) and the replayable views
    of the search and distillation (pipeline.make_augment), so a teacher sees the crops the
    student is distilled on. The shorter side, because one padding serves both axes and more
    than 1/8 of the short side would crop away much of a narrow image."""
    return max(1, min(image_size) // 8)


def sample_augmentation(n: int, pad: int, flip: bool, generator: Optional[torch.Generator] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw crop offsets [n, 2] (row, col in 0..2*pad) and flips [n] (bool) on the CPU."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def apply_augmentation(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                       pad: int) -> torch.Tensor:
    """Crop each image of [N, C, H, W] from its zero-padded copy at ``offsets`` and flip it
    horizontally where ``flips``; returns a new [N, C, H, W] tensor."""
    n, c, h, w = images.shape
    if offsets.shape != (n, 2) or flips.shape != (n,):
        raise ValueError(f"augmentation: expected offsets [{n}, 2] and flips [{n}], got "
                         f"{list(offsets.shape)} and {list(flips.shape)}")
    dev = images.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols)  # a flip is a reversed column order
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # [N, H]
    cols = offsets[:, 1:] + cols  # [N, W]
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def augment(images: torch.Tensor, pad: int, flip: bool,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    offsets, flips = sample_augmentation(images.shape[0], pad, flip, generator)
    return apply_augmentation(images, offsets, flips, pad)
