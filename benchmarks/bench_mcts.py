"""MCTS engine: iterations per second on the Auto-KD space (10,692 designs, tau and logit weight
depending on the logit distance) with a trivial reward, against the pure-Python reference MCTS
(tests/engine/mcts_reference.py) in the same run; and ask(k) from several threads.

Every round starts from a fresh engine and runs ITERS iterations (ask, reward, tell), so all
configurations do the same work on trees of the same size:

- serial: `ask(1)` -> [(id, {level: option})], `tell(id, reward)`; reference and engine.
- batched k: `ask_many(k)` -> (ids, int32 option rows), the same trivial reward computed on the
  rows with numpy, `tell_many(ids, rewards)`; k designs are pending at once (the parallel
  search that k workers would run, with virtual loss), so for k > 1 the proposals are not
  those of the serial run. Its reference is ReferenceMCTS on the same schedule (ask(k), then
  tell all k), which proposes the same designs.
- threads: T threads share one engine, each asking k designs at a time and telling them all.

Targets (issue 3): >= 200,000 it/s single-threaded and >= 50x the reference.

    python benchmarks/bench_mcts.py                       # markdown tables (medians, ratios)
    pytest benchmarks/bench_mcts.py --benchmark-only      # pytest-benchmark
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "engine"))
from mcts_reference import ReferenceMCTS  # noqa: E402
from test_mcts import AUTOKD_LEVELS  # noqa: E402

from autokd.search.mcts import MCTS  # noqa: E402

ITERS = 2048
BATCHES = (16, 256)
PROVIDERS = {"engine": MCTS, "reference": ReferenceMCTS}
LOGIT_DISTANCE = [lv["name"] for lv in AUTOKD_LEVELS].index("logit_distance")
# trivial_reward by option index of the logit distance (a table: one numpy call per batch)
REWARD_BY_LOGIT_DISTANCE = np.array(
    [1.0 if o == "kl" else 0.5 for o in AUTOKD_LEVELS[LOGIT_DISTANCE]["options"]]
)


def trivial_reward(design):
    return 1.0 if design["logit_distance"] == "kl" else 0.5


def trivial_rewards(rows):
    """trivial_reward of each row of option indices."""
    return REWARD_BY_LOGIT_DISTANCE.take(rows[:, LOGIT_DISTANCE])


def serial(factory, iters=ITERS, **kw):
    eng = factory(AUTOKD_LEVELS, seed=0, **kw)
    ask, tell = eng.ask, eng.tell
    for _ in range(iters):
        for tid, design in ask(1):
            tell(tid, trivial_reward(design))
    return eng


def batched(k, iters=ITERS, **kw):
    eng = MCTS(AUTOKD_LEVELS, seed=0, **kw)
    ask_many, tell_many = eng.ask_many, eng.tell_many
    for _ in range(iters // k):
        ids, rows = ask_many(k)
        tell_many(ids, trivial_rewards(rows))
    return eng


def reference_batched(k, iters=ITERS, **kw):
    """The reference on batched()'s schedule: the same proposals, dicts instead of rows."""
    ref = ReferenceMCTS(AUTOKD_LEVELS, seed=0, **kw)
    for _ in range(iters // k):
        for tid, design in ref.ask(k):
            ref.tell(tid, trivial_reward(design))
    return ref


def threaded(threads, k, api="many", total=ITERS):
    """`threads` workers share one engine; each asks k designs at a time and tells them all."""
    eng = MCTS(AUTOKD_LEVELS, seed=0)
    per_thread = total // (threads * k)

    def work_many():
        for _ in range(per_thread):
            ids, rows = eng.ask_many(k)
            eng.tell_many(ids, trivial_rewards(rows))

    def work_dicts():
        for _ in range(per_thread):
            for tid, design in eng.ask(k):
                eng.tell(tid, trivial_reward(design))

    ws = [
        threading.Thread(target=work_many if api == "many" else work_dicts) for _ in range(threads)
    ]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    assert eng.num_told == threads * per_thread * k and eng.num_pending == 0
    return eng


def test_batched_reward_is_the_trivial_reward():
    eng = MCTS(AUTOKD_LEVELS, seed=0)
    _, rows = eng.ask_many(300)
    assert trivial_rewards(rows).tolist() == [trivial_reward(d) for d in eng.decode(rows)]


# -- pytest-benchmark -------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["thompson", "uct"])
@pytest.mark.parametrize("on_repeat", ["reuse", "average"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_serial(benchmark, provider, on_repeat, selection):
    benchmark.group = f"mcts ask(1)+tell x{ITERS}, on_repeat={on_repeat}, selection={selection}"
    benchmark.extra_info["iterations_per_round"] = ITERS
    rounds = 15 if provider == "engine" else 3
    benchmark.pedantic(
        serial,
        args=(PROVIDERS[provider],),
        kwargs={"on_repeat": on_repeat, "selection": selection},
        rounds=rounds,
        warmup_rounds=1,
        iterations=1,
    )


@pytest.mark.parametrize("k", BATCHES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_batched(benchmark, provider, k):
    benchmark.group = f"mcts batches of {k} x{ITERS // k}"
    benchmark.extra_info["iterations_per_round"] = ITERS
    fn, rounds = (batched, 15) if provider == "engine" else (reference_batched, 3)
    benchmark.pedantic(fn, args=(k,), rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("threads", [1, 4])
def test_threads(benchmark, threads):
    benchmark.group = f"mcts ask_many(16)+tell_many, {ITERS} designs, threads"
    benchmark.pedantic(threaded, args=(threads, 16), rounds=10, warmup_rounds=1, iterations=1)


# -- markdown tables --------------------------------------------------------------------------
def _median_seconds(fn, rounds):
    """Median wall and CPU (process) seconds of fn over rounds, after one warm-up call. CPU time
    is the steadier figure on a shared machine; threads add their CPU time together."""
    fn()
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _row(name, eng, ref):
    (ew, ec), (rw, rc) = eng, ref
    it = ITERS / ew, ITERS / ec
    ratio = rw / ew, rc / ec
    verdict = ["yes" if it[i] >= 200_000 and ratio[i] >= 50 else "no" for i in (0, 1)]
    return (
        f"| {name} | {it[0]:,.0f} | {it[1]:,.0f} | {ITERS / rw:,.0f} | {ITERS / rc:,.0f} "
        f"| {ratio[0]:.1f}x | {ratio[1]:.1f}x | {verdict[0]} / {verdict[1]} |"
    )


def main():
    print(
        f"{ITERS} iterations per round from a fresh engine, Auto-KD space, trivial reward; medians"
    )
    print()
    print(
        "| configuration | engine it/s (wall) | engine it/s (CPU) | reference it/s (wall) "
        "| reference it/s (CPU) | ratio (wall) | ratio (CPU) "
        "| >= 200k it/s and >= 50x (wall / CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for on_repeat in ("reuse", "average"):
        ref = _median_seconds(lambda: serial(ReferenceMCTS, on_repeat=on_repeat), 5)
        eng = _median_seconds(lambda: serial(MCTS, on_repeat=on_repeat), 21)
        print(_row(f"serial ask(1)+tell, {on_repeat}", eng, ref))
    for k in BATCHES:
        ref = _median_seconds(lambda: reference_batched(k), 5)
        eng = _median_seconds(lambda: batched(k), 21)
        print(_row(f"batched ask_many({k})+tell_many, reuse", eng, ref))
    print()
    print(
        f"{ITERS} designs on one engine, split over threads (each: ask k, tell k); "
        "designs/s, medians"
    )
    print()
    print("| API | threads | designs/s (wall) | designs/s (CPU) |")
    print("|---|---|---|---|")
    for api, k in (("many", 16), ("dicts", 16)):
        name = f"ask_many({k})+tell_many" if api == "many" else f"ask({k})+tell"
        for threads in (1, 2, 4):
            w, c = _median_seconds(lambda: threaded(threads, k, api), 11)
            print(f"| {name} | {threads} | {ITERS / w:,.0f} | {ITERS / c:,.0f} |")


if __name__ == "__main__":
    main()
