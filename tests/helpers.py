"""Helpers shared by the test files (tests/conftest.py puts this directory on sys.path):
``from helpers import assert_low_precision_close, torch_threads, ...``."""
from __future__ import annotations

import contextlib
import re

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
    assert ok, (f"{got.dtype} error {err.max().item():.3g} above twice the reference's "
                f"{ref_err.max().item():.3g} (+ floor)")


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
