"""``autokd.ops.cka``: linear CKA (biased or debiased HSIC), differentiable in both inputs.

The op ``torch.ops.autokd.cka(x, y, debiased)`` returns ``(value, gram_grad)``; gram_grad
[2, N, N] = (dCKA/dK, dCKA/dL) is what the backward needs (one GEMM per input then). This
wrapper returns the value only. Nothing syncs with the host. Math, eps and limits:
csrc/ops/cka.h; eager spec: autokd.reference.cka.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cka(x: Tensor, y: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA between x [N, Dx] and y [N, Dy] (rows are samples), a 0-dim tensor.

    ``debiased=True`` uses the unbiased HSIC estimator (Song et al. 2012; N >= 4).
    """
    if not isinstance(debiased, bool):
        raise ValueError(f"autokd::cka: expected debiased to be a bool, got {debiased!r}")
    return torch.ops.autokd.cka.default(x, y, debiased)[0]


@torch.library.register_fake("autokd::cka")
def _cka_fake(x, y, debiased):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    return x.new_empty(()), x.new_empty((2, n, n), dtype=acc)


@torch.library.register_fake("autokd::cka_backward")
def _cka_backward_fake(grad, gram_grad, x, y):
    return x.new_empty(x.shape), y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    x, y, _debiased = inputs
    _value, gram_grad = output
    ctx.mark_non_differentiable(gram_grad)
    # Nothing flows into gram_grad: without this autograd would allocate and fill a zero
    # [2, N, N] tensor for it on every backward (as large as the saved gram_grad itself).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, gram_grad)


def _backward(ctx, grad, _grad_gram_grad):
    if grad is None:
        return None, None, None
    x, y, gram_grad = ctx.saved_tensors
    gx, gy = torch.ops.autokd.cka_backward.default(grad, gram_grad, x, y)
    return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd("autokd::cka", _backward, setup_context=_setup_context)
