"""Batched, replayable augmentation: random crop with zero padding (zero is the mean colour of
normalised images) and optional horizontal flip.

Split in two so a cache of teacher features can replay exactly the views it stored:
``sample_augmentation`` draws the parameters (crop offsets, flips) from a generator,
``apply_augmentation`` applies given parameters; ``augment`` does both.

``ReplayResizedCrop``: the random-resized crop and flip of streamed image folders
(autokd.data.stream), its parameters a hash (``splitmix64``) of (seed, sample, view, image size),
so the feature store and the training cut the same view of every sample.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def default_padding(image_size: tuple[int, int]) -> int:
    """Crop padding of 1/8 of the shorter image side, at least 1 (4 pixels on 32x32, 1 on 8x8,
    2 on 16x40): the one rule for teacher training (train/teacher.py) and the replayable views
    of the search and distillation (pipeline.make_augment), so a teacher sees the crops the
    student is distilled on. The shorter side, because one padding serves both axes and more
    than 1/8 of the short side would crop away much of a narrow image."""
    return max(1, min(image_size) // 8)


def sample_augmentation(
    n: int, pad: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw crop offsets [n, 2] (row, col in 0..2*pad) and flips [n] (bool) on the CPU."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def apply_augmentation(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int
) -> torch.Tensor:
    """Crop each image of [N, C, H, W] from its zero-padded copy at ``offsets`` and flip it
    horizontally where ``flips``; returns a new [N, C, H, W] tensor."""
    n, _c, h, w = images.shape
    if offsets.shape != (n, 2) or flips.shape != (n,):
        raise ValueError(
            f"augmentation: expected offsets [{n}, 2] and flips [{n}], got "
            f"{list(offsets.shape)} and {list(flips.shape)}"
        )
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


def augment(
    images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    offsets, flips = sample_augmentation(images.shape[0], pad, flip, generator)
    return apply_augmentation(images, offsets, flips, pad)


# ------------------------------------------------------- replayable random-resized crop

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser of every uint64 in ``x`` (arithmetic mod 2^64): the
    counter-based hash of the replayable augmentations (autokd.store.ReplayAugment,
    ReplayResizedCrop)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def as_u64(x) -> np.ndarray:
    """Sample ids or views (a tensor, an array, a list) as uint64; non-integers and negatives
    are refused."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(
            f"replayable augmentation: expected integer indices/views, got dtype {a.dtype}"
        )
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError("replayable augmentation: expected non-negative indices/views")
    return a.astype(np.uint64)


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

    def __init__(
        self,
        seed: int = 0,
        size: int = 224,
        scale=(0.08, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        flip: bool = True,
    ):
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected seed an int in [0, 2^64), got {seed!r}"
            )
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected size an int >= 1, got {size!r}"
            )
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected scale (lo, hi) with "
                f"0 < lo <= hi <= 1, got {scale}"
            )
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"autokd.store.ReplayResizedCrop: expected ratio (lo, hi) with "
                f"0 < lo <= hi, got {ratio}"
            )
        self.seed, self.size, self.flip = int(seed), int(size), bool(flip)
        self.scale, self.ratio = scale, ratio

    def __repr__(self):
        return (
            f"ReplayResizedCrop(seed={self.seed}, size={self.size}, scale={self.scale}, "
            f"ratio={self.ratio}, flip={self.flip})"
        )

    def identity(self) -> str:
        """Describes the augmentation completely; stored in the feature store's header."""
        return (
            f"ReplayResizedCrop/v{self.VERSION} hash=splitmix64(seed,i,v) seed={self.seed} "
            f"size={self.size} scale={self.scale[0]:g},{self.scale[1]:g} "
            f"ratio={self.ratio[0]:.6g},{self.ratio[1]:.6g} resize=bilinear+antialias "
            f"flip={int(self.flip)}"
        )

    def params(self, i: int, v: int, height: int, width: int) -> CropParams:
        """The crop box and flip of view ``v`` of sample ``i`` of a ``height`` x ``width`` image."""
        h = splitmix64(
            splitmix64(splitmix64(np.array([self.seed], dtype=np.uint64)) ^ as_u64([i]))
            ^ as_u64([v])
        )
        draws = splitmix64(h ^ np.arange(1, 41, dtype=np.uint64))  # 10 attempts x 4 draws
        u = (draws >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1), 53 bits
        flip = bool((h[0] >> np.uint64(42)) & np.uint64(1)) and self.flip
        area = height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for a in range(10):
            target = area * (self.scale[0] + u[4 * a] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(lo + u[4 * a + 1] * (hi - lo))
            w = round(math.sqrt(target * aspect))
            hh = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < hh <= height:
                top = min(int(u[4 * a + 2] * (height - hh + 1)), height - hh)
                left = min(int(u[4 * a + 3] * (width - w + 1)), width - w)
                return CropParams(top, left, hh, w, flip)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, hh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            hh, w = height, round(height * self.ratio[1])
        else:
            w, hh = width, height
        return CropParams((height - hh) // 2, (width - w) // 2, hh, w, flip)

    def apply(self, img, i: int, v: int):
        """A PIL image (or a [C, H, W] tensor) -> its view ``v`` as sample ``i``: cropped,
        resized to size x size, flipped; the same type as given."""
        from torchvision.transforms import functional as TF  # lazy: ~1.7 s to import

        if isinstance(img, torch.Tensor):
            height, width = int(img.shape[-2]), int(img.shape[-1])
        else:
            width, height = img.size
        p = self.params(i, v, height, width)
        out = TF.resized_crop(
            img,
            p.top,
            p.left,
            p.height,
            p.width,
            [self.size, self.size],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        return TF.hflip(out) if p.flip else out
