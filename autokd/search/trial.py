"""One proxy trial: what it is (``TrialTask``), what it gives back (``TrialOutcome``) and what
runs it (``TrialRunner``), with the one set-up path every place that runs trials shares.

    TrialTask(spec, seed, fidelity) --TrialRunner.run--> {status, reward, metrics, seconds}

A task carries the distiller spec itself (as a plain dict), never a design of a search space:
whoever runs it (the driver's process, a local worker, a Ray task) needs no space, and the
selection stage runs classic distillers, which are specs outside any space, through the same
path. ``proxy`` overrides the search's proxy settings for one task (the selection stage trains
at higher fidelity: more data, more epochs, other seeds).

Set-up: ``prepare(cfg, ...)`` turns a search configuration into the data, the teacher, the
feature store and the augmentation, training the teacher and building the store when the
driver asks for it (``train=True``) and only opening them, with their identities checked, in
a worker (``TrialSetup``). Both end in the same ``TrialRunner`` constructor.

Out of memory: ``execute`` is the single place that turns a GPU out-of-memory error into a
failed attempt (the driver's retry policy decides what happens next); any other exception is
a bug or a wrong input and propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from autokd.data import load_data
from autokd.distill import Distiller
from autokd.errors import PipelineError
from autokd.models import build_model, check_model_fits
from autokd.pipeline import (
    load_or_train_teachers,
    make_augment,
    open_or_build_stores,
    open_stores,
    resolve_taps,
    teacher_file,
)
from autokd.search.reward import proxy_reward
from autokd.space.spec import DistillerSpec
from autokd.store import pinned_teacher_hash
from autokd.train.loop import Diverged, TrainConfig, forward_all, train_student

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrialTask:
    """One trial to run. ``index`` is the launch order within its stage (it seeds the trial);
    ``trial_id`` is the strategy's handle for tell (None outside the search stage)."""

    index: int
    trial_id: Optional[int]
    design: Optional[Dict[str, str]]  # the design of the space (None for a classic spec)
    spec: Dict[str, Any]  # DistillerSpec.to_dict(): what is trained
    seed: int
    attempt: int = 1
    proxy: Optional[Dict[str, Any]] = None  # TrainConfig fields that override the search's


@dataclass
class TrialOutcome:
    task: TrialTask
    result: Optional[Dict[str, Any]]  # TrialRunner.run's dict; None when the attempt died
    died: Optional[str] = None  # why the attempt died (retryable: worker killed, out of memory)
    seconds: float = 0.0  # wall time of the attempt as the driver saw it


class TrialError(RuntimeError):
    """An exception inside a trial that is not a worker's death (a bug): stops the search."""


@dataclass
class Prepared:
    data: Any  # autokd.data.DataBundle
    teacher: Any  # autokd.pipeline.TeacherInfo: the first (or only) teacher
    # FeatureStore; autokd.store.TeacherStores with several teachers; None (online trials)
    store: Any
    augment: Any  # autokd.store.ReplayAugment
    student_taps: List[str]
    teachers: Optional[List[Any]] = None  # every teacher in order; None: [teacher]

    def __post_init__(self):
        if self.teachers is None:
            self.teachers = [self.teacher]

    @property
    def teacher_hash(self):
        """What the journal pins: the teacher's hash, or every teacher's (a list) for several."""
        return pinned_teacher_hash(self.teachers)


def prepare(cfg, log: Log = print, progress: bool = True) -> Prepared:
    """The driver's set-up: data, teacher (trained on the first run), feature store (built on
    the first run), each checked against the configuration."""
    data = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    log(
        f"data {data.name}: {len(data.train)} train / {len(data.val)} held-out / {len(data.test)} "
        f"test, {data.num_classes} classes, "
        f"{data.channels}x{data.image_size[0]}x{data.image_size[1]}"
    )
    # A wrong student name or tap, or images too small for the student, fail now, not after
    # the teacher has been trained.
    check_model_fits(
        build_model(cfg.student, num_classes=data.num_classes, in_channels=data.channels),
        cfg.student,
        data,
        "student",
    )
    student_taps = resolve_taps(cfg.student, cfg.student_taps)
    # several teachers: cfg.teacher "a,b" (autokd.pipeline.teacher_plan), each with its file
    teachers = load_or_train_teachers(
        data,
        cfg.teacher,
        cfg.teacher_checkpoint,
        os.path.join(cfg.out, "teacher.pt"),
        epochs=cfg.teacher_epochs,
        seed=cfg.seed,
        device=cfg.proxy.device,
        taps=cfg.teacher_taps,
        log=log,
        progress=progress,
        student_taps=student_taps,
        precision=cfg.proxy.precision,
        channels_last=cfg.proxy.channels_last,
    )
    augment = make_augment(data, cfg.seed)
    store = None
    if cfg.proxy.offline:
        store = open_or_build_stores(
            cfg.store or os.path.join(cfg.out, "teacher_features.akds"),
            teachers,
            data,
            augment,
            views=cfg.views,
            dtype=cfg.store_dtype,
            device=cfg.proxy.device,
            log=log,
            progress=progress,
        )
    return Prepared(data, teachers[0], store, augment, student_taps, teachers)


@dataclass
class TrialSetup:
    """What a worker needs to build its TrialRunner: the configuration and the paths of what
    the driver prepared, not the tensors (small enough to ship once per worker)."""

    cfg: Any  # SearchConfig
    # one teacher: its checkpoint and hash; several: a list of each, in order
    teacher_checkpoint: Any
    teacher_hash: Any
    data_identity: str
    store_path: Optional[str]  # the first teacher's store; teacher j's is teacher_file(path, j)
    student_taps: List[str]

    @classmethod
    def of(cls, cfg, prepared: Prepared) -> "TrialSetup":
        store = prepared.store
        paths = [os.path.abspath(t.checkpoint) for t in prepared.teachers]
        store_path = None
        if store is not None:
            store_path = os.path.abspath(store.path if len(paths) == 1 else store.paths[0])
        return cls(
            cfg,
            paths[0] if len(paths) == 1 else paths,
            prepared.teacher_hash,
            prepared.data.identity,
            store_path,
            list(prepared.student_taps),
        )

    def key(self) -> str:
        blob = json.dumps(
            [
                self.cfg.pinned(self.data_identity, self.teacher_hash),
                self.cfg.data,
                self.cfg.teacher,
                self.cfg.val_fraction,
                self.teacher_checkpoint,
                self.store_path,
                self.student_taps,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def open(self, device: str) -> Prepared:
        """The worker's set-up: the same data, teacher and store as the driver's, opened and
        checked (a node that reads other files is an error, never a silent mix)."""
        where = f"worker {socket.gethostname()}:{os.getpid()}"
        cfg = self.cfg
        data = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if data.identity != self.data_identity:
            raise PipelineError(
                f"{where}: data {cfg.data!r} differs from the driver's ({data.identity} vs "
                f"{self.data_identity}); every node must read the same files"
            )
        many = not isinstance(self.teacher_checkpoint, str)
        checkpoints = list(self.teacher_checkpoint) if many else [self.teacher_checkpoint]
        hashes = list(self.teacher_hash) if many else [self.teacher_hash]
        for path in checkpoints:
            if not os.path.exists(path):
                raise PipelineError(
                    f"{where}: teacher checkpoint {path} not found; on a cluster "
                    "--out must be on a file system shared by all nodes"
                )
        teachers = load_or_train_teachers(
            data,
            cfg.teacher,
            checkpoints,
            None,
            cfg.teacher_epochs,
            cfg.seed,
            device,
            cfg.teacher_taps,
            log=lambda _m: None,
            progress=False,
        )
        for path, teacher, expected in zip(checkpoints, teachers, hashes):
            if teacher.hash != expected:
                raise PipelineError(
                    f"{where}: teacher {path} has hash {teacher.hash}, the driver's "
                    f"has {expected}; the file changed during the search"
                )
        store = None
        if self.store_path is not None:
            for j in range(len(teachers)):
                path = teacher_file(self.store_path, j)
                if not os.path.exists(path):
                    raise PipelineError(
                        f"{where}: feature store {path} not found; on a cluster --out must "
                        "be on a file system shared by all nodes"
                    )
            store = open_stores(self.store_path, teachers, data)
        return Prepared(
            data,
            teachers[0],
            store,
            make_augment(data, cfg.seed),
            list(self.student_taps),
            teachers,
        )


class TrialRunner:
    """Runs proxy trials of one search: the teacher's held-out features are computed once."""

    def __init__(self, cfg, prepared: Prepared, device: Optional[str] = None):
        self.cfg = cfg
        self.device = device or cfg.proxy.device
        self.data, self.teacher = prepared.data, prepared.teacher
        self.teachers = prepared.teachers
        self.store, self.augment = prepared.store, prepared.augment
        self.student_taps = prepared.student_taps
        # per teacher, in order; teacher_val_features and teacher_shapes: the first teacher's
        self.all_val_features, self.all_shapes = [], []
        for t in self.teachers:
            _, feats = forward_all(t.model, self.data.val.images, t.taps, device=self.device)
            shapes = {tap: tuple(f.shape[1:]) for tap, f in feats.items()}
            shapes["logits"] = (self.data.num_classes,)
            self.all_val_features.append(feats)
            self.all_shapes.append(shapes)
        self.teacher_val_features = self.all_val_features[0]
        self.teacher_shapes = self.all_shapes[0]

    def train_config(self, task: TrialTask) -> TrainConfig:
        """The proxy settings of ``task``: the search's, with the task's overrides, its seed,
        the search's subset seed (every trial of a stage sees the same data) and this device."""
        overrides = dict(task.proxy or {})
        return dataclasses.replace(
            self.cfg.proxy,
            **overrides,
            seed=task.seed,
            subset_seed=self.cfg.seed,
            device=self.device,
        )

    def run(self, task: TrialTask) -> Dict[str, Any]:
        """One trial: train the student with the task's spec, score it on the held-out split."""
        cfg = self.train_config(task)
        spec = DistillerSpec.from_dict(task.spec)
        torch.manual_seed(task.seed)
        student = build_model(
            self.cfg.student, num_classes=self.data.num_classes, in_channels=self.data.channels
        )
        offline = cfg.offline and self.store is not None
        # one teacher or several alike: lists of one are the one-teacher Distiller
        distiller = Distiller(
            spec,
            student,
            student_taps=self.student_taps,
            teacher_taps=[t.taps for t in self.teachers],
            teacher=None if offline else [t.model for t in self.teachers],
            example_input=self.data.train.images[:2],
            teacher_shapes=self.all_shapes,
        ).to(cfg.device)
        t0 = time.perf_counter()
        try:
            result = train_student(
                distiller,
                student,
                self.data,
                cfg,
                store=self.store if offline else None,
                augment=self.augment,
            )
        except Diverged as e:
            return {
                "status": "diverged",
                "reward": None,
                "metrics": {"error": str(e)},
                "seconds": time.perf_counter() - t0,
            }
        reward, metrics = proxy_reward(
            student,
            self.data.val.images,
            self.data.val.labels,
            self.student_taps,
            self.all_val_features,
            [t.taps for t in self.teachers],
            device=cfg.device,
            kind=self.cfg.reward,
        )
        metrics.update(
            train_seconds=result.seconds, final_loss=result.final_loss, epochs=result.epochs_run
        )
        status = "ok" if math.isfinite(reward) else "diverged"
        return {
            "status": status,
            "reward": reward if status == "ok" else None,
            "metrics": metrics,
            "seconds": time.perf_counter() - t0,
        }


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError)


def execute(runner: TrialRunner, task: TrialTask) -> Tuple[str, Any]:
    """Run ``task``: ("ok", result) or ("died", why) when it ran out of GPU memory (a failed
    attempt the driver may retry); other exceptions propagate."""
    try:
        return ("ok", runner.run(task))
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return ("died", f"out of memory: {first}")


# One search's runner per worker process: data, teacher, store and the teacher's held-out
# features are loaded on the first trial and kept for the next ones.
_RUNNERS: Dict[str, TrialRunner] = {}


def worker_runner(setup: TrialSetup, device: str) -> TrialRunner:
    key = setup.key() + "|" + device
    if key not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[key] = TrialRunner(setup.cfg, setup.open(device), device=device)
    return _RUNNERS[key]


def forget_worker_runner() -> None:
    """Drop the cached runner (after an out-of-memory error its tensors may be the cause)."""
    _RUNNERS.clear()
