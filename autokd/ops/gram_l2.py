"""``autokd.ops.gram_l2``: G-L2 distance between normalised Gram matrices (fused kernels).

The op ``torch.ops.autokd.gram_l2(student, teacher, mode)`` returns ``(loss, gram_grad)``;
gram_grad = dloss/dG_S is what the backward needs (one GEMM then). This wrapper returns the
loss only. Math, eps and limits: csrc/ops/gram_l2.h; eager spec: autokd.reference.gram_l2.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("sample", "channel")


def gram_l2(student: Tensor, teacher: Tensor, mode: str = "sample") -> Tensor:
    """|| G_S/||G_S|| - G_T/||G_T|| ||_F^2 with G = F F^T, a 0-dim tensor.

    mode "sample": student [N, Ds], teacher [N, Dt] (one N x N Gram each).
    mode "channel": student [N, C, Ls], teacher [N, C, Lt] (a C x C Gram per sample, each
    normalised on its own; mean over samples).
    Gradient flows to the student only; the teacher is a constant target.
    """
    if not isinstance(mode, str):
        raise ValueError(f"autokd::gram_l2: expected mode one of 'sample', 'channel', got {mode!r}")
    return torch.ops.autokd.gram_l2.default(student, teacher, mode)[0]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("autokd::gram_l2")
def _gram_l2_fake(student, teacher, mode):
    if mode not in MODES:
        raise ValueError(f"autokd::gram_l2: expected mode one of 'sample', 'channel', got '{mode}'")
    acc = _acc_dtype(student.dtype)
    if mode == "sample":
        gram_grad = student.new_empty((student.shape[0], student.shape[0]), dtype=acc)
    else:
        n, c = student.shape[0], student.shape[1]
        gram_grad = student.new_empty((n, c, c), dtype=acc)
    return student.new_empty(()), gram_grad


@torch.library.register_fake("autokd::gram_l2_backward")
def _gram_l2_backward_fake(grad, gram_grad, student):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, _teacher, _mode = inputs
    _loss, gram_grad = output
    ctx.mark_non_differentiable(gram_grad)
    # Nothing flows into gram_grad: without this autograd would allocate and fill a zero
    # tensor of gram_grad's size for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, gram_grad)


def _backward(ctx, grad, _grad_gram_grad):
    student, gram_grad = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0] and grad is not None:
        grad_student = torch.ops.autokd.gram_l2_backward.default(grad, gram_grad, student)
    # The teacher's Gram is a constant target (documented): no gradient for it.
    return grad_student, None, None


torch.library.register_autograd("autokd::gram_l2", _backward, setup_context=_setup_context)
