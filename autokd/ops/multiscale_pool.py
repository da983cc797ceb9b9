"""``autokd::multiscale_pool``: adaptive average pooling to several grids in one read.

The multi-scale intra-spatial transform of the search space: [N, C, H, W] is pooled to each
s x s grid of ``grids`` (bins of ``adaptive_avg_pool2d``), flattened row-major and concatenated
to [N, C, sum s^2]. Kernels: csrc/ops/multiscale_pool_{cpu.cpp,cuda.cu}; spec:
autokd.reference.multiscale_pool.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

_OP = "autokd::multiscale_pool"


def _grid_list(grids: Sequence[int]) -> list[int]:
    # The schema's int[] would accept bools and reject numpy ints with an unclear TypeError.
    if isinstance(grids, numbers.Integral) or not isinstance(grids, (list, tuple, torch.Size)):
        raise TypeError(f"{_OP}: expected grids to be a list of ints, got {type(grids).__name__}")
    out = []
    for s in grids:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{_OP}: expected grids entries to be ints, got {s!r}")
        out.append(int(s))
    return out


def multiscale_pool(input: torch.Tensor, grids: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Average-pool ``input`` [N, C, H, W] to each s x s grid in ``grids`` and concatenate.

    Returns [N, C, sum s^2]; grid g occupies ``sum(s*s for s in grids[:g])`` onwards, row-major.
    Each s must satisfy 1 <= s <= min(H, W). Differentiable; any strides (channels_last too).
    """
    return torch.ops.autokd.multiscale_pool.default(input, _grid_list(grids))


def _check_fake(op: str, input_size, grids, dtype=None) -> None:
    # Same words as check_multiscale_pool_inputs() in C++, so traced and eager calls fail alike.
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"autokd::{op}: expected input to be a floating-point tensor "
            f"(float64, float32, float16 or bfloat16), got {dtype}"
        )
    if not grids:
        raise ValueError(
            f"autokd::{op}: expected grids to be a non-empty list of grid sizes, got []"
        )
    H, W = input_size[2], input_size[3]
    for s in grids:
        torch._check_value(
            1 <= s and s <= H and s <= W,
            lambda: (
                f"autokd::{op}: expected grids entries in [1, min(H, W)], got {s} "
                f"(input of {H} x {W})"
            ),
        )


@torch.library.register_fake("autokd::multiscale_pool")
def _(input, grids):
    if input.dim() != 4:
        raise ValueError(
            "autokd::multiscale_pool: expected input of shape [N, C, H, W], "
            f"got {list(input.shape)}"
        )
    _check_fake("multiscale_pool", input.shape, grids, input.dtype)
    N, C = input.shape[0], input.shape[1]
    return input.new_empty((N, C, sum(s * s for s in grids)))


@torch.library.register_fake("autokd::multiscale_pool_backward")
def _(grad, input_size, grids):
    _check_fake("multiscale_pool_backward", input_size, grids)
    return grad.new_empty(input_size)


def _setup_context(ctx, inputs, output):
    input, grids = inputs
    ctx.input_size = list(input.shape)
    ctx.grids = list(grids)


def _backward(ctx, grad):
    grad_input = torch.ops.autokd.multiscale_pool_backward.default(grad, ctx.input_size, ctx.grids)
    return grad_input, None


torch.library.register_autograd("autokd::multiscale_pool", _backward, setup_context=_setup_context)


# The backward is linear in grad and its adjoint is the forward, so double backward is the
# forward op applied to the incoming gradient.
def _setup_context_backward(ctx, inputs, output):
    _, _, grids = inputs
    ctx.grids = list(grids)


def _backward_backward(ctx, grad_grad_input):
    return torch.ops.autokd.multiscale_pool.default(grad_grad_input, ctx.grids), None, None


torch.library.register_autograd(
    "autokd::multiscale_pool_backward", _backward_backward, setup_context=_setup_context_backward
)
