"""The search driver: the policy of a search. Mechanics live elsewhere: a trial in
``autokd.search.trial``, where trials run in ``autokd.search.executors``, what to try next in
``autokd.search.strategies``.

    strategy.ask -> design -> spec -> TrialTask -> executor -> reward -> strategy.tell + journal

Every finished trial is committed to the journal the moment it finishes; running the same
search again replays the journal into the strategy and goes on from there, so an interrupted
search (Ctrl-C, SIGKILL, a reboot) loses only the trials that were running.

Several trials at once (``executor``/``workers``): the driver asks the strategy for as many
designs as there are free workers (MCTS puts a virtual loss on pending designs, TPE a constant
liar, so concurrent asks land on different designs), tells each reward as its trial finishes,
and alone writes the journal, one row per finished trial, in finishing order. Trial ``i`` in
launch order gets seed ``seed * 100003 + i`` whatever worker runs it; with one worker the
launch order is the journal order and the search is the serial one.

Failures (``run_tasks``, shared by every stage that runs trials): a trial whose worker dies
(or that runs out of GPU memory) is retried once with the same spec and seed; a second death
records it with status ``failed`` and the floor reward (``reward.reward_floor``), which is also
what the strategy is told: the same treatment as a diverged trial, so a design that kills its
worker is not proposed again and again. When ``max(3, workers)`` trials in a row fail so, the
workers are dying whatever the design and the search stops with an error (the finished trials
stay in the journal).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from autokd.errors import PipelineError
from autokd.pipeline import default_models, default_training
from autokd.search import executors
from autokd.search.journal import Journal, Trial
from autokd.search.report import write_outputs
from autokd.search.reward import reward_floor
from autokd.search.strategies import STRATEGIES, Proposal, Strategy, make_strategy
from autokd.search.trial import Prepared, TrialRunner, TrialSetup, TrialTask, prepare
from autokd.space import load_space
from autokd.train.loop import TrainConfig

EXECUTORS = ("local", "ray")
#: Attempts per trial: the first run and one retry.
MAX_ATTEMPTS = 2
Log = Callable[[str], None]


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
    workers: Optional[int] = 1  # None: workers_per_gpu on every GPU
    ray_address: Optional[str] = None  # None: Ray's default (RAY_ADDRESS, else a local cluster)
    # K trials share each GPU (autokd.search.executors.place_workers); not pinned either
    workers_per_gpu: Optional[int] = None

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise PipelineError(f"search: expected executor one of {', '.join(EXECUTORS)}, "
                                f"got {self.executor!r}")
        if self.workers is None and self.workers_per_gpu is None:
            raise PipelineError("search: expected workers, or workers_per_gpu to set them")
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int) or self.workers < 1):
            raise PipelineError(f"search: expected workers an integer >= 1, got {self.workers!r}")
        if self.workers_per_gpu is not None and (
                isinstance(self.workers_per_gpu, bool) or not isinstance(self.workers_per_gpu, int)
                or self.workers_per_gpu < 1):
            raise PipelineError(f"search: expected workers_per_gpu an integer >= 1, got "
                                f"{self.workers_per_gpu!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise PipelineError(
                f"search: a Ray address ({self.ray_address}) needs executor 'ray', "
                f"got {self.executor!r}"
            )
        if self.strategy not in STRATEGIES:
            raise PipelineError(f"search: expected strategy one of {', '.join(STRATEGIES)}, "
                                f"got {self.strategy!r}")
        if self.budget < 0:
            raise PipelineError(f"search: expected budget >= 0, got {self.budget}")
        if self.views < 1:
            raise PipelineError(f"search: expected views >= 1, got {self.views}")
        if self.proxy is None:
            self.proxy = TrainConfig(**default_training(self.data), subset=0.2, stop_fraction=0.2,
                                     sparsity=0.5, offline=True)
        if self.workers_per_gpu is not None and not self.proxy.device.startswith("cuda"):
            raise PipelineError(f"search: workers_per_gpu needs device cuda, got "
                                f"{self.proxy.device!r}")
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


def make_executor(cfg: SearchConfig, prepared: Prepared, log: Log):
    """The executor of ``cfg``: the driver's own process for one local worker, else worker
    processes or Ray tasks that open what the driver prepared."""
    if cfg.executor == "local" and cfg.workers == 1:
        return executors.InlineExecutor(TrialRunner(cfg, prepared))
    setup = TrialSetup.of(cfg, prepared)
    if cfg.executor == "local":
        ex = executors.LocalExecutor(setup, cfg.workers, cfg.proxy.device, log=log,
                                     workers_per_gpu=cfg.workers_per_gpu)
        log(f"local executor: {ex.slots} worker processes on {cfg.proxy.device}")
        return ex
    return executors.RayExecutor(setup, cfg.workers, cfg.proxy.device, address=cfg.ray_address,
                                 log=log, workers_per_gpu=cfg.workers_per_gpu)


def run_tasks(executor, propose: Callable[[int], List[TrialTask]],
              record: Callable[[TrialTask, Dict[str, Any]], None], log: Log) -> None:
    """Keep ``executor``'s slots busy with ``propose(room)`` until it proposes nothing and no
    task is in flight; ``record(task, result)`` gets each finished task's result (status
    ``failed`` after MAX_ATTEMPTS deaths). The retry and failure-streak policy of every stage."""
    in_flight: Dict[int, TrialTask] = {}
    failed_in_a_row, max_failed_in_a_row = 0, max(3, executor.slots)
    while True:
        room = executor.slots - len(in_flight)
        if room > 0:
            for task in propose(room):
                in_flight[task.index] = task
                executor.submit(task)
        if not in_flight:
            return
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
                log(f"trial {task.index}: failed {MAX_ATTEMPTS} times, recorded as failed")
                result = {"status": "failed", "reward": None, "seconds": out.seconds,
                          "metrics": {"error": out.died, "attempts": task.attempt}}
                failed_in_a_row += 1
            else:
                result = out.result
                failed_in_a_row = 0
            del in_flight[task.index]
            record(task, result)
            if failed_in_a_row >= max_failed_in_a_row:
                raise PipelineError(
                    f"{failed_in_a_row} trials in a row failed (workers died or ran out of memory; "
                    f"last: {out.died}); stopping before the journal fills with failures. Check "
                    "the workers' memory and logs, then run the same command to resume"
                )


def _search_stage(cfg: SearchConfig, space, strategy: Strategy, journal: Journal, executor,
                  floor: float, deadline: Optional[float], log: Log, bar) -> int:
    """The budget of proxy trials; returns how many were run by this invocation."""
    launched = len(journal)  # launch order of the next trial: its seed
    state = {"new": 0, "stopping": False, "in_flight": 0,
             "best": max((t.reward for t in journal.trials()), default=None)}

    def propose(room: int) -> List[TrialTask]:
        nonlocal launched
        room = min(room, cfg.budget - len(journal) - state["in_flight"])
        if room <= 0 or state["stopping"]:
            return []
        if deadline is not None and time.perf_counter() >= deadline:
            log(f"time limit of {cfg.time_limit:.0f} s reached after {len(journal)} trials")
            state["stopping"] = True
            return []
        tasks = []
        for p in strategy.ask(room):
            spec = space.spec_from_design(p.design).to_dict()
            tasks.append(TrialTask(launched, p.trial_id, p.design, spec,
                                   cfg.seed * 100_003 + launched))
            launched += 1
        state["in_flight"] += len(tasks)
        return tasks

    def record(task: TrialTask, result: Dict[str, Any]) -> None:
        state["in_flight"] -= 1
        reward = result["reward"] if result["reward"] is not None else floor
        strategy.tell(Proposal(task.trial_id, task.design), reward)
        trial = journal.add(task.design, reward, result["status"], result["metrics"],
                            result["seconds"], task.seed, cfg.strategy)
        state["new"] += 1
        state["best"] = reward if state["best"] is None else max(state["best"], reward)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{trial.reward:.3f}", best=f"{state['best']:.3f}")

    run_tasks(executor, propose, record, log)
    return state["new"]


def run_search(cfg: SearchConfig, log: Log = print, progress: bool = True) -> SearchResult:
    t_start = time.perf_counter()
    if cfg.executor == "ray":  # before the teacher is trained, not after
        executors.require_ray()
    if cfg.executor == "local" and cfg.proxy.device == "cuda" and cfg.workers_per_gpu:
        executors.place_workers(cfg.workers, executors.visible_gpus(), cfg.workers_per_gpu)
    os.makedirs(cfg.out, exist_ok=True)
    space = load_space(cfg.space)
    prepared = prepare(cfg, log=log, progress=progress)
    data, teacher = prepared.data, prepared.teacher
    journal = Journal(os.path.join(cfg.out, "journal.sqlite"), cfg.pinned(data.identity, teacher.hash))
    done = journal.trials()
    strategy = make_strategy(cfg.strategy, space, cfg.seed, [(t.design, t.reward) for t in done],
                             **({"exploration": cfg.exploration} if cfg.strategy == "mcts" else {}))
    if done:
        log(f"resuming: {len(done)} finished trials replayed from {journal.path}")
    executor = make_executor(cfg, prepared, log)
    bar = None
    if progress:
        from tqdm import tqdm  # progress bars only when asked for

        bar = tqdm(total=cfg.budget, initial=min(len(done), cfg.budget), desc="trials", unit="trial")
    deadline = None if cfg.time_limit is None else t_start + cfg.time_limit
    try:
        new = _search_stage(cfg, space, strategy, journal, executor, reward_floor(data.num_classes),
                            deadline, log, bar)
    finally:
        executor.close()
        if bar is not None:
            bar.close()
    trials = journal.trials()
    journal.close()
    outputs = write_outputs(cfg.out, trials, space, strategy.engine, log=log)
    return SearchResult(
        cfg.out, trials, outputs.get("best"), outputs.get("best_spec"), outputs.get("report"), new,
        time.perf_counter() - t_start,
    )
