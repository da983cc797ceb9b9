"""Readers of the on-disk formats. Each returns a ``RawData`` of arrays as they are stored
(uint8 or float, [N, C, H, W]) and labels (int64 [N]); ``autokd.data.load_data`` does the rest
(checks, scaling, normalisation, the validation split). Nothing is ever downloaded."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np


@dataclass
class RawData:
    x_train: np.ndarray  # [N, C, H, W] uint8 or float
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    allow_flip: bool
    classes: Optional[List[str]] = None


# ----------------------------------------------------------------------------------- digits


def read_digits() -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    # The test split is part of the data set's definition: fixed, whatever the caller's seed.
    train_idx, test_idx = stratified_split(labels, 0.2, seed=20240607)
    return RawData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   num_classes=10, allow_flip=False)


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with about ``fraction`` of every class held out.

    Every class keeps at least one sample on the kept side; both sides are in ascending order.
    """
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(int(round(len(idx) * fraction)), len(idx) - 1)
        if k > 0:
            held.append(rng.permutation(idx)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


# ------------------------------------------------------------------------------------ CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles; only numpy array reconstruction is allowed in them, so a
    file that tries to run anything else is refused instead of executed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_pickle(path: str, label_key: str):
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CIFAR python-format batch ({e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with 'data' and '{label_key}', got "
                         f"{type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: expected keys 'data' and '{label_key}', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected 'data' of uint8 [N, 3072], got {data.dtype} "
                         f"{list(data.shape)}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _find_dir(path: str, subdir: str, needed: List[str], what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: path {path!r} does not exist")
    for d in (path, os.path.join(path, subdir)):
        if all(os.path.isfile(os.path.join(d, n)) for n in needed):
            return d
    missing = [n for n in needed if not os.path.isfile(os.path.join(path, n))]
    raise FileNotFoundError(
        f"{what}: expected the python-format files {', '.join(needed)} in {path!r} or "
        f"{os.path.join(path, subdir)!r}; missing {', '.join(missing)}"
    )


def read_cifar(path: str, num_classes: int) -> RawData:
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        d = _find_dir(path, "cifar-10-batches-py", train_files + ["test_batch"], "cifar10")
        parts = [_read_cifar_pickle(os.path.join(d, n), "labels") for n in train_files]
        x_test, y_test = _read_cifar_pickle(os.path.join(d, "test_batch"), "labels")
    else:
        d = _find_dir(path, "cifar-100-python", ["train", "test"], "cifar100")
        parts = [_read_cifar_pickle(os.path.join(d, "train"), "fine_labels")]
        x_test, y_test = _read_cifar_pickle(os.path.join(d, "test"), "fine_labels")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return RawData(x_train, y_train, x_test, y_test, num_classes=num_classes, allow_flip=True)


# ----------------------------------------------------------------------------------- folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def read_folder(path: str, image_size: Optional[Tuple[int, int]]) -> RawData:
    from PIL import Image

    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder: path {path!r} does not exist or is not a folder")
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, s) for s in ("val", "test")
                     if os.path.isdir(os.path.join(path, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise FileNotFoundError(
            f"folder: expected {path!r} to hold train/<class>/*.png|jpg and val/<class>/*; "
            f"found {sorted(os.listdir(path))}"
        )
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"folder: {train_dir!r} has no class folders")
    test_classes = sorted(e.name for e in os.scandir(test_dir) if e.is_dir())
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise ValueError(f"folder: classes {unknown} in {test_dir!r} are not in {train_dir!r} "
                         f"(known: {classes})")

    def files(split_dir):
        out = []
        for label, c in enumerate(classes):
            d = os.path.join(split_dir, c)
            if not os.path.isdir(d):
                continue
            names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTENSIONS))
            out += [(os.path.join(d, n), label) for n in names]
        return out

    train_files, test_files = files(train_dir), files(test_dir)
    present = {lbl for _, lbl in train_files}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise ValueError(f"folder: class folders {empty} in {train_dir!r} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    if not test_files:
        raise ValueError(f"folder: {test_dir!r} holds no images")

    with Image.open(train_files[0][0]) as first:
        mode = "L" if first.mode in _GRAY_MODES else "RGB"
        size = tuple(image_size) if image_size is not None else (first.height, first.width)

    def read(items):
        arrays = np.empty((len(items), 1 if mode == "L" else 3, size[0], size[1]), dtype=np.uint8)
        for i, (p, _) in enumerate(items):
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise ValueError(f"folder: cannot read image {p!r} ({e})") from None
            arrays[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return arrays, np.array([lbl for _, lbl in items], dtype=np.int64)

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    return RawData(x_train, y_train, x_test, y_test, num_classes=len(classes), allow_flip=True,
                   classes=classes)


# -------------------------------------------------------------------------------------- npz


def _to_nchw(x: np.ndarray, key: str, file: str) -> np.ndarray:
    if x.ndim == 3:  # [N, H, W]: one channel
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"npz {file!r}: expected {key} of shape [N, H, W, C] or [N, C, H, W], "
                         f"got {list(x.shape)}")
    channel_like = (1, 3, 4)
    if x.shape[3] in channel_like:  # NHWC wins ties: it is what image arrays usually are
        return x.transpose(0, 3, 1, 2)
    if x.shape[1] in channel_like:
        return x
    raise ValueError(f"npz {file!r}: cannot tell the channel axis of {key} {list(x.shape)}; "
                     f"expected 1, 3 or 4 channels first (NCHW) or last (NHWC)")


def read_npz(file: str) -> RawData:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"npz: file {file!r} does not exist")
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"npz {file!r}: cannot read it as a NumPy .npz archive ({e})") from None
    with archive:
        needed = ["x_train", "y_train", "x_test", "y_test"]
        missing = [k for k in needed if k not in archive.files]
        if missing:
            raise KeyError(f"npz {file!r}: expected arrays {', '.join(needed)}; missing "
                           f"{', '.join(missing)} (found {', '.join(archive.files) or 'none'})")
        arrays = {k: archive[k] for k in needed}
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"npz {file!r}: expected x_{split} of uint8 or float, got {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"npz {file!r}: expected integer class labels in y_{split}, "
                             f"got {y.dtype}")
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"npz {file!r}: expected y_{split} of shape [{len(x)}], got "
                             f"{list(y.shape)}")
        out[split] = (_to_nchw(x, f"x_{split}", file), y.astype(np.int64))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise ValueError(f"npz {file!r}: x_train images {list(out['train'][0].shape[1:])} and "
                         f"x_test images {list(out['test'][0].shape[1:])} differ in shape")
    if out["train"][0].dtype != out["test"][0].dtype:
        raise ValueError(f"npz {file!r}: x_train is {out['train'][0].dtype} but x_test is "
                         f"{out['test'][0].dtype}; expected the same scale for both")
    num_classes = int(out["train"][1].max()) + 1 if len(out["train"][1]) else 0
    return RawData(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                   num_classes=num_classes, allow_flip=True)
