"""Fused masked SGD step: ``torch.ops.autokd.masked_sgd_step`` (math in
csrc/ops/masked_sgd_step.h; eager spec in autokd.reference.masked_sgd_step).

An optimizer update mutates its inputs and returns nothing, so there is no autograd formula to
register: the fake kernel only declares that nothing is returned (the mutations are in the
schema), which is all torch.compile and FakeTensor tracing need.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from autokd import _C  # noqa: F401  (registers the schema and kernels)


def masked_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    momentum_buffers: Sequence[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
) -> None:
    """In-place SGD step over ``params`` with optional bool keep-masks (``None`` = dense).

    Equals ``torch.optim.SGD`` (momentum, dampening, weight decay, Nesterov) where masks are true;
    masked weights and their momentum become exactly zero and their gradients are ignored.
    ``first_step=True`` starts the momentum buffers from this step's update (their old content
    is not read). ``momentum_buffers`` may be empty when ``momentum == 0``. All tensors share one
    device and floating dtype; ``params`` and ``momentum_buffers`` must be contiguous.
    """
    if not any(len(x) for x in (params, grads, masks, momentum_buffers)):
        return  # nothing to update, and no tensor to pick a device kernel from
    torch.ops.autokd.masked_sgd_step.default(
        list(params),
        list(grads),
        list(masks),
        list(momentum_buffers),
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(first_step),
    )


@torch.library.register_fake("autokd::masked_sgd_step")
def _masked_sgd_step_fake(
    params,
    grads,
    masks,
    momentum_buffers,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    first_step,
):
    return None
