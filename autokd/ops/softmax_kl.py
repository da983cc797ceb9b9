"""``autokd.ops.softmax_kl``: fused temperature-KL distillation loss (CPU and CUDA kernels)."""
import torch
from torch import Tensor


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
    """
    return torch.ops.autokd.softmax_kl.default(student, teacher, float(tau))


@torch.library.register_fake("autokd::softmax_kl")
def _softmax_kl_fake(student, teacher, tau):
    return student.new_empty(())


@torch.library.register_fake("autokd::softmax_kl_backward")
def _softmax_kl_backward_fake(grad, student, teacher, tau):
    # The kernel allocates with empty_like too: the student's strides where it is dense.
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, tau = inputs
    ctx.save_for_backward(student, teacher)
    ctx.tau = tau


def _backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.autokd.softmax_kl_backward.default(
            grad, student, teacher, ctx.tau
        )
    return grad_student, None, None


torch.library.register_autograd("autokd::softmax_kl", _backward, setup_context=_setup_context)
