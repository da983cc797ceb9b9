"""Mixed precision and memory format of every training path (proxy trials, teacher, distill).

``precision``:
- ``fp32`` (default): no autocast, no scaler; what every earlier autokd run did.
- ``bf16``: the forward passes (student, online teacher, the distiller's student side) run under
  ``torch.autocast(dtype=bfloat16)``; bfloat16 has float32's exponent range, so no loss scaling.
- ``fp16``: autocast to float16 and a ``torch.amp.GradScaler`` (float16 underflows small
  gradients; the scaler multiplies the loss before the backward, unscales the gradients before
  the step and skips a step whose gradients overflowed).

The loss terms stay in float32: ``autokd.nn.blocks.DistillLoss`` casts its inputs to float32
once and runs with autocast off (measured on CPU, see there), and the trainers compute the
cross-entropy on float32 logits. Parameters and optimizer state stay float32 (autocast casts
per op; the masked fused optimizer steps see float32 as before).

``channels_last``: the input batches are made channels-last (NHWC strides); convolutions then
pick their channels-last kernels and keep the layout through the network. Parameters are not
converted: the masked optimizer steps of the sparse proxy need contiguous parameters, and
converting the model measured no better than converting the inputs alone
(benchmarks/bench_precision.py, CPU, ResNet-20 step on [64, 3, 32, 32], one thread, two runs:
channels-last inputs 1.25x / 1.40x the contiguous fp32 step, model and inputs 1.26x / 1.23x;
bf16 contiguous 1.86x / 1.86x, bf16 channels-last inputs 2.35x / 2.74x, model too 2.39x /
3.04x; benchmarks/results/throughput.md). Off by default: on a GPU channels-last is expected
to help convolutions under bf16/fp16 (tensor cores want NHWC), unmeasured here (no GPU lent).

On CPU use bf16 (native on CPUs with AVX512-BF16/AMX; 1.9x fp32 on ResNet-20 above): fp16
convolutions take a slow path in this torch (digits_teacher, 5 epochs: 90 s against 1.1 s in
fp32). fp16 is for GPUs without bfloat16 (before Ampere).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device) -> None:
    """Refuse a precision the device cannot run, before anything trains."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp32":
        return
    if not torch.amp.is_autocast_available(kind):
        raise ValueError(
            f"precision {precision}: torch has no autocast for device {device!r}; "
            "use --precision fp32"
        )
    if (
        precision == "bf16"
        and kind == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise ValueError(
            f"precision bf16: the GPU of {device!r} does not support bfloat16 "
            "(before Ampere); use --precision fp16"
        )


def autocast(precision: str, device):
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, None otherwise (bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels-last strides when asked and it is a batch of images [N, C, H, W]."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def backward_step(loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler | None) -> bool:
    """``loss.backward()`` and ``optimizer.step()``, through ``scaler`` when there is one.
    Returns whether the step was taken (a scaler skips a step whose gradients overflowed)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale exactly when it found inf/NaN gradients, i.e. when step()
    # skipped the optimizer step
    return scaler.get_scale() >= before
