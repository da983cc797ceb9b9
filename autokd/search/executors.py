"""Where proxy trials run: in the driver (serial), in local worker processes, or as Ray tasks.

The driver (``autokd.search.driver``) owns the engine and the journal; an executor only runs
trials. It takes ``TrialTask``s (``autokd.search.trial``: a spec, its seed, the attempt number)
and hands back ``TrialOutcome``s, one per task, in the order the trials finish:

- ``InlineExecutor``: the trial runs in the driver's process (``--executor local --workers 1``,
  the default; exactly the serial search).
- ``LocalExecutor``: N worker processes (spawn context) started and stopped by the driver; with
  ``--device cuda`` worker i is pinned to visible GPU ``i mod G`` through
  ``CUDA_VISIBLE_DEVICES``; CPU workers split the cores between them. ``--workers-per-gpu K``
  puts K workers on every GPU (N = K x G unless ``--workers`` says less): proxy trials of
  CIFAR-sized students are launch-bound, and K trials at once keep one GPU busy where one
  trial leaves it mostly idle (unmeasured here: no GPU on the machines this was written on).
- ``RayExecutor``: one Ray task per trial asking for one GPU (``--device cuda``; 1/K of a GPU
  with ``--workers-per-gpu K``) or one CPU, on a cluster given by address or a local one
  started for the search.

What travels per task is small: a ``TrialSetup`` (the search configuration and the paths of
the teacher checkpoint and the feature store, shipped once per worker or put once in Ray's
object store) and the spec. Each worker process opens the data, the teacher and the mmap
store itself and keeps them for the next trials of the same search, so on a cluster ``--out``
(teacher and store) and file-based ``--data`` must be on a file system every node can read.

Failures. A worker that dies during a trial (killed, the out-of-memory killer, a segfault) or a
trial that runs out of GPU memory is one failed *attempt*: the driver retries the trial once
(same design, same seed) and then records it as ``failed``. Any other exception inside a trial
is a bug or a wrong input, not bad luck, and stops the search as it does in a serial run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_connections
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from autokd.errors import PipelineError
from autokd.search.trial import (
    TrialError,
    TrialOutcome,
    TrialRunner,
    TrialSetup,
    TrialTask,
    execute,
    forget_worker_runner,
    is_out_of_memory,
    worker_runner,
)

RAY_MISSING = (
    "--executor ray needs Ray, which is not installed: pip install 'autokd[ray]' "
    "(or pip install 'ray>=2.40'), on the driver and on every node of the cluster"
)
#: Test-only fault injection, honoured in worker processes only (never in the driver): a
#: comma-separated list of ``index@attempt`` pairs; the worker running attempt ``attempt`` of
#: the trial launched ``index``-th by the search exits on the spot with ``os._exit(137)``, as
#: the out-of-memory killer would end it. It exercises the real death-and-retry path.
KILL_ENV = "AUTOKD_TEST_KILL_TRIALS"


def require_ray():
    """The ray module, or a PipelineError that says how to install it."""
    try:
        import ray  # optional dependency: imported only when the Ray executor is chosen
    except ImportError as e:
        raise PipelineError(RAY_MISSING) from e
    return ray


# -- worker side ---------------------------------------------------------------------------
def _maybe_die(task: TrialTask) -> None:
    rule = os.environ.get(KILL_ENV, "")
    if rule and f"{task.index}@{task.attempt}" in {r.strip() for r in rule.split(",")}:
        os._exit(137)


def _error_reply(e: BaseException) -> Tuple[str, Any]:
    """A trial's exception as plain data (the exception object itself may not pickle)."""
    user = isinstance(e, (PipelineError, ValueError, KeyError, FileNotFoundError))
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return ("error", (type(e).__name__, str(msg), user, "".join(traceback.format_exception(e))))


def run_task(setup: TrialSetup, task: TrialTask, device: str) -> Tuple[str, Any]:
    """Run one trial in a worker; ("ok", result) | ("died", why) | ("error", details)."""
    _maybe_die(task)
    try:
        kind, payload = execute(worker_runner(setup, device), task)
    except Exception as e:  # noqa: BLE001 - sent back to the driver, which decides
        if not is_out_of_memory(e):  # out of memory while loading: a failed attempt too
            return _error_reply(e)
        kind, payload = "died", f"out of memory: {str(e).splitlines()[0] if str(e) else 'OOM'}"
    if kind == "died":
        forget_worker_runner()  # its tensors may be what filled the memory
    return (kind, payload)


def _raise_error(task: TrialTask, details) -> None:
    name, msg, user, tb = details
    if user:
        raise PipelineError(f"trial {task.index}: {msg}")
    raise TrialError(f"trial {task.index} raised {name}: {msg}\n--- worker traceback ---\n{tb}")


def _outcome(task: TrialTask, kind: str, payload, elapsed: float) -> TrialOutcome:
    """The TrialOutcome of a worker's reply: ("ok", result), ("died", why) or ("error",
    details), the last raised here (a bug or a wrong input stops the search, as in a serial
    run)."""
    if kind == "error":
        _raise_error(task, payload)
    if kind == "died":
        return TrialOutcome(task, None, payload, elapsed)
    return TrialOutcome(task, payload, None, elapsed)


# -- executors -----------------------------------------------------------------------------
class InlineExecutor:
    """The trial runs in the driver's process when the driver waits for it: a serial search."""

    slots = 1

    def __init__(self, runner: TrialRunner):
        self._runner = runner
        self._queue: List[TrialTask] = []

    def submit(self, task: TrialTask) -> None:
        self._queue.append(task)

    def wait(self) -> List[TrialOutcome]:
        task = self._queue.pop(0)
        t0 = time.perf_counter()
        kind, payload = execute(self._runner, task)
        return [_outcome(task, kind, payload, time.perf_counter() - t0)]

    def close(self) -> None:
        self._queue.clear()


def _watch_parent(parent_pid: int) -> None:
    # A driver killed with SIGKILL cannot stop its workers; they notice and leave.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _local_worker_main(conn, setup: TrialSetup, device: str, threads: int, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the driver decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(threads)
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        reply = run_task(setup, task, device)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def visible_gpus() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def place_workers(workers: Optional[int], gpus: List[str], per_gpu: Optional[int]) -> List[str]:
    """The GPU of each local worker: round robin over ``gpus`` (worker i on ``gpus[i mod G]``),
    so the workers spread evenly. ``per_gpu`` K: at most K workers share a GPU, and ``workers``
    None means K on every GPU (K x G workers)."""
    if not gpus:
        raise PipelineError("--device cuda: no visible GPU")
    if per_gpu is not None:
        if workers is None:
            workers = per_gpu * len(gpus)
        elif workers > per_gpu * len(gpus):
            raise PipelineError(
                f"--workers {workers} with --workers-per-gpu {per_gpu}: at most {per_gpu} x "
                f"{len(gpus)} visible GPUs = {per_gpu * len(gpus)} workers; expected --workers "
                f"<= {per_gpu * len(gpus)} (or leave --workers out)"
            )
    if workers is None:
        raise PipelineError("expected --workers or --workers-per-gpu")
    return [gpus[i % len(gpus)] for i in range(workers)]


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "worker process stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (e.g. the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    hint = " (e.g. the out-of-memory killer)" if code == 137 else ""
    return f"worker process exited with code {code}{hint}"


class _Worker:
    def __init__(self, proc, conn, gpu):
        self.proc, self.conn, self.gpu = proc, conn, gpu
        self.task: Optional[TrialTask] = None
        self.started = 0.0
        self.ready = False  # the process got as far as its loop


class LocalExecutor:
    """N worker processes on this machine, one trial at a time each."""

    _env_lock = threading.Lock()

    def __init__(
        self,
        setup: TrialSetup,
        workers: Optional[int],
        device: str,
        log: Callable[[str], None] = print,
        workers_per_gpu: Optional[int] = None,
    ):
        self._setup = setup
        self._mp = mp.get_context("spawn")
        self._device = device
        if device == "cuda":
            gpus = visible_gpus()
            self._gpus: List[Optional[str]] = list(place_workers(workers, gpus, workers_per_gpu))
            workers = len(self._gpus)
            if workers > len(gpus) and workers_per_gpu is None:
                log(f"{workers} workers on {len(gpus)} GPUs: some GPUs run several trials at once")
        else:
            if workers_per_gpu is not None:
                raise PipelineError(f"--workers-per-gpu needs --device cuda, got {device!r}")
            if workers is None:
                raise PipelineError("expected --workers")
            self._gpus = [None] * workers
        self.slots = workers
        ncpu = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        self._threads = max(1, ncpu // workers)
        self._workers: List[Optional[_Worker]] = [None] * workers
        self._closed = False
        try:
            for i in range(workers):
                self._workers[i] = self._start(i)
        except BaseException:
            self.close()
            raise

    def _start(self, slot: int) -> _Worker:
        gpu = self._gpus[slot]
        parent, child = self._mp.Pipe(duplex=True)
        # Not daemonic: a worker may start DataLoader worker processes of its own (streamed
        # folder data, autokd.data.stream), which a daemonic process may not. The driver
        # stops every worker in close() (run_search calls it in a finally), and a worker whose
        # driver died leaves by itself (_watch_parent).
        proc = self._mp.Process(
            target=_local_worker_main,
            name=f"autokd-trial-worker-{slot}",
            args=(child, self._setup, self._device, self._threads, os.getpid()),
            daemon=False,
        )
        # A spawned child takes the environment of the moment it starts: pin its GPU there, so
        # that it never initialises CUDA on the other GPUs.
        # OpenMP pools size themselves when the process starts, so the worker's share of the
        # cores goes there too (unless the user set it).
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(self._threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with self._env_lock:
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                proc.start()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        child.close()
        return _Worker(proc, parent, gpu)

    def submit(self, task: TrialTask) -> None:
        i = next((i for i, w in enumerate(self._workers) if w is None or w.task is None), None)
        if i is None:
            raise RuntimeError("LocalExecutor.submit: every worker is busy")
        w = self._workers[i]
        if w is None or not w.proc.is_alive():  # died between trials, or after a failed attempt
            if w is not None:
                self._stop(w, grace=0.0)
            w = self._workers[i] = self._start(i)
        w.task, w.started = task, time.perf_counter()
        try:
            w.conn.send(task)
        except (BrokenPipeError, OSError):
            pass  # the death is seen in wait()

    def wait(self) -> List[TrialOutcome]:
        busy = [w for w in self._workers if w is not None and w.task is not None]
        if not busy:
            raise RuntimeError("LocalExecutor.wait: no trial in flight")
        handles = {}
        for w in busy:
            handles[w.conn] = w
            handles[w.proc.sentinel] = w
        ready = wait_connections(list(handles))
        outcomes, seen = [], set()
        for h in ready:
            w = handles[h]
            if id(w) in seen:
                continue
            seen.add(id(w))
            task, elapsed = w.task, time.perf_counter() - w.started
            reply = None
            try:
                while reply is None and w.conn.poll():
                    msg = w.conn.recv()
                    if msg[0] == "ready":
                        w.ready = True
                    else:
                        reply = msg
            except (EOFError, OSError):
                reply = None
            if reply is None:
                if w.proc.is_alive() and w.proc.sentinel not in ready:
                    continue  # only its start-up message
                w.proc.join(timeout=5)
                if not w.ready:
                    raise PipelineError(
                        "a trial worker process could not start "
                        f"({_describe_exit(w.proc.exitcode)}); its error is printed above. "
                        "Worker processes are spawned and import the main module: a script "
                        "that runs a search with several local workers must guard its entry "
                        'point with `if __name__ == "__main__":`'
                    )
                where = f"GPU {w.gpu}, " if w.gpu is not None else ""
                why = f"{_describe_exit(w.proc.exitcode)} ({where}pid {w.proc.pid})"
                i = self._workers.index(w)
                self._stop(w, grace=0.0)
                self._workers[i] = None  # restarted on the next submit
                outcomes.append(TrialOutcome(task, None, why, elapsed))
                continue
            w.task = None
            kind, payload = reply
            outcomes.append(_outcome(task, kind, payload, elapsed))
        return outcomes

    @staticmethod
    def _stop(w: _Worker, grace: float) -> None:
        if w.proc.is_alive() and grace > 0:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=grace)
        if w.proc.is_alive():
            w.proc.terminate()
            w.proc.join(timeout=5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)
        w.conn.close()

    def close(self) -> None:
        """Stop every worker: idle ones are asked to leave, busy ones are terminated."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            if w is not None and w.task is None and w.proc.is_alive():
                try:
                    w.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for i, w in enumerate(self._workers):
            if w is not None:
                self._stop(w, grace=5.0 if w.task is None else 0.0)
                self._workers[i] = None


def _ray_trial(setup: TrialSetup, task: TrialTask, device: str, threads: int):
    """Body of a Ray task: the same worker code as a local worker process."""
    torch.set_num_threads(threads)
    return run_task(setup, task, device)


class RayExecutor:
    """One Ray task per trial (1 GPU, or ``cpus_per_trial`` CPUs), at most ``workers`` in flight."""

    def __init__(
        self,
        setup: TrialSetup,
        workers: Optional[int],
        device: str,
        address: Optional[str] = None,
        cpus_per_trial: int = 1,
        log: Callable[[str], None] = print,
        workers_per_gpu: Optional[int] = None,
    ):
        ray = self._ray = require_ray()
        self.slots = workers
        self._owns = False
        if ray.is_initialized():
            if address is not None:
                log(f"ray: already connected in this process; --ray-address {address} not used")
        else:
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address}" if address else "Ray"
                raise PipelineError(f"could not start or reach {where}: {e}") from e
            self._owns = True
        try:
            resources = ray.cluster_resources()
            gpu = device.startswith("cuda")
            if gpu and resources.get("GPU", 0) < 1:
                if self._owns and address is None and not os.environ.get("RAY_ADDRESS"):
                    raise PipelineError(
                        f"--executor ray --device {device}: this machine has no GPU for Ray "
                        f"(resources: {_fmt_resources(resources)})"
                    )
                # An autoscaling cluster may add GPU nodes once tasks ask for them.
                log(
                    f"ray: the cluster has no GPU now ({_fmt_resources(resources)}); "
                    "trials wait for one"
                )
            if not gpu and resources.get("CPU", 0) < cpus_per_trial:
                raise PipelineError(
                    f"the Ray cluster has fewer than {cpus_per_trial} CPUs "
                    f"(resources: {_fmt_resources(resources)})"
                )
            if workers_per_gpu is not None and not gpu:
                raise PipelineError(f"--workers-per-gpu needs --device cuda, got {device!r}")
            if workers is None:  # K tasks on every GPU the cluster has now
                if workers_per_gpu is None:
                    raise PipelineError("expected --workers")
                self.slots = max(1, int(resources.get("GPU", 0)) * workers_per_gpu)
            # Ray pins each task to its GPU through CUDA_VISIBLE_DEVICES: "cuda" is that GPU (a
            # fractional GPU is shared by the tasks Ray packs on it).
            self._device = "cuda" if gpu else device
            opts = (
                {"num_gpus": 1.0 / (workers_per_gpu or 1)} if gpu else {"num_cpus": cpus_per_trial}
            )
            # Retries are the driver's (one, then the trial is recorded as failed), not Ray's.
            self._remote = ray.remote(max_retries=0, **opts)(_ray_trial)
            self._threads = 1 if gpu else cpus_per_trial
            self._setup_ref = ray.put(setup)  # shipped once, not with every task
            share = f"1/{workers_per_gpu} GPU" if workers_per_gpu else "1 GPU"
            log(
                f"ray: {_fmt_resources(resources)}; up to {self.slots} trials at once, each on "
                f"{share if gpu else f'{cpus_per_trial} CPU'}"
            )
        except BaseException:
            self.close()
            raise
        self._pending: Dict[Any, Tuple[TrialTask, float]] = {}

    def submit(self, task: TrialTask) -> None:
        ref = self._remote.remote(self._setup_ref, task, self._device, self._threads)
        self._pending[ref] = (task, time.perf_counter())

    def wait(self) -> List[TrialOutcome]:
        ray = self._ray
        if not self._pending:
            raise RuntimeError("RayExecutor.wait: no trial in flight")
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        outcomes = []
        for ref in ready:
            task, t0 = self._pending.pop(ref)
            elapsed = time.perf_counter() - t0
            try:
                kind, payload = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # an exception our wrapper did not catch
                raise TrialError(f"trial {task.index}: {e}") from e
            except ray.exceptions.RayError as e:  # the worker or its node died, Ray's OOM killer
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                why = f"Ray task failed: {type(e).__name__}: {first}"
                outcomes.append(TrialOutcome(task, None, why, elapsed))
                continue
            outcomes.append(_outcome(task, kind, payload, elapsed))
        return outcomes

    def close(self) -> None:
        """Stop: a cluster this search started is shut down (its tasks with it); on a cluster
        it joined, the tasks still running are cancelled."""
        ray = self._ray
        pending = list(getattr(self, "_pending", {}))
        if self._owns:
            if ray.is_initialized():
                ray.shutdown()
            self._owns = False
        else:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort while stopping
                    pass
        if hasattr(self, "_pending"):
            self._pending.clear()


def _fmt_resources(res: Dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in res] or sorted(res)[:3]
    return ", ".join(f"{res[k]:g} {k}" for k in keys)
