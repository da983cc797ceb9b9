"""``autokd.ops.pearson``: fused DIST-style relation loss (CPU and CUDA kernels)."""

import torch
from torch import Tensor


def pearson(student: Tensor, teacher: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """DIST-style inter- and intra-class relation losses of ``[N, K]`` logits.

    With ``P = softmax(student / tau, 1)`` and ``Q = softmax(teacher / tau, 1)`` returns two
    0-dim tensors ``(inter, intra)``:
    ``inter = tau^2 * mean_n (1 - corr(P[n, :], Q[n, :]))`` and
    ``intra = tau^2 * mean_k (1 - corr(P[:, k], Q[:, k]))``, where
    ``corr(a, b) = (u . v) / (||u|| ||v|| + 1e-8)`` with ``u, v`` the centred ``a, b``.
    DIST's loss is ``beta * inter + gamma * intra``.

    Only the student receives a gradient: the teacher is the distillation target, a constant,
    so its gradient is ``None`` even when it requires grad. Inputs may have any strides;
    accumulation is in float32 (float64 for float64 inputs).
    """
    return torch.ops.autokd.pearson.default(student, teacher, float(tau))


@torch.library.register_fake("autokd::pearson")
def _pearson_fake(student, teacher, tau):
    return student.new_empty(()), student.new_empty(())


@torch.library.register_fake("autokd::pearson_backward")
def _pearson_backward_fake(grad_inter, grad_intra, student, teacher, tau):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, tau = inputs
    ctx.save_for_backward(student, teacher)
    ctx.tau = tau


def _backward(ctx, grad_inter, grad_intra):
    student, teacher = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.autokd.pearson_backward.default(
            grad_inter, grad_intra, student, teacher, ctx.tau
        )
    return grad_student, None, None


torch.library.register_autograd("autokd::pearson", _backward, setup_context=_setup_context)
