"""Fused masked AdamW step: ``torch.ops.autokd.masked_adamw_step`` (math in
csrc/ops/masked_adamw_step.h; eager spec in autokd.reference.masked_adamw_step).

Like masked_sgd_step it mutates its inputs and returns nothing: no autograd formula, and a fake
kernel that returns nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from autokd import _C  # noqa: F401  (registers the schema and kernels)


def masked_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> None:
    """In-place AdamW step over ``params`` with optional bool keep-masks (``None`` = dense).

    ``step`` is the step count after this step (1 on the first call) and is shared by all
    parameters of the call. Equals ``torch.optim.AdamW`` (amsgrad=False) where masks are true;
    masked weights, exp_avg and exp_avg_sq become exactly zero and their gradients are ignored.
    """
    if not any(len(x) for x in (params, grads, masks, exp_avgs, exp_avg_sqs)):
        return  # nothing to update, and no tensor to pick a device kernel from
    torch.ops.autokd.masked_adamw_step.default(
        list(params),
        list(grads),
        list(masks),
        list(exp_avgs),
        list(exp_avg_sqs),
        int(step),
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
    )


@torch.library.register_fake("autokd::masked_adamw_step")
def _masked_adamw_step_fake(
    params, grads, masks, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay
):
    return None
