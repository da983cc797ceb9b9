"""Readers of the on-disk formats. Each returns a ``RawData`` of arrays as they are stored
(uint8 or float, [N, C, H, W]) and labels (int64 [N]); ``autokd.data.load_data`` does the rest
(checks, scaling, normalisation, the validation split). Nothing is ever downloaded."""

from __future__ import annotations

import os
import pickle
import zipfile
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
    from sklearn.datasets import load_digits  # lazy: ~1.2 s to import, only digits need it

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    # The test split is part of the data set's definition: fixed, whatever the caller's seed.
    train_idx, test_idx = stratified_split(labels, 0.2, seed=20240607)
    return RawData(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        num_classes=10,
        allow_flip=False,
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
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


def empty_held_out_message(spec: str, labels: np.ndarray, fraction: float) -> str:
    """Why ``stratified_split`` held nothing out, and how many images per class would do."""
    need = next(n for n in range(2, 10**9) if min(round(n * fraction), n - 1) >= 1)
    counts = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    largest = int(counts.max()) if counts.size else 0
    return (
        f"data {spec!r}: the held-out split is empty: val_fraction {fraction:g} of "
        f"{labels.size} training images holds out none (the largest class has {largest}; "
        f"a class needs at least {need} to give one). A search scores its trials on that "
        "split: give more images per class"
    )


# ------------------------------------------------------------------------------------ CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles; only numpy array reconstruction is allowed in them, so a
    file that tries to run anything else is refused instead of executed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
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
        raise ValueError(
            f"{path}: expected a pickled dict with 'data' and '{label_key}', got "
            f"{type(batch).__name__}"
        )
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: expected keys 'data' and '{label_key}', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: expected 'data' of uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
        )
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


@dataclass
class FolderIndex:
    """The image files of an ImageNet-layout folder, as (path, label) per split, labels being
    positions in ``classes`` (sorted class folder names, after any class subset)."""

    root: str
    train: List[Tuple[str, int]]
    test: List[Tuple[str, int]]
    classes: List[str]
    all_classes: int  # class folders in train/ before any subset


def choose_classes(classes: List[str], count: int, seed: int) -> List[str]:
    """``count`` of ``classes`` drawn without replacement by a PCG64 generator seeded with
    ``seed``, in name order: the class subset a search runs on (the paper searched on 100 of
    ImageNet's 1,000 classes). A pure function of (the class names, count, seed)."""
    if count > len(classes):
        raise ValueError(
            f"folder: expected classes <= the {len(classes)} class folders, got classes={count}"
        )
    pick = np.random.default_rng(seed).choice(len(classes), size=count, replace=False)
    return sorted(classes[i] for i in pick)


def index_folder(path: str, classes: Optional[int] = None, class_seed: int = 0) -> FolderIndex:
    """List ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``test/``) without reading
    any image; with ``classes``, keep a seeded subset of that many classes
    (``choose_classes``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder: path {path!r} does not exist or is not a folder")
    train_dir = os.path.join(path, "train")
    test_dir = next(
        (os.path.join(path, s) for s in ("val", "test") if os.path.isdir(os.path.join(path, s))),
        None,
    )
    if not os.path.isdir(train_dir) or test_dir is None:
        raise FileNotFoundError(
            f"folder: expected {path!r} to hold train/<class>/*.png|jpg and val/<class>/*; "
            f"found {sorted(os.listdir(path))}"
        )
    all_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not all_classes:
        raise ValueError(f"folder: {train_dir!r} has no class folders")
    test_classes = sorted(e.name for e in os.scandir(test_dir) if e.is_dir())
    unknown = sorted(set(test_classes) - set(all_classes))
    if unknown:
        raise ValueError(
            f"folder: classes {unknown} in {test_dir!r} are not in {train_dir!r} "
            f"(known: {all_classes})"
        )
    chosen = all_classes if classes is None else choose_classes(all_classes, classes, class_seed)

    def files(split_dir):
        out = []
        for label, c in enumerate(chosen):
            d = os.path.join(split_dir, c)
            if not os.path.isdir(d):
                continue
            names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTENSIONS))
            out += [(os.path.join(d, n), label) for n in names]
        return out

    train_files, test_files = files(train_dir), files(test_dir)
    present = {lbl for _, lbl in train_files}
    empty = [c for i, c in enumerate(chosen) if i not in present]
    if empty:
        raise ValueError(
            f"folder: class folders {empty} in {train_dir!r} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    if not test_files:
        raise ValueError(
            f"folder: {test_dir!r} holds no images"
            + (" of the chosen classes" if classes is not None else "")
        )
    return FolderIndex(path, train_files, test_files, chosen, len(all_classes))


def image_mode(path: str) -> str:
    """ "L" for a grayscale image file, "RGB" otherwise: the first training image sets the mode
    of a whole folder."""
    from PIL import Image  # lazy: only image folders need Pillow

    try:
        with Image.open(path) as first:
            return "L" if first.mode in _GRAY_MODES else "RGB"
    except bad_image_errors() as e:
        raise ValueError(
            f"folder: cannot read image {path!r} ({e}); the first training image "
            "sets the image size and mode: fix or remove it"
        ) from None


def bad_image_errors() -> tuple:
    """What PIL raises for a bad image file: OSError (unreadable, truncated, a symlink loop),
    ValueError or SyntaxError (some corrupt headers) and DecompressionBombError."""
    from PIL import Image  # lazy: only image folders need Pillow

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def memory_limit_bytes() -> int:
    """What an in-memory ``folder:`` may take: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf: do not guess, do not refuse
        return 1 << 62


# Bytes per pixel value while an in-memory folder is loaded: the uint8 array, its float32
# copy, and the float32 copy of the training split that load_data keeps.
_BYTES_PER_VALUE = 9


def read_folder(
    path: str,
    image_size: Optional[Tuple[int, int]],
    classes: Optional[int] = None,
    class_seed: int = 0,
) -> RawData:
    from PIL import Image  # lazy: only image folders need Pillow

    index = index_folder(path, classes, class_seed)
    train_files, test_files, classes = index.train, index.test, index.classes
    bad_image = bad_image_errors()
    try:
        with Image.open(train_files[0][0]) as first:
            mode = "L" if first.mode in _GRAY_MODES else "RGB"
            size = tuple(image_size) if image_size is not None else (first.height, first.width)
    except bad_image as e:
        raise ValueError(
            f"folder: cannot read image {train_files[0][0]!r} ({e}); the first "
            "training image sets the image size and mode: fix or remove it"
        ) from None
    # Found before hours of decoding end in the out-of-memory killer: a folder this large is
    # streamed instead (autokd.data.stream), which the message says how to ask for.
    need = (
        (len(train_files) + len(test_files))
        * (1 if mode == "L" else 3)
        * size[0]
        * size[1]
        * _BYTES_PER_VALUE
    )
    limit = memory_limit_bytes()
    if need > limit:
        raise ValueError(
            f"folder: decoding the {len(train_files) + len(test_files)} images of {path!r} at "
            f"{size[0]}x{size[1]} into memory needs about {need / 2**30:.1f} GiB, more than "
            f"{limit / 2**30:.1f} GiB (half of this machine's memory); stream them instead: "
            f"--data 'folder:{path}?stream=1' (decoded per batch by DataLoader workers, "
            "random-resized crops; see autokd.data.stream)"
        )

    def read(items):
        arrays = np.empty((len(items), 1 if mode == "L" else 3, size[0], size[1]), dtype=np.uint8)
        for i, (p, _) in enumerate(items):
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except bad_image as e:
                raise ValueError(f"folder: cannot read image {p!r} ({e})") from None
            arrays[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return arrays, np.array([lbl for _, lbl in items], dtype=np.int64)

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    return RawData(
        x_train, y_train, x_test, y_test, num_classes=len(classes), allow_flip=True, classes=classes
    )


# -------------------------------------------------------------------------------------- npz


LAYOUTS = ("NCHW", "NHWC")
_CHANNEL_COUNTS = (1, 3, 4)


def _to_nchw(x: np.ndarray, key: str, file: str, layout: Optional[str] = None) -> np.ndarray:
    """``x`` as [N, C, H, W]. The layout of a 4-D array, when the file does not say it (an array
    ``layout`` = "NCHW" or "NHWC" in the .npz), is decided by this rule:
    1. only one of axis 1 and axis 3 holds a channel count (1, 3 or 4): that axis;
    2. both do: the reading whose image is square (H == W), when exactly one reading is
       ([N, 3, 4, 4] is NCHW, [N, 4, 4, 3] is NHWC);
    3. otherwise ([N, 3, 3, 3], [N, 4, 4, 4], [N, 3, 5, 4]) the layout is ambiguous and refused,
       with the way to say it."""
    if x.ndim == 3:  # [N, H, W]: one channel
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"npz {file!r}: expected {key} of shape [N, H, W, C] or [N, C, H, W], "
            f"got {list(x.shape)}"
        )
    first, last = x.shape[1] in _CHANNEL_COUNTS, x.shape[3] in _CHANNEL_COUNTS
    if layout is not None:
        axis = 1 if layout == "NCHW" else 3
        if x.shape[axis] not in _CHANNEL_COUNTS:
            raise ValueError(
                f"npz {file!r}: layout {layout} puts {x.shape[axis]} channels in "
                f"{key} {list(x.shape)}; expected 1, 3 or 4"
            )
    elif first and last:
        nchw_square = x.shape[2] == x.shape[3]
        nhwc_square = x.shape[1] == x.shape[2]
        if nchw_square == nhwc_square:
            raise ValueError(
                f"npz {file!r}: the layout of {key} {list(x.shape)} is ambiguous (NCHW and NHWC "
                "both fit); say which: add an array 'layout' to the file, e.g. "
                "np.savez(file, ..., layout='NCHW') or layout='NHWC'"
            )
        layout = "NCHW" if nchw_square else "NHWC"
    elif first or last:
        layout = "NCHW" if first else "NHWC"
    else:
        raise ValueError(
            f"npz {file!r}: cannot tell the channel axis of {key} {list(x.shape)}; "
            f"expected 1, 3 or 4 channels first (NCHW) or last (NHWC)"
        )
    return x if layout == "NCHW" else x.transpose(0, 3, 1, 2)


def _check_same_scale(x_train: np.ndarray, x_test: np.ndarray, file: str) -> None:
    """Float images are used as they are: a split in 0..255 beside one in 0..1 would train on
    one scale and test on another. Refused when the largest magnitudes differ 20-fold or more
    (255 vs 1 is 255-fold; two normalised splits differ by a small factor)."""
    if not np.issubdtype(x_train.dtype, np.floating) or x_train.size == 0 or x_test.size == 0:
        return
    a, b = float(np.abs(x_train).max()), float(np.abs(x_test).max())
    if a > 0 and b > 0 and max(a / b, b / a) < 20:
        return
    if a == 0 and b == 0:
        return

    def span(x):
        return f"[{float(x.min()):g}, {float(x.max()):g}]"

    raise ValueError(
        f"npz {file!r}: x_train values lie in {span(x_train)} but x_test values in "
        f"{span(x_test)}; expected both on one scale (e.g. both 0..1: divide the "
        "0..255 one by 255)"
    )


def _check_class_ids(labels: np.ndarray, file: str) -> int:
    """The class count, max training label + 1, when at least half the ids 0..max occur among
    the training labels; a stray label (one 100000 among 0..9) would otherwise make a
    100,001-class model, so it is refused and named."""
    top = int(labels.max())
    present = np.unique(labels)
    if present.size * 2 >= top + 1:
        return top + 1
    count = int((labels == top).sum())
    gaps = present[np.flatnonzero(np.diff(present) > 1)]
    tail = ""
    if gaps.size:
        above = ", ".join(str(int(v)) for v in present[present > gaps[0]][:5])
        tail = f"; the labels after the first gap (above {int(gaps[0])}) are {above}"
    raise ValueError(
        f"npz {file!r}: the largest label is {top} ({count} image(s) in y_train), "
        f"so {top + 1} classes, but only {present.size} distinct labels occur"
        f"{tail}; expected labels 0..K-1 with most of them used: relabel the "
        "classes (or drop the stray images)"
    )


def read_npz(file: str) -> RawData:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"npz: file {file!r} does not exist")
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"npz {file!r}: cannot read it as a NumPy .npz archive ({e})") from None
    with archive:
        needed = ["x_train", "y_train", "x_test", "y_test"]
        missing = [k for k in needed if k not in archive.files]
        if missing:
            raise KeyError(
                f"npz {file!r}: expected arrays {', '.join(needed)}; missing "
                f"{', '.join(missing)} (found {', '.join(archive.files) or 'none'})"
            )
        arrays = {k: archive[k] for k in needed}
        layout = None
        if "layout" in archive.files:
            raw_layout = archive["layout"]
            layout = str(raw_layout) if raw_layout.shape == () else None
            if layout not in LAYOUTS:
                raise ValueError(
                    f"npz {file!r}: expected the array 'layout' to be 'NCHW' or "
                    f"'NHWC', got {raw_layout!r:.60}"
                )
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"npz {file!r}: expected x_{split} of uint8 or float, got {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"npz {file!r}: expected integer class labels in y_{split}, got {y.dtype}"
            )
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"npz {file!r}: expected y_{split} of shape [{len(x)}], got {list(y.shape)}"
            )
        out[split] = (_to_nchw(x, f"x_{split}", file, layout), y.astype(np.int64))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise ValueError(
            f"npz {file!r}: x_train images {list(out['train'][0].shape[1:])} and "
            f"x_test images {list(out['test'][0].shape[1:])} differ in shape"
        )
    if out["train"][0].dtype != out["test"][0].dtype:
        raise ValueError(
            f"npz {file!r}: x_train is {out['train'][0].dtype} but x_test is "
            f"{out['test'][0].dtype}; expected the same scale for both"
        )
    _check_same_scale(out["train"][0], out["test"][0], file)
    num_classes = _check_class_ids(out["train"][1], file) if len(out["train"][1]) else 0
    return RawData(
        out["train"][0],
        out["train"][1],
        out["test"][0],
        out["test"][1],
        num_classes=num_classes,
        allow_flip=True,
    )
