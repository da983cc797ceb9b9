"""Streamed image folders: ``folder:PATH?stream=1`` reads an ImageNet-layout folder
(``PATH/train/<class>/*``, ``PATH/val/<class>/*``) image by image, never all in memory.

Options (after ``?``, joined by ``&``; ``folder:PATH?classes=100`` also works in memory):
- ``stream=1``: stream (default 0: decode everything into memory, as before; an in-memory folder
  that would take more than half of the machine's memory is refused with a message that says
  to add ``stream=1``, so the choice is always the user's and never changes silently with the
  folder's size: the two modes augment differently, see below).
- ``size=S`` (default 224): the side of the square images the models see.
- ``classes=N``: a subset of N classes, chosen by a generator seeded with ``class_seed``
  (default 0, independent of ``--seed`` so that a search and a later distill with another seed
  see the same classes), relabelled 0..N-1 in name order; recorded in the data identity. The
  Auto-KD paper searched on 100 ImageNet classes and trained on all 1,000: search with
  ``folder:/imagenet?stream=1&classes=100``, distill with ``folder:/imagenet?stream=1``.
- ``workers=W`` (default min(8, usable cores)): DataLoader worker processes per training
  process (and per search worker); not part of the data identity.

What a streamed folder does:
- Training batches are decoded by a torch DataLoader with W worker processes: each worker
  opens the file, converts it to RGB (or L for a grayscale folder), cuts view v of sample i with
  ``autokd.store.ReplayResizedCrop`` (random-resized crop to S x S and horizontal flip, the
  standard ImageNet augmentation through torchvision's functional ops, its parameters a pure
  function of (seed, i, v, image size)) and hands back uint8; the training process copies the
  uint8 batch to the device (pinned, non-blocking on CUDA: 4x fewer bytes than float) and
  normalises it there. The feature store is built through the same loader, so the student's
  view v of sample i is the crop the stored teacher features came from, bit for bit.
- Evaluation (held-out rewards, test accuracy, ``split.images[...]``) uses resize of the shorter
  side to S / 0.875 (256 for 224) and a centre crop of S x S.
- Normalisation: per-channel mean and std of the eval-transformed pixels of 256 training
  images drawn with a fixed seed (all of them when there are fewer), not of the whole split
  (which would cost a full pass over it).
- Data identity: the kind, the options above (but workers), the split settings and a SHA-256
  over every file's path relative to PATH and byte size (not its bytes: hashing ImageNet's
  140 GB on every start is not affordable; an image rewritten in place with the same size is
  not noticed).
- A file that cannot be decoded stops training with a ValueError that names it (found when
  its batch is read, not at start-up: the folder is never read whole).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from autokd.data import formats
from autokd.data.augment import ReplayResizedCrop

DEFAULT_SIZE = 224
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then centre-crop size
STATS_SAMPLES = 256
STATS_SEED = 0
OPTIONS = ("stream", "size", "classes", "class_seed", "workers")


@dataclass(frozen=True)
class FolderOptions:
    stream: bool = False
    size: int | None = None
    classes: int | None = None
    class_seed: int = 0
    workers: int | None = None

    def identity(self) -> str:
        """The options that change the data (workers does not)."""
        parts = []
        if self.classes is not None:
            parts.append(f"classes={self.classes}/seed{self.class_seed}")
        return "|".join(parts)


def parse_folder_arg(arg: str) -> tuple[str, FolderOptions]:
    """``PATH?key=value&...`` -> (PATH, options); unknown keys and bad values are errors that
    list the valid ones."""
    path, sep, query = arg.partition("?")
    if not sep:
        return path, FolderOptions()
    values: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if key not in OPTIONS:
            raise ValueError(
                f"data 'folder:{arg}': unknown option {key!r}; expected one of {', '.join(OPTIONS)}"
            )
        if not eq or not value:
            raise ValueError(f"data 'folder:{arg}': expected {key}=VALUE, got {part!r}")
        values[key] = value

    def integer(key, low):
        try:
            v = int(values[key])
        except ValueError:
            v = None
        if v is None or v < low:
            raise ValueError(
                f"data 'folder:{arg}': expected {key} an integer >= {low}, got {values[key]!r}"
            )
        return v

    stream = values.get("stream", "0").lower()
    if stream not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"data 'folder:{arg}': expected stream=1 or stream=0, got {stream!r}")
    return path, FolderOptions(
        stream=stream in ("1", "true", "yes"),
        size=integer("size", 1) if "size" in values else None,
        classes=integer("classes", 2) if "classes" in values else None,
        class_seed=integer("class_seed", 0) if "class_seed" in values else 0,
        workers=integer("workers", 0) if "workers" in values else None,
    )


def default_workers() -> int:
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(8, cores))


class LazyImages:
    """``split.images`` of a streamed split: indexing decodes (eval transform) and normalises
    the images asked for, so code written for in-memory splits (``images[:2]``, batches by
    slice) works; a thread pool decodes (PIL releases the GIL while decoding)."""

    def __init__(self, split: StreamedSplit):
        self._split = split
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        s = self._split
        return torch.Size((len(s), s.channels, s.size, s.size))

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, key) -> torch.Tensor:
        n = len(self._split)
        if isinstance(key, (int, np.integer)):
            return self._split[int(key)][0]
        if isinstance(key, slice):
            ids = range(n)[key]  # O(1) whatever n: a range slices without a list
        else:
            ids = [int(i) for i in torch.as_tensor(key).reshape(-1).tolist()]
        split = self._split
        if len(ids) <= 4:
            raw = [split.decode(i) for i in ids]
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
                raw = list(pool.map(split.decode, ids))
        if not raw:
            return torch.empty((0, split.channels, split.size, split.size))
        return split.normalise(torch.stack(raw))

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} streamed images of {list(self.shape[1:])})"


class StreamedSplit(torch.utils.data.Dataset):
    """One split of a streamed folder: files and labels, decoded on demand.

    ``item -> (image [C, S, S] float32, eval transform, normalised; label int)``; ``images``
    (``LazyImages``) and ``labels`` [N] as an in-memory split has them; ``indices``: positions
    in the folder's sorted training (or test) file list. Sample ids for augmentation are
    positions in this split, as for in-memory splits."""

    streaming = True

    def __init__(
        self,
        files: Sequence[str],
        labels: torch.Tensor,
        indices: torch.Tensor,
        mode: str,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        workers: int,
    ):
        self.files = list(files)
        self.labels = labels  # [N] int64
        self.indices = indices  # [N] int64
        self.mode, self.size, self.workers = mode, int(size), int(workers)
        self.channels = 1 if mode == "L" else 3
        self.resize = round(self.size / EVAL_CROP_FRACTION)
        self.mean, self.std = tuple(mean), tuple(std)
        self.images = LazyImages(self)
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.normalise(self.decode(int(i))[None])[0], int(self.labels[i])

    def __repr__(self) -> str:
        return f"StreamedSplit({len(self)} images, {self.channels}x{self.size}x{self.size})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stats"] = {}  # device tensors stay in their process
        return state

    def decode(self, i: int, augment=None, view: int = 0) -> torch.Tensor:
        """Image ``i`` as uint8 [C, S, S]: view ``view`` of ``augment`` (a ReplayResizedCrop),
        or the eval transform when ``augment`` is None. A file that cannot be decoded is a
        ValueError naming it."""
        from PIL import Image  # lazy: only image folders need Pillow
        from torchvision.transforms import functional as TF  # lazy: ~1.7 s to import

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if augment is None:
                    im = TF.center_crop(TF.resize(im, self.resize), [self.size, self.size])
                else:
                    im = augment.apply(im, i, view)
                a = np.asarray(im, dtype=np.uint8)
        except formats.bad_image_errors() as e:
            raise ValueError(f"folder: cannot read image {path!r} ({e})") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, S, S] -> float32 normalised, on x's device (as load_data scales and
        normalises in-memory data: / 255, then per-channel mean and std)."""
        key = str(x.device)
        if key not in self._stats:
            self._stats[key] = (
                torch.tensor(self.mean, device=x.device).view(-1, 1, 1),
                torch.tensor(self.std, device=x.device).view(-1, 1, 1),
            )
        mean, std = self._stats[key]
        return x.float().div_(255.0).sub_(mean).div_(std)

    def loader(self, augment=None, device="cpu", workers: int | None = None) -> StreamLoader:
        """Batches decoded by DataLoader worker processes (``StreamLoader``); ``augment``: a
        ReplayResizedCrop for training views, None for the eval transform."""
        return StreamLoader(self, augment, device, self.workers if workers is None else workers)


class _Plan:
    """The batch sampler of a StreamLoader: the batches of the current pass, set before each
    pass (the sampler lives in the main process, so persistent workers see every new plan)."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Items(torch.utils.data.Dataset):
    """Item (i, view) -> (uint8 image, label, None), or (None, label, why) when the file cannot
    be decoded: the error travels as data and is raised, whole and naming the file, in the
    training process (an exception raised in a worker would come back wrapped in a
    traceback)."""

    def __init__(self, split: StreamedSplit, augment):
        self.split, self.augment = split, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        i, view = key
        label = int(self.split.labels[i])
        try:
            return self.split.decode(i, self.augment, view), label, None
        except ValueError as e:
            return None, label, str(e)


class _Failed:
    def __init__(self, message: str):
        self.message = message


def _collate(items):
    for _, _, why in items:
        if why is not None:
            return _Failed(why)
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items], dtype=torch.int64),
    )


class StreamLoader:
    """A persistent DataLoader over a streamed split: ``batches(index_batches, view)`` yields
    (images float32 normalised on ``device``, labels on ``device``) for each list of sample ids,
    in order, decoded ahead by the worker processes."""

    def __init__(self, split: StreamedSplit, augment, device, workers: int):
        if augment is not None and not isinstance(augment, ReplayResizedCrop):
            raise TypeError(
                f"streamed folder: expected a ReplayResizedCrop augmentation "
                f"(pipeline.make_augment gives one), got {augment!r}"
            )
        if augment is not None and augment.size != split.size:
            raise ValueError(
                f"streamed folder: the augmentation crops {augment.size} pixels, "
                f"the data are {split.size}"
            )
        self.split, self.device = split, torch.device(device)
        self._plan = _Plan()
        pin = self.device.type == "cuda"
        kwargs = {"prefetch_factor": 4, "persistent_workers": True} if workers > 0 else {}
        self._loader = torch.utils.data.DataLoader(
            _Items(split, augment),
            batch_sampler=self._plan,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin,
            **kwargs,
        )

    def batches(self, index_batches, view: int):
        self._plan.batches = [
            [(int(i), int(view)) for i in torch.as_tensor(b).tolist()] for b in index_batches
        ]
        for item in self._loader:
            if isinstance(item, _Failed):
                raise ValueError(item.message)  # noqa: TRY004 - a bad file, not a bad type
            x, y = item
            x = x.to(self.device, non_blocking=True)
            yield self.split.normalise(x), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is collected)."""
        self._loader = None


def _file_identity(root: str, files: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for path, label in files:
        h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{label}\n".encode())
    return h.hexdigest()[:16]


def _statistics(files: Sequence[str], mode: str, size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the eval-transformed pixels (scale 0..1) of up to
    STATS_SAMPLES training files drawn with a fixed seed."""
    pick = files
    if len(files) > STATS_SAMPLES:
        rng = np.random.default_rng(STATS_SEED)
        pick = [files[i] for i in np.sort(rng.choice(len(files), STATS_SAMPLES, replace=False))]
    channels = 1 if mode == "L" else 3
    probe = StreamedSplit(
        pick,
        torch.zeros(len(pick), dtype=torch.int64),
        torch.arange(len(pick)),
        mode,
        size,
        [0.0] * channels,
        [1.0] * channels,
        0,
    )
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(pick), 32):  # 32 images in memory at a time, not all of them
        x = probe.images[start : start + 32].double()  # mean 0, std 1: normalise() is x / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (squares - count * mean * mean) / max(count - 1, 1)  # unbiased, as torch.std
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    return [float(m) for m in mean], [float(s) for s in std]


def load_streamed_folder(
    spec: str, path: str, options: FolderOptions, val_fraction: float, seed: int
):
    """The DataBundle of a streamed folder (see the module docstring)."""
    from autokd.data import DataBundle  # lazy: defined by autokd.data, which imports this module

    index = formats.index_folder(path, options.classes, options.class_seed)
    mode = formats.image_mode(index.train[0][0])
    size = options.size or DEFAULT_SIZE
    workers = default_workers() if options.workers is None else options.workers
    y_all = np.array([lbl for _, lbl in index.train], dtype=np.int64)
    keep, held = formats.stratified_split(y_all, float(val_fraction), seed)
    if val_fraction > 0 and held.size == 0:
        raise ValueError(formats.empty_held_out_message(spec, y_all, float(val_fraction)))
    mean, std = _statistics([p for p, _ in index.train], mode, size)
    channels = len(mean)

    def split(items, positions):
        files = [items[k][0] for k in positions]
        labels = torch.tensor([items[k][1] for k in positions], dtype=torch.int64)
        return StreamedSplit(
            files,
            labels,
            torch.as_tensor(positions, dtype=torch.int64),
            mode,
            size,
            mean,
            std,
            workers,
        )

    train = split(index.train, keep)
    val = split(index.train, held)
    test = split(index.test, np.arange(len(index.test)))
    extra = options.identity()
    identity = (
        f"folder+stream|val={float(val_fraction):g}|seed={int(seed)}|size={size}x{size}|"
        f"mode={mode}|eval=resize{train.resize}+centre{size}|"
        + (f"{extra}|" if extra else "")
        + f"files={_file_identity(path, index.train + index.test)}"
    )
    return DataBundle(
        name="folder",
        spec=spec,
        num_classes=len(index.classes),
        channels=channels,
        image_size=(size, size),
        mean=tuple(mean),
        std=tuple(std),
        train=train,
        val=val,
        test=test,
        identity=identity,
        allow_flip=True,
        classes=list(index.classes),
    )
