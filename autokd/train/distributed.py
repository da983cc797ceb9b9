"""Data-parallel ``distill`` under ``torchrun``: process group, sharding, synchronised BN.

``autokd-cli distill`` started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) runs one process per device; ``DistContext.from_env`` reads those
variables, ``init`` creates the process group (NCCL on CUDA, Gloo on CPU) and every process
trains a ``DistributedDataParallel`` copy of the distiller (student and adapters).

Semantics, chosen so that N processes train the model one process would train:
- ``--batch-size`` B is the GLOBAL batch: each of the W processes gets B / W samples per step
  (B must divide by W). The learning rate, the step count and the cosine schedule are those of
  a single-process run with batch B.
- The epoch order is the single-process loop's own permutation; ``EpochShardSampler`` (a
  ``DistributedSampler``) gives rank r every W-th position of it, so the union of the W local
  batches of step j is exactly the single-process batch j. When the sample count n is not a
  multiple of W, the sampler pads the order with its first (W - n mod W) samples: the last step
  of every epoch then sees those few samples twice (the only difference in the data).
- Augmentation is ``ReplayAugment``: the crop/flip of sample i in epoch e is a hash of
  (seed, i, e), identical whichever rank draws the sample (the same as single process).
  Randomness drawn from the global torch RNG during training (the random spatial mask of the
  ``mask`` transform, dropout) comes from a per-rank stream: rank 0 keeps the single-process
  stream, rank r > 0 is reseeded from (seed, r); such draws are well defined per rank but are
  not the draws a single process makes.
- BatchNorm is synchronised by default (``sync_bn``): statistics over the global batch, as in
  a single process. On CUDA this is ``torch.nn.SyncBatchNorm``; torch 2.14 refuses CPU input
  there ("SyncBatchNorm expected input tensor to be on GPU"), so on CPU/Gloo the BN layers
  become ``GlooSyncBatchNorm``, which all-reduces the per-channel sums through an autograd
  function (the same two all-reduces forward and backward that SyncBatchNorm does).
  ``sync_bn=False`` keeps per-rank BN (statistics over B / W samples; faster, not equivalent).
- Losses that couple the samples of a batch (Gram matrices over samples, inter-class Pearson,
  channel-wise views over N*H*W, the train-free layer factor mu_q) see the local batch of B / W
  samples, as every DDP training does; per-sample losses (CE, KL, L2, ...) are equivalent.
- Sparsity masks stay identical on every rank: the masks start from the same seed, gradients
  are all-reduced before the step, and prune/regrow use the (identical) weights, gradients and
  the manager's own seeded generator.
- Rank 0 alone writes checkpoints, ``student.pt``, ``result.json``, logs and progress bars.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistContext:
    """One process of a data-parallel run (``world_size`` 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    sync_bn: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"

    @staticmethod
    def launched() -> bool:
        """True inside a process started by torchrun (or anything that sets its variables)."""
        return all(k in os.environ for k in ENV_KEYS)

    @classmethod
    def from_env(cls, device: str = "cpu", sync_bn: bool = True) -> "DistContext":
        """The context torchrun describes; ``device`` "cuda" becomes cuda:LOCAL_RANK.

        Raises ValueError for a device that cannot be split one per process (cuda:N: under
        torchrun each process takes the GPU of its local rank)."""
        if not cls.launched():
            return cls(device=device, sync_bn=sync_bn)
        try:
            rank, world, local = (int(os.environ[k]) for k in ENV_KEYS)
        except ValueError as e:
            raise ValueError(
                f"torchrun environment: expected integer {', '.join(ENV_KEYS)}, got "
                f"{[os.environ[k] for k in ENV_KEYS]}"
            ) from e
        kind = torch.device(device).type
        if kind == "cuda":
            if torch.device(device).index is not None:
                raise ValueError(
                    f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; "
                    "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
                )
            device = f"cuda:{local}"
        elif kind != "cpu":
            raise ValueError(f"--device {device}: under torchrun expected cpu or cuda")
        return cls(rank=rank, world_size=world, local_rank=local, device=device, sync_bn=sync_bn)

    def init(self, timeout_s: float = 1800.0) -> None:
        """Create the default process group (no-op for a single process)."""
        if not self.distributed or dist.is_initialized():
            return
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(self.device))
        dist.init_process_group(
            self.backend,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def close(self) -> None:
        """Leave the process group together (a rank that tears it down while another still
        talks to it aborts that one)."""
        if self.distributed and dist.is_initialized():
            gc.collect()  # DDP reducers in reference cycles hold the group; free them first
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_batch(self, batch_size: int) -> int:
        """The per-process batch of a global ``batch_size``; ValueError when it does not divide."""
        if batch_size % self.world_size:
            lo = batch_size - batch_size % self.world_size
            hint = f"{lo} or {lo + self.world_size}" if lo else f"{self.world_size}"
            raise ValueError(
                f"--batch-size {batch_size} is the global batch and must divide by the "
                f"{self.world_size} processes of this run (each takes an equal share); "
                f"use {hint}"
            )
        return batch_size // self.world_size

    def all_sum(self, values: Sequence[float]) -> list:
        """Element-wise sum of ``values`` over all processes (float64, on the run's device)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reseed(self, seed: int) -> None:
        """Give rank r > 0 its own stream of the global RNG (rank 0 keeps the one it has, so a
        one-process run is a single-process run)."""
        if self.rank > 0:
            torch.manual_seed((seed + 1) * 1_000_003 + self.rank)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (itself when not distributed)."""
        if not self.distributed:
            return module
        if not dist.is_initialized():
            raise RuntimeError(
                f"rank {self.rank} of {self.world_size}: no process group; call "
                "DistContext.init() before training"
            )
        ids = [torch.device(self.device).index] if self.backend == "nccl" else None
        # Gradients as views of the all-reduce buckets: no copy between the two per step and
        # half the gradient memory. (Weights with a size-1 dim, e.g. a 1-channel stem conv,
        # still draw one harmless "grad strides do not match bucket view strides" warning per
        # rank: the strides of a size-1 dim are arbitrary.)
        return DDP(module, device_ids=ids, gradient_as_bucket_view=True)


class EpochShardSampler(DistributedSampler):
    """``DistributedSampler`` over an order that the caller gives per epoch.

    ``order_of_epoch(e)`` returns the n sample ids of epoch e (the single-process loop's own
    permutation); after ``set_epoch(e)`` iteration yields this rank's share: torch's padding to a
    multiple of the world size, then every W-th position from ``rank``. Cut into chunks of
    B / W, rank r's chunk j holds the positions of batch j of size B congruent to r mod W.
    """

    def __init__(
        self, order_of_epoch: Callable[[int], Sequence[int]], n: int, num_replicas: int, rank: int
    ):
        super().__init__(
            range(n), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False
        )
        self._order_of_epoch = order_of_epoch

    def __iter__(self):
        order = self._order_of_epoch(self.epoch)
        return iter([order[p] for p in super().__iter__()])


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum over ranks
    of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every rank (any device, any backend).

    mean = sum_r sum_i x / n, var = sum_r sum_i (x - mean)^2 / n (biased, for normalising; the
    running variance takes the unbiased n / (n - 1) var), with n the global count per channel.
    Two all-reduces forward (sums, then squared deviations: no cancellation as in E[x^2] - E[x]^2)
    and two backward. Eval mode, or no process group, is plain batch norm. Same parameters and
    buffers as nn.BatchNorm*d, so state dicts move freely between the two.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(
                f"GlooSyncBatchNorm: expected input of at least 2 dims, got {input.dim()}"
            )

    def forward(self, x):
        self._check_input_dim(x)
        sync = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not sync:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.size(1)], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))  # [C + 1]
        n = sums[-1].detach()
        mean = sums[:-1] / n  # [C]
        dev = x - mean.view(shape)
        var = _AllReduceSum.apply((dev * dev).sum(dims)) / n  # [C] biased
        y = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    (1.0 / float(self.num_batches_tracked))
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: str) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group:
    ``torch.nn.SyncBatchNorm`` on CUDA, ``GlooSyncBatchNorm`` elsewhere. Replaces modules, so
    convert a model BEFORE registering forward hooks on its BN layers."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlooSyncBatchNorm
    ):
        new = GlooSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
