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

import math
from typing import NamedTuple

import numpy as np
import torch

from autokd.data.augment import apply_augmentation

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def _as_u64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(
            f"autokd.store.ReplayAugment: expected integer indices/views, got dtype {a.dtype}"
        )
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError("autokd.store.ReplayAugment: expected non-negative indices/views")
    return a.astype(np.uint64)


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
                f"autokd.store.ReplayAugment: expected crop_padding an int >= 0, got {crop_padding!r}"
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
            raise ValueError(f"autokd.store.ReplayAugment.apply: expected img of shape [C, H, W], got {list(img.shape)}")
        offsets = torch.tensor([[params.dy, params.dx]])
        return apply_augmentation(img[None], offsets, torch.tensor([bool(params.flip)]), self.crop_padding)[0]

    def apply_batch(self, imgs: torch.Tensor, indices, views) -> torch.Tensor:
        """imgs [B, C, H, W] (sample indices[b]) -> the same images as apply() per item, in one
        gather (autokd.data.augment.apply_augmentation: the crop-flip every trainer uses)."""
        if imgs.dim() != 4:
            raise ValueError(
                f"autokd.store.ReplayAugment.apply_batch: expected imgs of shape [B, C, H, W], got {list(imgs.shape)}"
            )
        b = imgs.shape[0]
        dy, dx, flip = self.params_batch(indices, views)
        if dy.size != b:
            raise ValueError(
                f"autokd.store.ReplayAugment.apply_batch: expected {b} indices (one per image), got {dy.size}"
            )
        offsets = torch.from_numpy(np.stack([dy, dx], axis=1))
        return apply_augmentation(imgs, offsets, torch.from_numpy(flip), self.crop_padding)


class CropParams(NamedTuple):
    top: int  # the crop box in the decoded image, in pixels
    left: int
    height: int
    width: int
    flip: bool


class ReplayResizedCrop:
    """Random-resized crop and flip (the ImageNet training augmentation, as torchvision's
    ``RandomResizedCrop`` + ``RandomHorizontalFlip``) whose parameters for (sample i, view v) are
    a hash of (seed, i, v) and the decoded image's size: the streamed ``folder:`` data
    (autokd.data.stream) decodes and crops in DataLoader worker processes, and the feature store
    and the training both get exactly the same crop of every (sample, view).

    Parameters: with ``h = mix(mix(mix(seed) ^ i) ^ v)`` (the SplitMix64 finaliser of
    ``ReplayAugment``), the k-th uniform draw is ``u_k = mix(h ^ (k + 1)) / 2^64`` in [0, 1).
    Attempt a (of 10, Szegedy et al. 2015's Inception crop): area fraction
    ``s = scale[0] + u_{4a} (scale[1] - scale[0])``, aspect ``r = exp(log ratio[0] +
    u_{4a+1} (log ratio[1] - log ratio[0]))``, ``w = round(sqrt(s A r))``, ``h = round(sqrt(s A
    / r))``; the first that fits the H x W image is placed at ``top = floor(u_{4a+2} (H - h +
    1))``, ``left = floor(u_{4a+3} (W - w + 1))``. If none fits: the largest centred box with an
    aspect inside ``ratio``. Flip: ``(h >> 42) & 1`` (0 when ``flip`` is False). The box is then
    resized to ``size`` x ``size`` (bilinear, antialiased) by torchvision.
    """

    VERSION = 1

    def __init__(self, seed: int = 0, size: int = 224, scale=(0.08, 1.0),
                 ratio=(3.0 / 4.0, 4.0 / 3.0), flip: bool = True):
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected seed an int in [0, 2^64), got {seed!r}")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected size an int >= 1, got {size!r}")
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"autokd.store.ReplayResizedCrop: expected scale (lo, hi) with "
                             f"0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"autokd.store.ReplayResizedCrop: expected ratio (lo, hi) with "
                             f"0 < lo <= hi, got {ratio}")
        self.seed, self.size, self.flip = int(seed), int(size), bool(flip)
        self.scale, self.ratio = scale, ratio

    def __repr__(self):
        return (f"ReplayResizedCrop(seed={self.seed}, size={self.size}, scale={self.scale}, "
                f"ratio={self.ratio}, flip={self.flip})")

    def identity(self) -> str:
        """Describes the augmentation completely; stored in the feature store's header."""
        return (f"ReplayResizedCrop/v{self.VERSION} hash=splitmix64(seed,i,v) seed={self.seed} "
                f"size={self.size} scale={self.scale[0]:g},{self.scale[1]:g} "
                f"ratio={self.ratio[0]:.6g},{self.ratio[1]:.6g} resize=bilinear+antialias "
                f"flip={int(self.flip)}")

    def params(self, i: int, v: int, height: int, width: int) -> CropParams:
        """The crop box and flip of view ``v`` of sample ``i`` of a ``height`` x ``width`` image."""
        h = _mix(_mix(_mix(np.array([self.seed], dtype=np.uint64)) ^ _as_u64([i]))
                 ^ _as_u64([v]))
        draws = _mix(h ^ np.arange(1, 41, dtype=np.uint64))  # 10 attempts x 4 draws
        u = (draws >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1), 53 bits
        flip = bool(((h[0] >> np.uint64(42)) & np.uint64(1))) and self.flip
        area = height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for a in range(10):
            target = area * (self.scale[0] + u[4 * a] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(lo + u[4 * a + 1] * (hi - lo))
            w = int(round(math.sqrt(target * aspect)))
            hh = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < hh <= height:
                top = min(int(u[4 * a + 2] * (height - hh + 1)), height - hh)
                left = min(int(u[4 * a + 3] * (width - w + 1)), width - w)
                return CropParams(top, left, hh, w, flip)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, hh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            hh, w = height, int(round(height * self.ratio[1]))
        else:
            w, hh = width, height
        return CropParams((height - hh) // 2, (width - w) // 2, hh, w, flip)

    def apply(self, img, i: int, v: int):
        """A PIL image (or a [C, H, W] tensor) -> its view ``v`` as sample ``i``: cropped,
        resized to size x size, flipped; the same type as given."""
        from torchvision.transforms import functional as TF  # torchvision only where used

        if isinstance(img, torch.Tensor):
            height, width = int(img.shape[-2]), int(img.shape[-1])
        else:
            width, height = img.size
        p = self.params(i, v, height, width)
        out = TF.resized_crop(img, p.top, p.left, p.height, p.width, [self.size, self.size],
                              interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.hflip(out) if p.flip else out
