"""The search driver: MCTS (or random search) over distiller designs, one proxy trial each.

    engine.ask -> design -> DistillerSpec -> proxy training (offline teacher features, sparse
    student, data subset, early stop) -> reward on the held-out split -> engine.tell + journal

Every finished trial is committed to the journal the moment it finishes; running the same
search again replays the journal into the engine and goes on from there, so an interrupted
search (Ctrl-C, SIGKILL, a reboot) loses only the trials that were running.

Several trials at once (``executor``/``workers``, see ``autokd.search.executors``): the driver
asks the engine for as many designs as there are free workers (``ask(k)``; pending designs
carry a virtual loss, so concurrent asks land on different branches), tells each reward as its
trial finishes, and alone writes the journal, one row per finished trial, in finishing order.
Trial ``i`` in launch order gets seed ``seed * 100003 + i`` whatever worker runs it; with one
worker the launch order is the journal order and the search is the serial one.

A trial whose worker dies (or that runs out of GPU memory) is retried once with the same design
and seed; a second death records it with status ``failed`` and the floor reward
(``reward.reward_floor``), which is also what the engine is told: the same treatment as a
diverged trial, so a design that kills its worker is not proposed again and again. When
``max(3, workers)`` trials in a row fail so, the workers are dying whatever the design and the
search stops with an error (the finished trials stay in the journal).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from autokd.pipeline import (
    PipelineError,
    default_models,
    default_training,
    load_or_train_teacher,
    make_augment,
    open_or_build_store,
    resolve_taps,
)
from autokd.search.executors import MAX_ATTEMPTS, TrialTask
from autokd.search.journal import Journal, Trial
from autokd.search.reward import proxy_reward, reward_floor
from autokd.train.loop import Diverged, TrainConfig, forward_all, train_student

STRATEGIES = ("mcts", "random")
EXECUTORS = ("local", "ray")


@dataclass
class SearchConfig:
    data: str = "digits"
    teacher: Optional[str] = None  # model name; None: the data set's default
    teacher_checkpoint: Optional[str] = None  # None: <out>/teacher.pt, trained on the first run
    teacher_epochs: int = 30
    student: Optional[str] = None
    teacher_taps: Optional[List[str]] = None  # None: the zoo's default taps
    student_taps: Optional[List[str]] = None
    space: str = "autokd"
    strategy: str = "mcts"
    budget: int = 100
    time_limit: Optional[float] = None  # seconds for this invocation; None: no limit
    seed: int = 0
    out: str = "runs/search"
    views: int = 4
    store_dtype: str = "fp16"
    store: Optional[str] = None  # None: <out>/teacher_features.akds
    exploration: Optional[float] = None  # None: the engine's default
    val_fraction: float = 0.1
    # None: the paper's accelerations (20% subset, 20% of the epochs, 50% sparse, offline) on the
    # data set's default schedule (pipeline.default_training).
    proxy: Optional[TrainConfig] = None
    # Where trials run; not part of the pinned configuration (a search may resume on more or
    # fewer workers). local + 1 worker: in this process, the serial search.
    executor: str = "local"
    workers: int = 1
    ray_address: Optional[str] = None  # None: Ray's default (RAY_ADDRESS, else a local cluster)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise PipelineError(f"search: expected executor one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise PipelineError(f"search: expected workers an integer >= 1, got {self.workers!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise PipelineError(
                f"search: a Ray address ({self.ray_address}) needs executor 'ray', got {self.executor!r}"
            )
        if self.strategy not in STRATEGIES:
            raise PipelineError(f"search: expected strategy one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.budget < 0:
            raise PipelineError(f"search: expected budget >= 0, got {self.budget}")
        if self.views < 1:
            raise PipelineError(f"search: expected views >= 1, got {self.views}")
        if self.proxy is None:
            self.proxy = TrainConfig(**default_training(self.data), subset=0.2, stop_fraction=0.2,
                                     sparsity=0.5, offline=True)
        teacher, student = default_models(self.data)
        self.teacher = self.teacher or teacher
        self.student = self.student or student

    def pinned(self, data_identity: str, teacher_hash: str) -> Dict[str, Any]:
        """What a resumed search must share with the journal it resumes."""
        proxy = self.proxy.to_dict()
        proxy.pop("device")
        return {
            "data": data_identity,
            "teacher_hash": teacher_hash,
            "student": self.student,
            "teacher_taps": self.teacher_taps,
            "student_taps": self.student_taps,
            "space": self.space,
            "strategy": self.strategy,
            "seed": self.seed,
            "views": self.views,
            "proxy": proxy,
        }


@dataclass
class SearchResult:
    out: str
    trials: List[Trial]
    best: Optional[Trial]
    best_spec_path: Optional[str]
    report_path: Optional[str]
    new_trials: int
    seconds: float


class TrialRunner:
    """Everything a proxy trial needs, prepared once per search."""

    def __init__(self, cfg: SearchConfig, data, teacher, store, augment, student_taps, log):
        self.cfg, self.data, self.teacher, self.store, self.augment = cfg, data, teacher, store, augment
        self.student_taps = student_taps
        self.log = log
        _, self.teacher_val_features = forward_all(
            teacher.model, data.val.images, teacher.taps, device=cfg.proxy.device
        )
        self.teacher_shapes = {t: tuple(f.shape[1:]) for t, f in self.teacher_val_features.items()}
        self.teacher_shapes["logits"] = (data.num_classes,)

    def run(self, spec, seed: int, proxy: Optional[TrainConfig] = None) -> Dict[str, Any]:
        """One proxy trial of ``spec``; ``proxy`` overrides the search's proxy settings (studies
        of the accelerations use it)."""
        from autokd.distill import Distiller
        from autokd.models import build_model

        cfg = dataclasses.replace(proxy or self.cfg.proxy, seed=seed, subset_seed=self.cfg.seed)
        torch.manual_seed(seed)
        student = build_model(self.cfg.student, num_classes=self.data.num_classes, in_channels=self.data.channels)
        offline = cfg.offline and self.store is not None
        distiller = Distiller(
            spec, student, student_taps=self.student_taps, teacher_taps=self.teacher.taps,
            teacher=None if offline else self.teacher.model,
            example_input=self.data.train.images[:2], teacher_shapes=self.teacher_shapes,
        ).to(cfg.device)
        t0 = time.perf_counter()
        try:
            result = train_student(distiller, student, self.data, cfg, store=self.store if offline else None,
                                   augment=self.augment)
        except Diverged as e:
            return {"status": "diverged", "reward": None, "metrics": {"error": str(e)},
                    "seconds": time.perf_counter() - t0}
        reward, metrics = proxy_reward(
            student, self.data.val.images, self.data.val.labels, self.student_taps,
            self.teacher_val_features, self.teacher.taps, device=cfg.device,
        )
        metrics.update(train_seconds=result.seconds, final_loss=result.final_loss, epochs=result.epochs_run)
        status = "ok" if math.isfinite(reward) else "diverged"
        return {"status": status, "reward": reward if status == "ok" else None, "metrics": metrics,
                "seconds": time.perf_counter() - t0}


def random_design(levels: Sequence[Dict[str, Any]], rng: random.Random) -> Dict[str, str]:
    """A uniform random rollout over the dependent levels (the simulation step of MCTS)."""
    design: Dict[str, str] = {}
    for level in levels:
        req = level.get("requires") or {}
        if all(design.get(k) in allowed for k, allowed in req.items()):
            design[level["name"]] = rng.choice(list(level["options"]))
    return design


def _make_executor(cfg: SearchConfig, data, teacher, store, augment, student_taps, space, log):
    from autokd.search import executors

    if cfg.executor == "local" and cfg.workers == 1:
        return executors.InlineExecutor(TrialRunner(cfg, data, teacher, store, augment, student_taps, log), space)
    ctx = executors.WorkerContext(
        cfg=cfg, teacher_checkpoint=os.path.abspath(teacher.checkpoint), teacher_hash=teacher.hash,
        data_identity=data.identity, store_path=None if store is None else os.path.abspath(store.path),
        student_taps=list(student_taps),
    )
    if cfg.executor == "local":
        log(f"local executor: {cfg.workers} worker processes on {cfg.proxy.device}")
        return executors.LocalExecutor(ctx, cfg.workers, cfg.proxy.device, log=log)
    return executors.RayExecutor(ctx, cfg.workers, cfg.proxy.device, address=cfg.ray_address, log=log)


def run_search(cfg: SearchConfig, log: Callable[[str], None] = print, progress: bool = True) -> SearchResult:
    from autokd.data import load_data
    from autokd.search.report import write_outputs
    from autokd.space import load_space

    t_start = time.perf_counter()
    if cfg.executor == "ray":  # before the teacher is trained, not after
        from autokd.search.executors import require_ray

        require_ray()
    os.makedirs(cfg.out, exist_ok=True)
    space = load_space(cfg.space)
    data = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    log(f"data {data.name}: {len(data.train)} train / {len(data.val)} held-out / {len(data.test)} test, "
        f"{data.num_classes} classes, {data.channels}x{data.image_size[0]}x{data.image_size[1]}")
    # Fail on a wrong student name or tap now, not after the teacher has been trained.
    from autokd.models import build_model

    build_model(cfg.student, num_classes=data.num_classes, in_channels=data.channels)
    resolve_taps(cfg.student, cfg.student_taps)
    teacher = load_or_train_teacher(
        data, cfg.teacher, cfg.teacher_checkpoint, os.path.join(cfg.out, "teacher.pt"),
        epochs=cfg.teacher_epochs, seed=cfg.seed, device=cfg.proxy.device, taps=cfg.teacher_taps, log=log,
        progress=progress,
    )
    student_taps = resolve_taps(cfg.student, cfg.student_taps)
    if len(student_taps) != len(teacher.taps):
        raise PipelineError(
            f"expected as many student taps as teacher taps, got {student_taps} and {teacher.taps}"
        )
    augment = make_augment(data, cfg.seed)
    store = None
    if cfg.proxy.offline:
        store = open_or_build_store(
            cfg.store or os.path.join(cfg.out, "teacher_features.akds"), teacher, data, augment,
            views=cfg.views, dtype=cfg.store_dtype, device=cfg.proxy.device, log=log, progress=progress,
        )
    journal = Journal(os.path.join(cfg.out, "journal.sqlite"), cfg.pinned(data.identity, teacher.hash))
    done = journal.trials()
    levels = space.engine_levels()
    engine = None
    if cfg.strategy == "mcts":
        from autokd.search.mcts import MCTS

        opts = {"seed": cfg.seed}
        if cfg.exploration is not None:
            opts["exploration"] = cfg.exploration
        engine = MCTS.from_history(levels, [(t.design, t.reward) for t in done], **opts)
    if done:
        log(f"resuming: {len(done)} finished trials replayed from {journal.path}")
    executor = _make_executor(cfg, data, teacher, store, augment, student_taps, space, log)
    seen = {tuple(sorted(t.design.items())) for t in done}
    launched = len(done)  # launch order of the next trial: its seed
    in_flight: Dict[int, TrialTask] = {}
    new = 0
    floor = reward_floor(data.num_classes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.budget, initial=min(len(done), cfg.budget), desc="trials", unit="trial")
    deadline = None if cfg.time_limit is None else t_start + cfg.time_limit
    stopping = False
    # Workers that die on every trial (a broken node, a design-independent crash) stop the
    # search instead of recording the whole budget as failed.
    failed_in_a_row, max_failed_in_a_row = 0, max(3, executor.slots)
    try:
        while True:
            room = min(executor.slots - len(in_flight), cfg.budget - len(journal) - len(in_flight))
            if room > 0 and not stopping and deadline is not None and time.perf_counter() >= deadline:
                log(f"time limit of {cfg.time_limit:.0f} s reached after {len(journal)} trials")
                stopping = True
            if room > 0 and not stopping:
                if engine is not None:
                    proposals = engine.ask(room)
                else:
                    proposals = []
                    for _ in range(room):
                        rng = random.Random(f"{cfg.seed}:{launched + len(proposals)}")
                        design = random_design(levels, rng)
                        for _ in range(100):  # without replacement while the space allows
                            if tuple(sorted(design.items())) not in seen:
                                break
                            design = random_design(levels, rng)
                        seen.add(tuple(sorted(design.items())))
                        proposals.append((None, design))
                for trial_id, design in proposals:
                    task = TrialTask(launched, trial_id, design, cfg.seed * 100_003 + launched)
                    launched += 1
                    in_flight[task.index] = task
                    executor.submit(task)
            if not in_flight:
                break
            for out in executor.wait():
                task = out.task
                if out.result is None:
                    log(f"trial {task.index} (attempt {task.attempt}): {out.died}")
                    if task.attempt < MAX_ATTEMPTS:
                        log(f"trial {task.index}: retrying (attempt {task.attempt + 1} of {MAX_ATTEMPTS})")
                        retry = dataclasses.replace(task, attempt=task.attempt + 1)
                        in_flight[task.index] = retry
                        executor.submit(retry)
                        continue
                    log(f"trial {task.index}: failed {MAX_ATTEMPTS} times, recorded as failed with reward {floor:.4f}")
                    res = {"status": "failed", "reward": None, "seconds": out.seconds,
                           "metrics": {"error": out.died, "attempts": task.attempt}}
                    failed_in_a_row += 1
                else:
                    res = out.result
                    failed_in_a_row = 0
                del in_flight[task.index]
                reward = res["reward"]
                if reward is None:
                    reward = floor
                if engine is not None:
                    engine.tell(task.trial_id, reward)
                trial = journal.add(task.design, reward, res["status"], res["metrics"], res["seconds"], task.seed,
                                    cfg.strategy)
                seen.add(tuple(sorted(task.design.items())))
                new += 1
                if bar is not None:
                    bar.update(1)
                    best = max(journal.trials(), key=lambda t: t.reward)
                    bar.set_postfix(reward=f"{trial.reward:.3f}", best=f"{best.reward:.3f}")
                if failed_in_a_row >= max_failed_in_a_row:
                    raise PipelineError(
                        f"{failed_in_a_row} trials in a row failed (workers died or ran out of memory; last: "
                        f"{out.died}); stopping before the journal fills with failures. Check the "
                        "workers' memory and logs, then run the same command to resume"
                    )
    finally:
        executor.close()
        if bar is not None:
            bar.close()
    trials = journal.trials()
    journal.close()
    outputs = write_outputs(cfg.out, trials, space, engine, log=log)
    return SearchResult(
        cfg.out, trials, outputs.get("best"), outputs.get("best_spec"), outputs.get("report"), new,
        time.perf_counter() - t_start,
    )
