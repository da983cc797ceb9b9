"""Test accuracy and training seconds of the embedded default pair trained alone.

    python benchmarks/studies/digits_baselines.py [--seeds 3] [--threads 1]

Prints a markdown table: model, epochs, parameters, test accuracy (mean and std over seeds),
wall and CPU seconds per training run (CPU time is the steadier figure on a shared machine).
Plain supervised training with autokd.train.teacher.train_classifier.
"""

import argparse
import statistics
import time

import torch

from autokd.data import load_data
from autokd.models import build_model, count_parameters
from autokd.train.teacher import evaluate, train_classifier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--runs", default="digits_teacher=10,digits_teacher=20,digits_student=20,digits_student=40"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("digits")
    print(f"data: {data.summary()}")
    print("| model | epochs | params | test acc % (mean ± std) | wall s/run | CPU s/run |")
    print("|---|---|---|---|---|---|")
    for item in args.runs.split(","):
        name, epochs = item.split("=")
        accs, secs, cpu = [], [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model(name, num_classes=data.num_classes, in_channels=data.channels)
            t0, c0 = time.perf_counter(), time.process_time()
            train_classifier(model, data, int(epochs), seed=seed, progress=False)
            secs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            accs.append(evaluate(model, data.test)[0])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"| {name} | {epochs} | {count_parameters(model):,} | "
            f"{100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | "
            f"{statistics.mean(secs):.1f} | {statistics.mean(cpu):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
