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
import fcntl
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from autokd.errors import PipelineError
from autokd.models import training_defaults
from autokd.pipeline import default_models, default_proxy, default_training, teacher_plan
from autokd.search import executors
from autokd.search.journal import Journal, Trial
from autokd.search.report import write_outputs
from autokd.search.reward import REWARDS, reward_floor
from autokd.search.selection import SelectionConfig, SelectionResult, run_selection
from autokd.search.strategies import STRATEGIES, Proposal, Strategy, make_strategy
from autokd.search.trial import Prepared, TrialRunner, TrialSetup, TrialTask, prepare
from autokd.space import load_space, space_fingerprint
from autokd.train.loop import TrainConfig

EXECUTORS = ("local", "ray")
#: Attempts per trial: the first run and one retry.
MAX_ATTEMPTS = 2
#: Trials in a row that diverged (NaN/Inf loss) before the search stops: a few designs diverge
#: on their own, a run this long says the schedule or the teacher is at fault.
MAX_DIVERGED_IN_A_ROW = 10
LOCK_FILE = ".search.lock"
Log = Callable[[str], None]


@dataclass
class SearchConfig:
    data: str = "digits"
    # Several teachers: "a,b" (or a list), with one checkpoint entry per teacher and taps
    # shared or one list per teacher; autokd.pipeline.teacher_plan has the rules.
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
    # The trial's reward (autokd.search.reward.REWARDS): "paper", 1 - (CE + 1 - CKA) on the
    # held-out split, or "calibrated", the same with the CE after temperature scaling
    reward: str = "paper"
    val_fraction: float = 0.1
    # None: the data set's proxy (pipeline.default_proxy: the paper's accelerations, 20% subset,
    # 20% of the epochs, 50% sparse, except on digits) on its schedule, offline.
    proxy: Optional[TrainConfig] = None
    # Where trials run; not part of the pinned configuration (a search may resume on more or
    # fewer workers). local + 1 worker: in this process, the serial search.
    executor: str = "local"
    workers: Optional[int] = 1  # None: workers_per_gpu on every GPU
    ray_address: Optional[str] = None  # None: Ray's default (RAY_ADDRESS, else a local cluster)
    # K trials share each GPU (autokd.search.executors.place_workers); not pinned either
    workers_per_gpu: Optional[int] = None
    # The stage after the trials (autokd.search.selection); not pinned: its runs are journaled
    # by spec, seed and fidelity, so a resumed search may change these and keeps what matches.
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise PipelineError(
                f"search: expected executor one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.workers is None and self.workers_per_gpu is None:
            raise PipelineError("search: expected workers, or workers_per_gpu to set them")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise PipelineError(f"search: expected workers an integer >= 1, got {self.workers!r}")
        if self.workers_per_gpu is not None and (
            isinstance(self.workers_per_gpu, bool)
            or not isinstance(self.workers_per_gpu, int)
            or self.workers_per_gpu < 1
        ):
            raise PipelineError(
                f"search: expected workers_per_gpu an integer >= 1, got {self.workers_per_gpu!r}"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise PipelineError(
                f"search: a Ray address ({self.ray_address}) needs executor 'ray', "
                f"got {self.executor!r}"
            )
        if self.reward not in REWARDS:
            raise PipelineError(
                f"search: expected reward one of {', '.join(REWARDS)}, got {self.reward!r}"
            )
        if self.strategy not in STRATEGIES:
            raise PipelineError(
                f"search: expected strategy one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.budget < 0:
            raise PipelineError(f"search: expected budget >= 0, got {self.budget}")
        if self.views < 1:
            raise PipelineError(f"search: expected views >= 1, got {self.views}")
        if self.proxy is None:
            student = self.student or default_models(self.data)[1]
            sched = default_training(self.data)
            # the student's optimizer defaults (ViTs: AdamW, lr 1e-3, warm-up) over the
            # data set's schedule, as the CLI applies them
            sched.update(training_defaults(student, sched["epochs"]))
            self.proxy = TrainConfig(**sched, **default_proxy(self.data, student), offline=True)
        if self.workers_per_gpu is not None and not self.proxy.device.startswith("cuda"):
            raise PipelineError(
                f"search: workers_per_gpu needs device cuda, got {self.proxy.device!r}"
            )
        teacher, student = default_models(self.data)
        self.teacher = self.teacher or teacher
        self.student = self.student or student

    def pinned(self, data_identity: str, teacher_hash, space=None) -> Dict[str, Any]:
        """What a resumed search must share with the journal it resumes (the space by its
        content: a space file edited between two runs is another search). ``teacher_hash``:
        the teacher's, or (several teachers) the list of every teacher's, in order."""
        proxy = self.proxy.pinned()
        pinned = {
            "data": data_identity,
            "teacher_hash": teacher_hash,
            "student": self.student,
            "teacher_taps": self.teacher_taps,
            "student_taps": self.student_taps,
            "space": self.space,
            "space_fingerprint": space_fingerprint(space or load_space(self.space)),
            "strategy": self.strategy,
            "seed": self.seed,
            "views": self.views,
            "proxy": proxy,
        }
        if self.reward != "paper":  # a journal of paper rewards keeps the keys it always had
            pinned["reward"] = self.reward
        if not isinstance(teacher_hash, str):  # several teachers: their names too (not for one:
            # a one-teacher journal keeps the keys it always had, so it still resumes)
            pinned["teachers"] = [e.name for e in teacher_plan(self.teacher)]
        return pinned


@dataclass
class SearchResult:
    out: str
    trials: List[Trial]
    best: Optional[Trial]
    best_spec_path: Optional[str]
    report_path: Optional[str]
    new_trials: int
    seconds: float
    selection: Optional[SelectionResult] = None
    cost: Optional["SearchCost"] = None


@dataclass
class SearchCost:
    """What the search spent, in full trainings of the student: ``work`` counts sample-epochs
    (a trial on a fraction s of the data for a fraction f of the epochs is s * f of a full
    training, whatever makes it faster or slower); ``time`` divides the seconds spent by the
    seconds one full training takes at the measured speed of the selection stage's runs
    (dense, whole training split: the closest thing to a full training the search runs)."""

    trial_work: float
    selection_work: float
    trial_seconds: float
    selection_seconds: float
    full_training_seconds: Optional[float]

    @property
    def work(self) -> float:
        return self.trial_work + self.selection_work

    @property
    def time(self) -> Optional[float]:
        if not self.full_training_seconds:
            return None
        return (self.trial_seconds + self.selection_seconds) / self.full_training_seconds

    def summary(self) -> str:
        text = (
            f"cost: {self.work:.2f} full trainings of work (trials {self.trial_work:.2f} + "
            f"selection {self.selection_work:.2f}); "
            f"{self.trial_seconds + self.selection_seconds:.0f} s"
        )
        if self.time is not None:
            text += (
                f", {self.time:.2f} full trainings of time (one full training ~"
                f"{self.full_training_seconds:.1f} s)"
            )
        return text


def make_executor(cfg: SearchConfig, prepared: Prepared, log: Log):
    """The executor of ``cfg``: the driver's own process for one local worker, else worker
    processes or Ray tasks that open what the driver prepared."""
    if cfg.executor == "local" and cfg.workers == 1:
        return executors.InlineExecutor(TrialRunner(cfg, prepared))
    setup = TrialSetup.of(cfg, prepared)
    if cfg.executor == "local":
        ex = executors.LocalExecutor(
            setup, cfg.workers, cfg.proxy.device, log=log, workers_per_gpu=cfg.workers_per_gpu
        )
        log(f"local executor: {ex.slots} worker processes on {cfg.proxy.device}")
        return ex
    return executors.RayExecutor(
        setup,
        cfg.workers,
        cfg.proxy.device,
        address=cfg.ray_address,
        log=log,
        workers_per_gpu=cfg.workers_per_gpu,
    )


def run_tasks(
    executor,
    propose: Callable[[int], List[TrialTask]],
    record: Callable[[TrialTask, Dict[str, Any]], None],
    log: Log,
) -> None:
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
                    log(
                        f"trial {task.index}: retrying "
                        f"(attempt {task.attempt + 1} of {MAX_ATTEMPTS})"
                    )
                    retry = dataclasses.replace(task, attempt=task.attempt + 1)
                    in_flight[task.index] = retry
                    executor.submit(retry)
                    continue
                log(f"trial {task.index}: failed {MAX_ATTEMPTS} times, recorded as failed")
                result = {
                    "status": "failed",
                    "reward": None,
                    "seconds": out.seconds,
                    "metrics": {"error": out.died, "attempts": task.attempt},
                }
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


def run_batch(
    executor,
    tasks: List[TrialTask],
    log: Log,
    on_result: Callable[[TrialTask, Dict[str, Any]], None],
) -> None:
    """Train ``tasks`` (indices 0..n-1) through ``executor``; ``on_result(task, result)`` is
    called as each one finishes (to journal it at once)."""
    queue = list(tasks)

    def propose(room: int) -> List[TrialTask]:
        out = queue[:room]
        del queue[:room]
        return out

    run_tasks(executor, propose, on_result, log)


def _search_stage(
    cfg: SearchConfig,
    space,
    strategy: Strategy,
    journal: Journal,
    executor,
    floor: float,
    deadline: Optional[float],
    log: Log,
    bar,
) -> int:
    """The budget of proxy trials; returns how many were run by this invocation."""
    launched = len(journal)  # launch order of the next trial: its seed
    done = journal.trials()
    diverged = 0
    for t in reversed(done):  # the streak a resumed search continues
        if t.status == "ok":
            break
        diverged += t.status == "diverged"
    state = {
        "new": 0,
        "stopping": False,
        "in_flight": 0,
        "diverged": diverged,
        "best": max((t.reward for t in done), default=None),
    }

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
            tasks.append(
                TrialTask(launched, p.trial_id, p.design, spec, cfg.seed * 100_003 + launched)
            )
            launched += 1
        state["in_flight"] += len(tasks)
        return tasks

    def record(task: TrialTask, result: Dict[str, Any]) -> None:
        state["in_flight"] -= 1
        reward = result["reward"] if result["reward"] is not None else floor
        strategy.tell(Proposal(task.trial_id, task.design), reward)
        trial = journal.add(
            task.design,
            reward,
            result["status"],
            result["metrics"],
            result["seconds"],
            task.seed,
            cfg.strategy,
        )
        state["new"] += 1
        state["best"] = reward if state["best"] is None else max(state["best"], reward)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{trial.reward:.3f}", best=f"{state['best']:.3f}")
        state["diverged"] = state["diverged"] + 1 if result["status"] == "diverged" else 0
        if state["diverged"] >= MAX_DIVERGED_IN_A_ROW:
            raise PipelineError(
                f"{state['diverged']} trials in a row diverged (the loss became NaN or Inf; last: "
                f"{result['metrics'].get('error', '?')}): that many designs do not all fail "
                f"on their own. Lower --lr (now {cfg.proxy.lr:g}) or check the teacher, then run "
                "the same command to resume (finished trials are kept)"
            )

    run_tasks(executor, propose, record, log)
    return state["new"]


class RunFolderLock:
    """An exclusive lock on a run folder (``<out>/.search.lock``, flock): a second search (or
    compare) on the same folder while one runs would exceed the budget, repeat seeds and train
    the same teacher twice, so it is refused by name. The lock goes with the process, however
    it ends (the kernel releases it)."""

    def __init__(self, out: str, what: str = "search"):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (
                os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            )
            os.close(self._fd)
            raise PipelineError(
                f"{out} is in use by {holder}; wait for it to finish, or use another --out "
                f"(the lock {self.path} is released when that process ends)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{what} (pid {os.getpid()})".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def run_search(cfg: SearchConfig, log: Log = print, progress: bool = True) -> SearchResult:
    with RunFolderLock(cfg.out, "a search"):
        return _run_search(cfg, log, progress)


def _cost(
    cfg: SearchConfig, trials: List[Trial], selection: Optional[SelectionResult]
) -> SearchCost:
    proxy = cfg.proxy
    full = None
    if selection is not None:
        # seconds per run = fixed cost + per-epoch cost x fidelity, fitted over the stage's
        # rounds (their fidelities differ); a full training is fidelity 1. One fidelity only:
        # the per-run ratio, which counts the fixed cost too often (an upper bound).
        points = [
            (r.fidelity, r.seconds / max(sum(len(v) for v in r.scores.values()), 1))
            for r in selection.rounds
            if r.seconds > 0
        ]
        xs = {x for x, _ in points}
        if len(xs) >= 2:
            mx = statistics.mean(x for x, _ in points)
            my = statistics.mean(y for _, y in points)
            slope = sum((x - mx) * (y - my) for x, y in points) / sum(
                (x - mx) ** 2 for x, _ in points
            )
            full = (my - slope * mx) + slope if slope > 0 else None
        if full is None and points:
            full = statistics.median(y / x for x, y in points)
    return SearchCost(
        len(trials) * proxy.subset * proxy.run_epochs / proxy.epochs,
        selection.work if selection else 0.0,
        sum(t.seconds for t in trials),
        selection.seconds if selection else 0.0,
        full,
    )


def _run_search(cfg: SearchConfig, log: Log, progress: bool) -> SearchResult:
    t_start = time.perf_counter()
    if cfg.executor == "ray":  # before the teacher is trained, not after
        executors.require_ray()
    if cfg.executor == "local" and cfg.proxy.device == "cuda" and cfg.workers_per_gpu:
        executors.place_workers(cfg.workers, executors.visible_gpus(), cfg.workers_per_gpu)
    space = load_space(cfg.space)
    journal_path = os.path.join(cfg.out, "journal.sqlite")
    if os.path.exists(journal_path) and not os.access(journal_path, os.W_OK):
        # found now, not after the teacher has trained and the store is built
        raise PipelineError(
            f"{journal_path}: the journal is read-only; fix its permissions or "
            "copy the folder somewhere writable (the journal is not damaged)"
        )
    prepared = prepare(cfg, log=log, progress=progress)
    data = prepared.data
    journal = Journal(journal_path, cfg.pinned(data.identity, prepared.teacher_hash, space))
    done = journal.trials()
    strategy = make_strategy(
        cfg.strategy,
        space,
        cfg.seed,
        [(t.design, t.reward) for t in done],
        **({"exploration": cfg.exploration} if cfg.strategy == "mcts" else {}),
    )
    if done:
        log(f"resuming: {len(done)} finished trials replayed from {journal.path}")
    executor = make_executor(cfg, prepared, log)
    bar = None
    if progress:
        from tqdm import tqdm  # progress bars only when asked for

        bar = tqdm(
            total=cfg.budget, initial=min(len(done), cfg.budget), desc="trials", unit="trial"
        )
    deadline = None if cfg.time_limit is None else t_start + cfg.time_limit
    selection = None
    try:
        try:
            new = _search_stage(
                cfg,
                space,
                strategy,
                journal,
                executor,
                reward_floor(data.num_classes),
                deadline,
                log,
                bar,
            )
        finally:
            if bar is not None:
                bar.close()
        trials = journal.trials()
        finished = len(trials) >= cfg.budget
        if finished and any(t.status == "ok" for t in trials):
            selection = run_selection(
                space,
                trials,
                journal,
                lambda tasks, on_result: run_batch(executor, tasks, log, on_result),
                cfg.selection,
                epochs=cfg.proxy.epochs,
                seed=cfg.seed,
                log=log,
            )
        elif not finished and cfg.selection.fidelity > 0:
            log(
                f"selection stage: waits for the budget of {cfg.budget} trials ({len(trials)} done)"
            )
    finally:
        executor.close()
    trials = journal.trials()
    evaluations = journal.evaluations()
    record = journal.selection()
    journal.close()
    cost = _cost(cfg, trials, selection)
    outputs = write_outputs(
        cfg.out,
        trials,
        space,
        strategy.engine,
        log=log,
        config=journal.config,
        selection=selection,
        evaluations=evaluations,
        cost=cost,
        selection_record=record,
    )
    if trials and not any(t.status == "ok" for t in trials):
        counts = {s: sum(t.status == s for t in trials) for s in ("diverged", "failed")}
        raise PipelineError(
            f"no trial worked: {counts['diverged']} diverged, {counts['failed']} failed (see "
            f"{outputs.get('report')}); lower --lr (now {cfg.proxy.lr:g}) or check the teacher"
        )
    return SearchResult(
        cfg.out,
        trials,
        outputs.get("best"),
        outputs.get("best_spec"),
        outputs.get("report"),
        new,
        time.perf_counter() - t_start,
        selection,
        cost,
    )
