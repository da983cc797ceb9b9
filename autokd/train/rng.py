"""Every random-number state a training run draws from, captured at an epoch boundary and put
back on resume, so that a ``distill`` killed after epoch k and resumed trains exactly the
student an uninterrupted run trains, also when the design draws random numbers (the random
spatial mask of ``mask`` and MGD, dropout).

What is captured, per process:
- torch's global CPU generator, and the CUDA generator of the process's device when CUDA has
  been initialised (the mask draws come from these);
- every ``torch.Generator`` held as an attribute by a module of the distiller (loss blocks or
  students that own their stream);
- numpy's and Python's global generators (training seeds its own numpy generators per epoch;
  these are kept so that a block drawing from the global ones still resumes exactly).
The sparsity manager's generator travels in its own state dict.

Data parallel: each rank draws from its own stream (autokd/train/distributed.py), so the
checkpoint holds every rank's state (gathered to rank 0, which writes it). A run resumed with
the same number of processes restores each rank's own state; with another number, rank r
restores the state of rank r where the checkpoint has one and otherwise keeps the stream
``DistContext.reseed`` gave it (such a resume is well defined but not bit-identical).
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn


def _module_generators(module: nn.Module) -> Dict[str, torch.Generator]:
    out = {}
    for name, mod in module.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Generator):
                out[f"{name}.{attr}" if name else attr] = value
    return out


def _cuda_device(device) -> Optional[torch.device]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def capture(module: nn.Module, device="cpu") -> Dict[str, Any]:
    """This process's RNG states (plain containers and tensors: loads with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    cuda = _cuda_device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
        "modules": {k: g.get_state() for k, g in _module_generators(module).items()},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [int(py_version), list(py_internal), py_gauss],
    }


def restore(state: Dict[str, Any], module: nn.Module, device="cpu") -> None:
    """Put back what ``capture`` took (on the same kind of device)."""
    torch.set_rng_state(state["torch"])
    cuda = _cuda_device(device)
    if state.get("cuda") is not None and cuda is not None:
        torch.cuda.set_rng_state(state["cuda"], cuda)
    gens = _module_generators(module)
    missing = sorted(set(state.get("modules", {})) - set(gens))
    if missing:
        raise ValueError(
            f"checkpoint RNG state: generators {missing} are not in this run's "
            "distiller; the checkpoint belongs to another design"
        )
    for k, g in gens.items():
        if k in state.get("modules", {}):
            g.set_state(state["modules"][k])
    np_state = state.get("numpy")
    if np_state is not None:
        np.random.set_state(
            {
                "bit_generator": np_state["bit_generator"],
                "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                "has_gauss": np_state["has_gauss"],
                "gauss": np_state["gauss"],
            }
        )
    py = state.get("python")
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))


def capture_all(module: nn.Module, device="cpu", dist=None) -> Dict[str, Any]:
    """Every rank's states, as rank 0 writes them: {"ranks": [state of rank 0, 1, ...]}.
    A collective under data parallelism: every rank must call it."""
    mine = capture(module, device)
    if dist is None or not dist.distributed:
        return {"ranks": [mine]}
    states = [None] * dist.world_size
    tdist.all_gather_object(states, mine)
    return {"ranks": states}


def restore_mine(saved: Dict[str, Any], module: nn.Module, device="cpu", dist=None) -> bool:
    """Restore this rank's state from ``capture_all``'s output; False when the checkpoint has
    none for this rank (a resume with more processes than the run that wrote it)."""
    rank = dist.rank if dist is not None and dist.distributed else 0
    ranks = saved.get("ranks") or []
    if rank >= len(ranks):
        return False
    restore(ranks[rank], module, device)
    return True
