"""Helpers shared by the test files (tests/conftest.py puts this directory on sys.path):
``from helpers import assert_low_precision_close, torch_threads, ...``."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

_REDUCE = {
    "max": lambda d: d.abs().max(),  # the largest error of any element
    "norm": lambda d: d.norm(),  # the error of the whole tensor (GEMM-like results)
    "elementwise": lambda d: d.abs(),  # every element on its own
}


def assert_low_precision_close(got, exact, ref_low, reduce="max", floor=None):
    """The house rule for float16 / bfloat16 kernels: their error against the exact result is
    at most twice the error of the eager reference run in the same low precision.

    got: the kernel's result in low precision; exact: the same computation in float32 or
    float64; ref_low: the reference's result in the same low precision as ``got``.
    reduce: how an error tensor becomes the compared figure (``_REDUCE``). floor: slack added
    to the bound; by default one unit of rounding of the result
    (``finfo(got.dtype).eps * reduce(exact)``), so an exactly-rounded reference does not make
    the bound zero.
    """
    exact = exact.double()
    measure = _REDUCE[reduce]
    err = measure(got.double() - exact)
    ref_err = measure(ref_low.double() - exact)
    if floor is None:
        floor = torch.finfo(got.dtype).eps * measure(exact)
    bound = 2 * ref_err + floor
    ok = bool((err <= bound).all())
    assert ok, (
        f"{got.dtype} error {err.max().item():.3g} above twice the reference's "
        f"{ref_err.max().item():.3g} (+ floor)"
    )


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def clone_all(tensors):
    """Clones of a list of tensors, None entries kept (dense parameters in masked steps)."""
    return [None if t is None else t.clone() for t in tensors]


def raises_value_error(fn, match: str, *args):
    """``fn(*args)`` raises ValueError with a message that matches the regex ``match``."""
    with pytest.raises(ValueError, match=match):
        fn(*args)


def escape(text: str) -> str:
    """A literal message as a ``pytest.raises(match=...)`` pattern."""
    return re.escape(text)


FOLDER_CLASSES = ["cat", "dog", "eel", "fox", "gnu"]
FOLDER_PER_CLASS, FOLDER_PER_CLASS_VAL = 64, 8


def _folder_image(rng, label, size):
    from PIL import Image

    h, w = size
    base = np.array(
        [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [200, 30, 200]][label],
        dtype=np.float64,
    )
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if label % 2 else yy) * 0.9)[..., None] * 40
    noise = rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base + stripes + noise, 0, 255).astype(np.uint8))


def make_image_folder(root, corrupt=None):
    """An ImageNet-layout folder under ``root`` (a pathlib.Path): train/<class>/ with
    FOLDER_PER_CLASS and val/<class>/ with FOLDER_PER_CLASS_VAL images per class, every third a
    PNG and the others JPEG, 20..40 pixels a side, each class its own colour and stripe
    direction. ``corrupt=(class_index, k)`` overwrites training JPEG ``k`` of that class with
    bytes that are not an image; returns its path (else None)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", FOLDER_PER_CLASS), ("val", FOLDER_PER_CLASS_VAL)):
        for label, c in enumerate(FOLDER_CLASSES):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(count):
                size = (int(rng.integers(20, 41)), int(rng.integers(20, 41)))
                ext = "png" if k % 3 == 0 else "jpg"
                _folder_image(rng, label, size).save(d / f"{k:03d}.{ext}")
    if corrupt is None:
        return None
    path = root / "train" / FOLDER_CLASSES[corrupt[0]] / f"{corrupt[1]:03d}.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return str(path)
