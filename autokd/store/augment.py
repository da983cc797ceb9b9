"""Replayable augmentation: the random parameters of view v of sample i are a pure function of
(seed, i, v), so the student can see exactly the image the teacher saw when its features were
stored, in any process, in any order, without global RNG state.

Parameters come from a counter-based hash (SplitMix64 finaliser, all arithmetic mod 2^64):

    mix(x) = z ^ (z >> 31), where z = x + 0x9E3779B97F4A7C15,
             z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9, z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    h = mix(mix(mix(seed) ^ i) ^ v)
    dy = h mod (2p + 1);  dx = (h >> 21) mod (2p + 1);  flip = (h >> 42) & 1  (0 if flip=False)

The image is zero-padded by p = crop_padding on each side and the H x W window starting at
(dy, dx) is cut out (dy = dx = p is the unshifted image), then mirrored left-right when flip = 1:
the standard CIFAR "pad 4, random crop, random flip". Every view, view 0 included, is augmented;
a store with K views holds K independent augmentations of each sample.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# The counter-based hash lives with the data's augmentations (autokd.data.augment), which the
# streamed folders' ReplayResizedCrop shares; it is re-exported here for the store's users.
from autokd.data.augment import CropParams, ReplayResizedCrop, apply_augmentation
from autokd.data.augment import as_u64 as _as_u64
from autokd.data.augment import splitmix64 as _mix

__all__ = ["AugParams", "CropParams", "ReplayAugment", "ReplayResizedCrop"]


class AugParams(NamedTuple):
    dy: int  # row of the crop window in the padded image, in [0, 2p]
    dx: int  # column of the crop window, in [0, 2p]
    flip: bool


class ReplayAugment:
    """Pad-crop-flip whose parameters for (sample i, view v) are a hash of (seed, i, v)."""

    VERSION = 1

    def __init__(self, seed: int = 0, crop_padding: int = 4, flip: bool = True):
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise ValueError(
                f"autokd.store.ReplayAugment: expected seed an int in [0, 2^64), got {seed!r}"
            )
        if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
            raise ValueError(
                "autokd.store.ReplayAugment: expected crop_padding an int >= 0, "
                f"got {crop_padding!r}"
            )
        self.seed = int(seed)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    def __repr__(self):
        return (
            f"ReplayAugment(seed={self.seed}, crop_padding={self.crop_padding}, flip={self.flip})"
        )

    def identity(self) -> str:
        """Describes the augmentation completely; stored in the feature store's header."""
        return (
            f"ReplayAugment/v{self.VERSION} hash=splitmix64(seed,i,v) pad=zero "
            f"seed={self.seed} crop_padding={self.crop_padding} flip={int(self.flip)}"
        )

    def params_batch(self, indices, views):
        """Vectorised params: arrays dy, dx (int64) and flip (bool), one entry per (index, view)."""
        i = _as_u64(indices).reshape(-1)
        v = _as_u64(views).reshape(-1)
        if v.size == 1 and i.size != 1:
            v = np.full(i.shape, v[0], dtype=np.uint64)
        if v.shape != i.shape:
            raise ValueError(
                f"autokd.store.ReplayAugment: expected one view per index, got {v.size} views "
                f"for {i.size} indices"
            )
        h = _mix(_mix(_mix(np.array([self.seed], dtype=np.uint64)) ^ i) ^ v)
        span = np.uint64(2 * self.crop_padding + 1)
        dy = (h % span).astype(np.int64)
        dx = ((h >> np.uint64(21)) % span).astype(np.int64)
        flip = ((h >> np.uint64(42)) & np.uint64(1)).astype(bool) & self.flip
        return dy, dx, flip

    def params(self, i: int, v: int) -> AugParams:
        dy, dx, flip = self.params_batch([i], [v])
        return AugParams(int(dy[0]), int(dx[0]), bool(flip[0]))

    def apply(self, img: torch.Tensor, params: AugParams) -> torch.Tensor:
        """img [C, H, W] -> augmented [C, H, W] (a new tensor)."""
        if img.dim() != 3:
            raise ValueError(
                "autokd.store.ReplayAugment.apply: expected img of shape [C, H, W], "
                f"got {list(img.shape)}"
            )
        offsets = torch.tensor([[params.dy, params.dx]])
        return apply_augmentation(
            img[None], offsets, torch.tensor([bool(params.flip)]), self.crop_padding
        )[0]

    def apply_batch(self, imgs: torch.Tensor, indices, views) -> torch.Tensor:
        """imgs [B, C, H, W] (sample indices[b]) -> the same images as apply() per item, in one
        gather (autokd.data.augment.apply_augmentation: the crop-flip every trainer uses)."""
        if imgs.dim() != 4:
            raise ValueError(
                "autokd.store.ReplayAugment.apply_batch: expected imgs of shape [B, C, H, W], "
                f"got {list(imgs.shape)}"
            )
        b = imgs.shape[0]
        dy, dx, flip = self.params_batch(indices, views)
        if dy.size != b:
            raise ValueError(
                f"autokd.store.ReplayAugment.apply_batch: expected {b} indices (one per image), "
                f"got {dy.size}"
            )
        offsets = torch.from_numpy(np.stack([dy, dx], axis=1))
        return apply_augmentation(imgs, offsets, torch.from_numpy(flip), self.crop_padding)
