"""MCTS engine: ask+tell iterations per second on the Auto-KD space (10,692 designs, tau and
logit weight depending on the logit distance) with a trivial reward, against the pure-Python
reference MCTS (tests/engine/mcts_reference.py) in the same run; and ask(k) from several threads.

Each round starts from a fresh engine and runs ITERS iterations of `ask(1)` + `tell`, so both
providers do the same work on trees of the same size. Targets: >= 200,000 it/s for the engine
single-threaded and >= 50x the reference.

    python benchmarks/bench_mcts.py                       # markdown table (medians, ratios)
    pytest benchmarks/bench_mcts.py --benchmark-only      # pytest-benchmark
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "engine"))
from mcts_reference import ReferenceMCTS  # noqa: E402
from test_mcts import AUTOKD_LEVELS  # noqa: E402

from autokd.search.mcts import MCTS  # noqa: E402

ITERS = 2000
PROVIDERS = {"engine": MCTS, "reference": ReferenceMCTS}


def trivial_reward(design):
    return 1.0 if design["logit_distance"] == "kl" else 0.5


def ask_tell(factory, iters=ITERS, **kw):
    eng = factory(AUTOKD_LEVELS, seed=0, **kw)
    ask, tell = eng.ask, eng.tell
    for _ in range(iters):
        for tid, design in ask(1):
            tell(tid, trivial_reward(design))
    return eng


def threaded(threads, per_thread_batches, k=16):
    """`threads` workers share one engine; each asks k designs at a time and tells them all."""
    eng = MCTS(AUTOKD_LEVELS, seed=0)

    def work():
        for _ in range(per_thread_batches):
            for tid, design in eng.ask(k):
                eng.tell(tid, trivial_reward(design))

    ws = [threading.Thread(target=work) for _ in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    assert eng.num_told == threads * per_thread_batches * k and eng.num_pending == 0
    return eng


@pytest.mark.parametrize("on_repeat", ["reuse", "average"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_ask_tell(benchmark, provider, on_repeat):
    benchmark.group = f"mcts ask+tell x{ITERS} autokd space, on_repeat={on_repeat}"
    benchmark.extra_info["iterations_per_round"] = ITERS
    rounds = 15 if provider == "engine" else 3
    benchmark.pedantic(ask_tell, args=(PROVIDERS[provider],), kwargs={"on_repeat": on_repeat},
                       rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("threads", [1, 4])
def test_ask_k_threads(benchmark, threads):
    total_batches = 128  # the same 2,048 designs in all, split over the threads
    benchmark.group = "mcts ask(16)+tell, 2048 designs, threads"
    benchmark.pedantic(threaded, args=(threads, total_batches // threads), rounds=10, warmup_rounds=1, iterations=1)


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


def main():
    print(f"ask(1)+tell, {ITERS} iterations from a fresh engine, Auto-KD space, trivial reward")
    print()
    print("| on_repeat | engine it/s (wall) | reference it/s (wall) | ratio (wall) "
          "| engine it/s (CPU) | reference it/s (CPU) | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for on_repeat in ("reuse", "average"):
        ew, ec = _median_seconds(lambda: ask_tell(MCTS, on_repeat=on_repeat), 21)
        rw, rc = _median_seconds(lambda: ask_tell(ReferenceMCTS, on_repeat=on_repeat), 5)
        print(f"| {on_repeat} | {ITERS / ew:,.0f} | {ITERS / rw:,.0f} | {rw / ew:.1f}x "
              f"| {ITERS / ec:,.0f} | {ITERS / rc:,.0f} | {rc / ec:.1f}x |")
    print()
    print("ask(16)+tell of 2,048 designs on one engine, split over threads")
    print()
    print("| threads | designs/s (wall) |")
    print("|---|---|")
    for threads in (1, 2, 4):
        w, _ = _median_seconds(lambda: threaded(threads, 128 // threads), 11)
        print(f"| {threads} | {2048 / w:,.0f} |")


if __name__ == "__main__":
    main()
