"""Trials per hour of a search with 1 and more workers (local processes, Ray tasks).

    python benchmarks/bench_scaleout.py [--settings local:1,local:1@1,local:2,ray:2] [--budget 8]
                                        [--repeats 3] [--device cpu] [--dir /tmp/...]

A setting is ``executor:workers``, optionally ``@T``: the driver process runs with T torch
threads (``local:1@1``: the serial search on one thread, as each of 2 CPU workers on 2 cores
gets one; a local worker process always gets cores / workers threads).

Every run is a fresh search (new journal) of ``--budget`` trials on the embedded digits data
with the default proxy (the paper's accelerations on the digits schedule), sharing one teacher
and feature store prepared beforehand. Two figures per run:

- end to end: budget / wall seconds of ``run_search`` (worker start-up, Ray start-up when the
  search starts the cluster, and the report included: what a user waits for);
- steady: trials per hour once every worker has finished its first trial,
  ``(budget - w) / (t_last - t_w)`` from the journal's finishing times (start-up excluded);
- s/trial: the median time a trial took inside its worker (the journal's ``seconds``).

Prints a markdown table of medians over ``--repeats`` runs and the ratios to ``local:1`` (the
serial search) measured in the same invocation.
"""

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time

import torch

from autokd.search.driver import SearchConfig, run_search


def _run(base, out, executor, workers, threads, budget, device):
    os.makedirs(out)
    for name in ("teacher.pt", "teacher_features.akds"):
        shutil.copy(os.path.join(base, name), os.path.join(out, name))
    cfg = SearchConfig(out=out, budget=budget, executor=executor, workers=workers)
    cfg.proxy.device = device
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        run_search(cfg, log=lambda _m: None, progress=False)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    db = sqlite3.connect(os.path.join(out, "journal.sqlite"))
    created = sorted(r[0] for r in db.execute("SELECT created FROM trials"))
    trial_seconds = statistics.median(r[0] for r in db.execute("SELECT seconds FROM trials"))
    db.close()
    w = min(workers, budget - 1)
    steady = (
        (budget - w) / max(created[-1] - created[w - 1], 1e-9) * 3600
        if budget > w
        else float("nan")
    )
    return budget / wall * 3600, steady, wall, trial_seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="local:1,local:1@1,local:2,ray:2")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench_scaleout_", dir=args.dir)
    base = os.path.join(root, "base")
    cfg = SearchConfig(out=base, budget=0)
    cfg.proxy.device = args.device
    run_search(cfg, log=lambda _m: None, progress=False)  # teacher and feature store, once
    settings = []
    for item in args.settings.split(","):
        executor, rest = item.split(":")
        workers, _, threads = rest.partition("@")
        settings.append((executor, int(workers), int(threads) if threads else 0))
    results = {s: [] for s in settings}
    # Interleaved repeats: a change in the machine's load hits every setting alike.
    for rep in range(args.repeats):
        for executor, workers, threads in settings:
            out = os.path.join(root, f"{executor}{workers}t{threads}-{rep}")
            results[(executor, workers, threads)].append(
                _run(base, out, executor, workers, threads, args.budget, args.device)
            )
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"budget {args.budget} trials per run, {args.repeats} runs per setting, "
        f"device {args.device}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads by default"
    )
    print(
        "| executor | workers | driver threads | trials/h end to end | trials/h steady "
        "| wall s/run | s/trial in its worker | end-to-end ratio | steady ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ref = settings[0]
    ref_e2e = statistics.median(r[0] for r in results[ref])
    ref_steady = statistics.median(r[1] for r in results[ref])
    for s in settings:
        e2e = statistics.median(r[0] for r in results[s])
        steady = statistics.median(r[1] for r in results[s])
        wall = statistics.median(r[2] for r in results[s])
        per_trial = statistics.median(r[3] for r in results[s])
        print(
            f"| {s[0]} | {s[1]} | {s[2] or 'default'} | {e2e:.0f} | {steady:.0f} | {wall:.1f} "
            f"| {per_trial:.2f} | {e2e / ref_e2e:.2f} | {steady / ref_steady:.2f} |"
        )


if __name__ == "__main__":
    main()
