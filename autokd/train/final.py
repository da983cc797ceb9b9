"""Full training of a student with a distiller spec (``autokd-cli distill``).

Checkpoints after every epoch (student, adapters, optimizer, sparsity masks, epoch and every
RNG state the training draws from, autokd/train/rng.py) to ``<out>/checkpoint.pt``, written
atomically; running the same command again resumes from the last finished epoch and trains
the very student an uninterrupted run trains, random masks included. Ends with the test
accuracy, also written to ``<out>/result.json``.

Under torchrun (``dist``, see autokd/train/distributed.py) every rank trains its share of each
global batch and rank 0 alone writes the checkpoint, ``student.pt`` and ``result.json``. The
checkpoint is the same file either way (no DDP prefixes): a run may be resumed with another
number of processes, or without torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from autokd.distill import Distiller
from autokd.errors import PipelineError
from autokd.fsutil import atomic_torch_save, atomic_write_text
from autokd.models import build_model, check_model_fits
from autokd.space import DistillerSpec, load_distiller
from autokd.store import pinned_teacher_hash
from autokd.train import rng
from autokd.train.distributed import DistContext, convert_sync_batchnorm
from autokd.train.loop import Diverged, forward_all, train_student
from autokd.train.teacher import evaluate


def resolve_spec(spec: str):
    """A DistillerSpec from a YAML path, or else a classic distiller's name (configs/distillers,
    ``none`` for the student alone) looked up by ``autokd.space.load_distiller``, whose error
    names close matches and the known names."""
    if os.path.exists(spec):
        return DistillerSpec.from_yaml(spec)
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        raise PipelineError(f"--spec {spec!r}: no such file")
    return load_distiller(spec)


@dataclass
class DistillResult:
    test_accuracy: float
    test_ce: float
    epochs: int
    seconds: float
    checkpoint: str


def run_distill(
    spec,
    data,
    teacher,
    student_name: str,
    student_taps,
    cfg,
    out: str,
    store=None,
    augment=None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    dist=None,
) -> DistillResult:
    """Train ``student_name`` with ``spec`` to the end of ``cfg``'s schedule, resuming from
    ``<out>/checkpoint.pt`` when it exists. ``dist``: this process's ``DistContext`` under
    torchrun (its process group initialised; ``cfg.batch_size`` is then the global batch), None
    for one process. Every rank returns rank 0's result.

    ``teacher``: a ``TeacherInfo``, or a list of them (several teachers, combined by the
    Distiller; ``store`` is then their ``TeacherStores``)."""
    dist = dist or DistContext(device=cfg.device)
    dist.check_batch(cfg.batch_size)  # first: a mistake must surface before any collective
    main = dist.is_main
    if not main:
        log, progress = (lambda _m: None), False
    if main:
        os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    student = build_model(student_name, num_classes=data.num_classes, in_channels=data.channels)
    check_model_fits(student, student_name, data, "student")  # before any collective or epoch
    sync_bn = dist.distributed and dist.sync_bn
    if sync_bn:  # before the distiller hooks its taps: conversion replaces BN modules
        student = convert_sync_batchnorm(student, cfg.device)
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    shapes = []
    for t in teachers:
        if not spec.uses_teacher():  # the student alone never runs a teacher, not even once
            shapes.append({})  # one (unread) entry per teacher: the Distiller counts them
            continue
        _, tfeats = forward_all(t.model, data.train.images[:2], t.taps)
        shapes.append({tap: tuple(f.shape[1:]) for tap, f in tfeats.items()})
        shapes[-1]["logits"] = (data.num_classes,)
    offline = cfg.offline and store is not None
    # lists of one teacher are the one-teacher Distiller
    distiller = Distiller(
        spec,
        student,
        student_taps=student_taps,
        teacher_taps=[t.taps for t in teachers],
        teacher=None if offline else [t.model for t in teachers],
        example_input=data.train.images[:2],
        teacher_shapes=shapes,
    )
    if sync_bn:  # the design's adapters (1x1 conv + BN)
        distiller.loss = convert_sync_batchnorm(distiller.loss, cfg.device)
    distiller = distiller.to(cfg.device)
    start_epoch, resume, elapsed = 0, None, 0.0
    pinned = {
        "spec": spec.to_dict(),
        "student": student_name,
        "teacher_hash": pinned_teacher_hash(teachers),
        "data": data.identity,
        "config": cfg.pinned(),
    }
    if os.path.exists(ckpt_path):
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: say which and stop, never guess
            raise PipelineError(
                f"{ckpt_path}: unreadable checkpoint ({e}); remove it to start afresh"
            ) from e
        if ck.get("pinned") != json.loads(json.dumps(pinned)):
            raise PipelineError(
                f"{ckpt_path}: checkpoint of another distill run (spec, models, data or "
                "settings differ); use another --out folder"
            )
        start_epoch, elapsed = ck["epoch"] + 1, ck.get("seconds", 0.0)
        resume = {"distiller": ck["distiller"], **ck["optim"], "rng": ck.get("rng")}
        log(f"resuming from {ckpt_path} after epoch {start_epoch}")
        if ck.get("rng") is None:
            log(
                "the checkpoint holds no RNG state (an older autokd wrote it): random draws of "
                "the resumed epochs differ from an uninterrupted run's"
            )

    bar = None
    if progress:
        from tqdm import tqdm  # only when a progress bar is asked for

        bar = tqdm(total=cfg.run_epochs, initial=start_epoch, desc="distill", unit="epoch")

    t_run = time.perf_counter()

    def on_epoch_end(epoch, optimizer, sparsity, scaler=None):
        rng_state = rng.capture_all(distiller, cfg.device, dist)  # a collective: every rank
        if not main:
            return
        state = {
            "rng": rng_state,
            "seconds": elapsed + time.perf_counter() - t_run,
            "pinned": json.loads(json.dumps(pinned)),
            "epoch": epoch,
            "distiller": distiller.state_dict(),
            "optim": {
                "optimizer": optimizer.state_dict(),
                "sparsity": sparsity.state_dict() if sparsity is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
        }
        atomic_torch_save(state, ckpt_path)

    def show(done, total, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    try:
        res = train_student(
            distiller,
            student,
            data,
            cfg,
            store=store if offline else None,
            augment=augment,
            progress=show,
            start_epoch=start_epoch,
            resume=resume,
            on_epoch_end=on_epoch_end,
            dist=dist,
        )
    except Diverged as e:
        kept = (
            f"the checkpoint of the last finished epoch stays in {ckpt_path}"
            if os.path.exists(ckpt_path)
            else "no epoch finished"
        )
        raise PipelineError(
            f"distill {spec.label()}: training diverged ({e}); {kept}. Lower --lr (now "
            f"{cfg.lr:g}) or choose another design, in a new --run-dir"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    result = None
    if main:  # the weights are the same on every rank; one evaluates and writes
        acc, ce = evaluate(student, data.test, device=cfg.device)
        result = DistillResult(acc, ce, cfg.run_epochs, elapsed + res.seconds, ckpt_path)
        atomic_torch_save(student.state_dict(), os.path.join(out, "student.pt"))
        atomic_write_text(
            os.path.join(out, "result.json"),
            json.dumps(
                {
                    **dataclasses.asdict(result),
                    "spec": spec.to_dict(),
                    "student": student_name,
                    "processes": dist.world_size,
                },
                indent=2,
            ),
        )
    # the other ranks wait here until rank 0 has written everything
    return dist.broadcast(result)
