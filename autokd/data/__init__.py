"""Data sets by spec, read from local files only (nothing is ever downloaded).

Specs:
- ``digits``: scikit-learn's shipped 8x8 digits (1,797 images, 1 channel, 10 classes), the
  embedded default; a fixed stratified train/test split (1,437 / 360).
- ``cifar10:PATH`` / ``cifar100:PATH``: the standard python-format pickles; PATH is the folder
  holding them or its parent (``cifar-10-batches-py`` / ``cifar-100-python``).
- ``folder:PATH``: ``PATH/train/<class>/*.png|jpg`` and ``PATH/val/<class>/*`` (the test split);
  ``folder:PATH?stream=1`` streams it through DataLoader workers instead of decoding it into
  memory, ``?classes=N`` keeps a seeded subset of N classes, ``?size=S`` sets the image side
  (options: autokd.data.stream).
- ``npz:FILE``: arrays ``x_train, y_train, x_test, y_test``; images NHWC or NCHW (or [N, H, W]),
  uint8 (scaled by 1/255) or float (used as they are).

Channels, image size and number of classes come from the data. The validation split (the
search's held-out split for rewards) is carved from the training data: fixed by ``seed``,
stratified, never from the test set. Images are normalised per channel with statistics of the
whole training split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from autokd.data import formats, stream
from autokd.data.augment import apply_augmentation, augment, sample_augmentation
from autokd.registry import Registry

__all__ = [
    "DataBundle",
    "DataSetKind",
    "ImageTensorDataset",
    "load_data",
    "data_kind",
    "DATASETS",
    "augment",
    "sample_augmentation",
    "apply_augmentation",
]


@dataclass(frozen=True)
class DataSetKind:
    """One kind of data set: how to read it, and what a run on it uses when the user names no
    models and no schedule (pipeline.default_models / default_training, the CLI's help)."""

    read: Callable[[str, tuple[int, int] | None], formats.RawData]  # (path, image size)
    needs_path: bool  # spec 'kind:PATH' (else plain 'kind')
    teacher: str  # zoo names
    student: str
    epochs: int  # of the full schedule; the search's proxy trains fractions of it
    batch_size: int
    lr: float  # initial SGD learning rate (cosine schedule)
    # the student's share of the training split (TrainConfig.data_fraction); the teacher
    # trains on all of it
    data_fraction: float = 1.0
    # a search's proxy trial: fraction of the student's data, fraction of the epochs, sparsity
    # (the paper's accelerations by default)
    proxy_subset: float = 0.2
    proxy_stop_fraction: float = 0.2
    proxy_sparsity: float = 0.5
    # the proxy's fraction of the epochs for a transformer student (a ViT from scratch, AdamW),
    # where it must differ from proxy_stop_fraction; None: the same
    transformer_proxy_stop_fraction: float | None = None

    def proxy(self, transformer: bool = False) -> dict:
        stop = self.proxy_stop_fraction
        if transformer and self.transformer_proxy_stop_fraction is not None:
            stop = self.transformer_proxy_stop_fraction
        return {
            "subset": self.proxy_subset,
            "stop_fraction": stop,
            "sparsity": self.proxy_sparsity,
        }

    def training(self) -> dict:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "data_fraction": self.data_fraction,
        }


DATASETS: Registry[DataSetKind] = Registry("data set")
# digits, the embedded default, is set up so that distillation matters and a search can show
# what it is worth (measured, benchmarks/results/default_task.md): the teacher (65k
# parameters) trains on the whole training split (1,295 images; 98.9% test accuracy) and the
# 1.4k-parameter student distils from a fixed stratified 20% of it (259 labelled images), the
# case of a strong teacher and a student with few labels. Alone the student reaches ~91%, with
# Hinton KD ~93.5%: a gain above the seed spread (~0.5 point). Batch 32 at lr 0.1 over 60
# epochs (540 steps on 259 images).
# Its proxy is not the paper's: 20% of 259 images for 20% of the epochs is ~20 SGD steps, and
# sparsity saves nothing on a CPU while it blurs the ranking. A trial trains on all of the
# student's images, dense, for 10% of the epochs (measured: benchmarks/results/
# proxy_fidelity.md).
# A ViT student (vit_compact, timm) learns next to nothing in that trial: 10% of the epochs is
# ~54 AdamW steps on 259 images, its held-out accuracy stays near chance and the reward ranks
# designs by CKA alone; the search then finds nothing better than DIST. A third of the epochs
# (~180 steps) lets the trials rank designs, and a search finds designs that beat DIST by
# more than the seed spread (benchmarks/results/vit.md).
DATASETS.register(
    "digits",
    DataSetKind(
        lambda arg, image_size: formats.read_digits(),
        needs_path=False,
        teacher="digits_teacher",
        student="digits_student",
        epochs=60,
        batch_size=32,
        lr=0.1,
        data_fraction=0.2,
        proxy_subset=1.0,
        proxy_stop_fraction=0.1,
        proxy_sparsity=0.0,
        transformer_proxy_stop_fraction=0.33,
    ),
)
# Everything else is CIFAR-style: the paper's ResNet-56 -> ResNet-20 pair and the 240-epoch,
# batch-64, lr-0.05 schedule of the distillation literature.
_CIFAR_STYLE = {
    "needs_path": True,
    "teacher": "resnet56",
    "student": "resnet20",
    "epochs": 240,
    "batch_size": 64,
    "lr": 0.05,
}
DATASETS.register(
    "cifar10", DataSetKind(lambda arg, image_size: formats.read_cifar(arg, 10), **_CIFAR_STYLE)
)
DATASETS.register(
    "cifar100", DataSetKind(lambda arg, image_size: formats.read_cifar(arg, 100), **_CIFAR_STYLE)
)
DATASETS.register(
    "folder",
    DataSetKind(lambda arg, image_size: formats.read_folder(arg, image_size), **_CIFAR_STYLE),
)
DATASETS.register("npz", DataSetKind(lambda arg, image_size: formats.read_npz(arg), **_CIFAR_STYLE))


def data_kind(spec: str) -> DataSetKind:
    """The registry entry of a data spec's kind (``cifar100:PATH`` -> cifar100); an unknown kind
    raises KeyError with close matches."""
    return DATASETS.get(spec.split(":", 1)[0] if isinstance(spec, str) else spec)


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images and labels held as tensors; ``item -> (image [C, H, W] float32, label int)``.

    ``images`` / ``labels`` are exposed for batched access; ``indices`` are the positions of the
    samples in the data set's training (or test) split as stored on disk, a stable sample id.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        self.images = images  # [N, C, H, W] float32, normalised
        self.labels = labels  # [N] int64
        self.indices = indices  # [N] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageTensorDataset({len(self)} images of {list(self.images.shape[1:])})"


@dataclass
class DataBundle:
    name: str  # the kind: digits, cifar10, cifar100, folder, npz
    spec: str  # as given to load_data
    num_classes: int
    channels: int
    image_size: Tuple[int, int]  # (H, W)
    mean: Tuple[float, ...]  # per channel, of the training split, in the stored scale
    std: Tuple[float, ...]
    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    identity: str  # kind + split settings + content hash: names this exact data for caches
    allow_flip: bool  # horizontal flips are label-preserving (not for digits)
    classes: Optional[List[str]] = field(default=None)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_classes} classes, {self.channels}x{self.image_size[0]}x"
            f"{self.image_size[1]}, train {len(self.train)} / val {len(self.val)} / "
            f"test {len(self.test)}"
        )


def _parse_spec(spec: str) -> Tuple[str, str]:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected a spec such as 'digits' or 'cifar10:PATH', got {spec!r}")
    kind, sep, arg = spec.partition(":")
    needs_path = DATASETS.get(kind).needs_path  # unknown kinds raise with close matches
    if needs_path and not arg:
        raise ValueError(f"data {spec!r}: expected '{kind}:PATH' with a local path")
    if not needs_path and sep:
        raise ValueError(f"data {spec!r}: '{kind}' takes no path")
    return kind, arg


def _image_size(image_size) -> Optional[Tuple[int, int]]:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"data: expected image_size as an int or (H, W) of positive ints, got {image_size!r}"
        )
    return size  # type: ignore[return-value]


def _check(raw: formats.RawData, spec: str) -> None:
    for split in ("train", "test"):
        x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if len(x) == 0:
            raise ValueError(f"data {spec!r}: the {split} split is empty")
        if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
            raise ValueError(
                f"data {spec!r}: expected {split} images [N, C, H, W] with C in 1, 3, "
                f"4; got {list(x.shape)}"
            )
        if len(y) != len(x):
            raise ValueError(f"data {spec!r}: {len(x)} {split} images but {len(y)} labels")
        bad = (y < 0) | (y >= raw.num_classes)
        if bad.any():
            raise ValueError(
                f"data {spec!r}: {split} label {int(y[bad][0])} out of range; "
                f"expected labels in [0, {raw.num_classes - 1}]"
            )
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError(f"data {spec!r}: {split} images contain NaN or Inf")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise ValueError(
            f"data {spec!r}: train images {list(raw.x_train.shape[1:])} and test "
            f"images {list(raw.x_test.shape[1:])} differ in shape"
        )
    if raw.num_classes < 2:
        raise ValueError(f"data {spec!r}: expected at least 2 classes, got {raw.num_classes}")


def _content_hash(raw: formats.RawData) -> str:
    h = hashlib.sha256()
    for a in (raw.x_train, raw.y_train, raw.x_test, raw.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def _to_float(x: np.ndarray, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    if size is not None and tuple(t.shape[-2:]) != size:
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t


def load_data(
    spec: str = "digits",
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: Union[None, int, Sequence[int]] = None,
    allow_flip: Optional[bool] = None,
) -> DataBundle:
    """Load a data set from local files; see the module docstring for the specs."""
    kind, arg = _parse_spec(spec)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"data: expected 0 <= val_fraction < 1, got {val_fraction!r}")
    size = _image_size(image_size)
    subset = ""
    if kind == "folder":
        arg, options = stream.parse_folder_arg(arg)
        if options.stream:
            if size is not None and size[0] != size[1]:
                raise ValueError(
                    f"data {spec!r}: a streamed folder has square images; got image_size {size}"
                )
            if size is not None and options.size is None:
                options = dataclasses.replace(options, size=size[0])
            return stream.load_streamed_folder(spec, arg, options, val_fraction, seed)
        if options.size is not None and size is None:
            size = (options.size, options.size)
        raw = formats.read_folder(arg, size, options.classes, options.class_seed)
        subset = options.identity()
    else:
        raw = DATASETS.get(kind).read(arg, size)
    _check(raw, spec)
    x_train, x_test = _to_float(raw.x_train, size), _to_float(raw.x_test, size)
    # Statistics of the whole training split, so they do not depend on the validation seed.
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    # In place: CIFAR-sized arrays are hundreds of MB each.
    x_train.sub_(mean[:, None, None]).div_(std[:, None, None])
    x_test.sub_(mean[:, None, None]).div_(std[:, None, None])
    y_train, y_test = torch.from_numpy(raw.y_train), torch.from_numpy(raw.y_test)

    keep, held = formats.stratified_split(raw.y_train, float(val_fraction), seed)
    if val_fraction > 0 and held.size == 0:  # found now, not after a teacher has trained
        raise ValueError(formats.empty_held_out_message(spec, raw.y_train, float(val_fraction)))
    keep_t, held_t = torch.from_numpy(keep), torch.from_numpy(held)
    train = ImageTensorDataset(x_train[keep_t].contiguous(), y_train[keep_t].contiguous(), keep_t)
    val = ImageTensorDataset(x_train[held_t].contiguous(), y_train[held_t].contiguous(), held_t)
    test = ImageTensorDataset(
        x_test.contiguous(), y_test.contiguous(), torch.arange(len(y_test), dtype=torch.int64)
    )
    h, w = x_train.shape[-2:]
    # The kind, not the path: the same files moved elsewhere are the same data for a cache.
    identity = (
        f"{kind}|val={float(val_fraction):g}|seed={int(seed)}|size={h}x{w}|"
        + (f"{subset}|" if subset else "")
        + f"sha256={_content_hash(raw)}"
    )
    return DataBundle(
        name=kind,
        spec=spec,
        num_classes=int(raw.num_classes),
        channels=int(x_train.shape[1]),
        image_size=(int(h), int(w)),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        train=train,
        val=val,
        test=test,
        identity=identity,
        allow_flip=raw.allow_flip if allow_flip is None else bool(allow_flip),
        classes=raw.classes,
    )
