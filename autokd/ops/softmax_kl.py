"""``autokd.ops.softmax_kl``: fused temperature-KL distillation loss (CPU and CUDA kernels).

The op ``torch.ops.autokd.softmax_kl(student, teacher, tau, with_grad)`` returns
``(loss, student_grad)``: with ``with_grad`` the kernel also writes d loss / d student (for a
unit upstream gradient) from the same exps as the loss, and the backward only scales it; else
``student_grad`` is an empty ``[0]`` tensor. This wrapper returns the loss only. Math and
layouts: csrc/ops/softmax_kl.h; eager spec: autokd.reference.softmax_kl.

Unlike the other ops, softmax_kl's autograd is registered in C++ (a
``torch::autograd::Function`` for the Autograd dispatch key, csrc/ops/softmax_kl_autograd.cpp),
not with ``torch.library.register_autograd`` here. The reason is per-call overhead at small
sizes: as the logit-KD loss it runs once per step on inputs like [128, 100] logits, where the
Python autograd glue (setup_context + backward) cost ~30 us per call, more than the kernel
(~21 us then), and held forward+backward at 1.8x the eager reference; the C++ node costs
~2 us. It does the same work: it saves the kernel's ``student_grad`` and its backward only
scales it; the teacher gets no gradient. The fake kernel below stays in Python.
"""

import torch
from torch import Tensor

# Looked up once: resolving torch.ops.autokd.softmax_kl.default costs ~0.3 us per call, a
# measurable share of a call on [128, 100] logits.
_softmax_kl_op = torch.ops.autokd.softmax_kl.default


def softmax_kl(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Temperature KL distillation loss, as a 0-dim tensor of the inputs' dtype.

    ``tau^2 * mean_r KL(softmax(teacher_r / tau) || softmax(student_r / tau))`` where rows are
    dim 0 and the softmax runs over all remaining dims jointly. ``student`` and ``teacher`` are
    ``[R, L]`` or ``[R, A, B]`` (then ``L = A * B``) of the same shape, dtype and device, with any
    strides (views are read in place, never copied):

    - logit KD: ``[N, K]`` logits;
    - channel-wise (CWD): ``f.view(N * C, H * W)``;
    - sample-wise: ``f.view(N, C * H * W)``;
    - channel view: ``f.view(N, C, H * W).transpose(0, 1)``, i.e. ``[C, N, H * W]``.

    Only the student receives a gradient: the teacher is the distillation target, a constant,
    so its gradient is ``None`` even when it requires grad (detach it or not, the result is the
    same). Accumulation is in float32 (float64 for float64 inputs).

    When autograd is on and ``student`` requires grad, the forward also computes the student's
    gradient and keeps it (one input-sized tensor) until the backward.
    """
    # The kernel writes the student's gradient in the same sweep as the loss when autograd
    # will want it; the backward then only scales it (see csrc/ops/softmax_kl.h).
    with_grad = torch.is_grad_enabled() and student.requires_grad
    return _softmax_kl_op(student, teacher, float(tau), with_grad)[0]


@torch.library.register_fake("autokd::softmax_kl")
def _softmax_kl_fake(student, teacher, tau, with_grad):
    # The kernel allocates with empty_like too: the student's strides where it is dense.
    student_grad = torch.empty_like(student) if with_grad else student.new_empty((0,))
    return student.new_empty(()), student_grad
