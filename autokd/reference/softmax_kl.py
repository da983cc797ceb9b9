"""Eager reference of ``autokd::softmax_kl``: the spec of its kernels."""

import torch
from torch import Tensor


def softmax_kl(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """``tau^2 * mean_r KL(softmax(teacher_r / tau) || softmax(student_r / tau))``.

    Rows are dim 0; the softmax runs over all remaining dims jointly (``[R, L]`` or
    ``[R, A, B]``). The teacher is a constant target (detached), as in the kernel. Computed in
    the input dtype.
    """
    rows = student.shape[0]
    s = student.reshape(rows, -1) / tau  # [R, L]
    t = teacher.detach().reshape(rows, -1) / tau  # [R, L]
    log_p = torch.log_softmax(s, dim=1)
    log_q = torch.log_softmax(t, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)  # [R]
    return kl.mean() * (tau * tau)
