"""Studies on the embedded digits data behind the figures in README.md and RESULTS.md.

    python benchmarks/studies/digits_study.py accuracy      # student alone, KD, classics, searched
    python benchmarks/studies/digits_study.py search        # MCTS vs random search, same budget
    python benchmarks/studies/digits_study.py acceleration  # seconds per candidate + proxy fidelity

Each prints a Markdown table (and writes it to runs/study/<name>.md). Everything runs on the
CPU; absolute seconds depend on the machine, ratios much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time

import torch

from autokd.data import load_data
from autokd.pipeline import (
    default_training,
    load_or_train_teacher,
    make_augment,
    open_or_build_store,
    resolve_taps,
)
from autokd.search.driver import SearchConfig, run_search
from autokd.search.trial import Prepared, TrialRunner, TrialTask
from autokd.space import load_space
from autokd.train.final import resolve_spec, run_distill
from autokd.train.loop import TrainConfig

OUT = "runs/study"
TEACHER, STUDENT = "digits_teacher", "digits_student"
CLASSICS = ["kd", "fitnet", "at", "sp", "cwd", "ickd", "dist", "mgd", "ls_kd", "pkd"]
SCHED = default_training("digits")  # batch size and learning rate of every run here


def _setup(views=4):
    data = load_data("digits", val_fraction=0.1, seed=0)
    teacher = load_or_train_teacher(
        data, TEACHER, None, os.path.join(OUT, "teacher.pt"), epochs=30, log=lambda m: None
    )
    augment = make_augment(data, 0)
    store = open_or_build_store(
        os.path.join(OUT, "teacher_features.akds"),
        teacher,
        data,
        augment,
        views,
        "fp16",
        log=lambda m: None,
    )
    return data, teacher, augment, store


def _task(spec, seed, proxy: TrainConfig) -> TrialTask:
    """A one-off trial of ``spec`` with ``proxy``'s settings (the search's proxy overridden)."""
    fields = {
        k: v for k, v in proxy.to_dict().items() if k not in ("seed", "subset_seed", "device")
    }
    return TrialTask(0, None, None, spec.to_dict(), seed, proxy=fields)


def _emit(name, text):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def accuracy(args):
    data, teacher, augment, store = _setup()
    taps = resolve_taps(STUDENT, None)
    searched = args.spec or os.path.join(OUT, "search-mcts-0", "best.yaml")
    if not os.path.exists(searched):
        run_search(
            SearchConfig(
                out=os.path.dirname(searched),
                budget=args.budget,
                teacher_checkpoint=teacher.checkpoint,
            ),
            log=lambda m: None,
            progress=False,
        )
    rows = {}
    for name in ["none", *CLASSICS, "searched"]:
        spec = resolve_spec(searched if name == "searched" else name)
        accs = []
        for seed in args.seeds:
            cfg = TrainConfig(
                epochs=args.epochs,
                batch_size=SCHED["batch_size"],
                lr=SCHED["lr"],
                seed=seed,
                offline=False,
            )
            res = run_distill(
                spec,
                data,
                teacher,
                STUDENT,
                taps,
                cfg,
                os.path.join(OUT, f"distill-{name}-{seed}"),
                augment=augment,
                log=lambda m: None,
                progress=False,
            )
            accs.append(res.test_accuracy)
        rows[name] = accs
        print(name, accs, file=sys.stderr)
    best_classic = max(CLASSICS, key=lambda n: statistics.mean(rows[n]))
    lines = [
        f"Test accuracy on digits, {STUDENT} <- {TEACHER} (teacher {teacher.test_accuracy:.4f}), "
        f"{args.epochs} epochs, seeds {args.seeds}:",
        "",
        "| distiller | mean | std | runs |",
        "|---|---|---|---|",
    ]
    for name, accs in rows.items():
        mark = " (best classic)" if name == best_classic else ""
        lines.append(
            f"| {name}{mark} | {statistics.mean(accs):.4f} | {statistics.pstdev(accs):.4f} | "
            f"{', '.join(f'{a:.4f}' for a in accs)} |"
        )
    _emit("accuracy", "\n".join(lines))


def search(args):
    data, teacher, _, _ = _setup()
    lines = [
        f"MCTS vs random search on digits, budget {args.budget}, seeds {args.seeds} "
        "(best proxy reward found, and the trial at which the best was first reached):",
        "",
        "| strategy | seed | best reward | trials to best | seconds |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for strategy in ("mcts", "random"):
        for seed in args.seeds:
            out = os.path.join(OUT, f"search-{strategy}-{seed}")
            res = run_search(
                SearchConfig(
                    out=out,
                    budget=args.budget,
                    strategy=strategy,
                    seed=seed,
                    teacher_checkpoint=teacher.checkpoint,
                ),
                log=lambda m: None,
                progress=False,
            )
            best = max(t.reward for t in res.trials)
            first = next(i for i, t in enumerate(res.trials, 1) if t.reward == best)
            summary.setdefault(strategy, []).append(best)
            lines.append(f"| {strategy} | {seed} | {best:.4f} | {first} | {res.seconds:.0f} |")
    lines.append("")
    for strategy, bests in summary.items():
        lines.append(
            f"- {strategy}: mean best reward {statistics.mean(bests):.4f} "
            f"(std {statistics.pstdev(bests):.4f})"
        )
    _emit("search", "\n".join(lines))


def acceleration(args):
    data, teacher, augment, store = _setup()
    space = load_space("autokd")
    cfg = SearchConfig(teacher_checkpoint=teacher.checkpoint)
    runner = TrialRunner(cfg, Prepared(data, teacher, store, augment, resolve_taps(STUDENT, None)))
    spec = resolve_spec("kd")
    base = TrainConfig(
        epochs=args.epochs,
        batch_size=SCHED["batch_size"],
        lr=SCHED["lr"],
        subset=1.0,
        stop_fraction=1.0,
        sparsity=0.0,
        offline=False,
    )
    steps = [
        ("baseline: online teacher, full data, all epochs, dense", base),
        ("+ offline teacher features", dataclasses.replace(base, offline=True)),
        ("+ 50% sparse student", dataclasses.replace(base, offline=True, sparsity=0.5)),
        ("+ 20% data subset", dataclasses.replace(base, offline=True, sparsity=0.5, subset=0.2)),
        (
            "+ 20% epochs (early stop)",
            dataclasses.replace(base, offline=True, sparsity=0.5, subset=0.2, stop_fraction=0.2),
        ),
    ]
    lines = [
        f"Seconds per candidate on digits ({STUDENT} <- {TEACHER}, KD spec, "
        f"{args.epochs}-epoch schedule, median of {args.repeats} seeds; "
        "held-out accuracy and reward of the proxy-trained student):",
        "",
        "| setting | s / candidate | speed-up | held-out accuracy | reward |",
        "|---|---|---|---|---|",
    ]
    first = None
    for label, proxy in steps:
        times, accs, rewards = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = runner.run(_task(spec, r, proxy))
            times.append(time.perf_counter() - t0)
            accs.append(res["metrics"].get("val_acc", float("nan")))
            rewards.append(res["reward"] if res["reward"] is not None else float("nan"))
        med = statistics.median(times)
        first = first or med
        lines.append(
            f"| {label} | {med:.2f} | {first / med:.1f}x | {statistics.median(accs):.3f} | "
            f"{statistics.median(rewards):.3f} |"
        )
    # Fidelity: proxy reward (all accelerations) against full-training test accuracy.
    rng = random.Random(1234)
    designs = []
    while len(designs) < args.designs:
        d = space.sample(rng)
        if d not in designs:
            designs.append(d)
    proxy_all = steps[-1][1]
    pairs = []
    taps = resolve_taps(STUDENT, None)
    for i, d in enumerate(designs):
        spec = space.spec_from_design(d)
        res = runner.run(_task(spec, 0, proxy_all))
        reward = res["reward"] if res["reward"] is not None else float("-inf")
        full = run_distill(
            spec,
            data,
            teacher,
            STUDENT,
            taps,
            TrainConfig(
                epochs=args.epochs, batch_size=SCHED["batch_size"], lr=SCHED["lr"], offline=False
            ),
            os.path.join(OUT, f"fidelity-{i}"),
            augment=augment,
            log=lambda m: None,
            progress=False,
        )
        pairs.append((reward, full.test_accuracy))
        print(i, d, reward, full.test_accuracy, file=sys.stderr)
    from scipy.stats import spearmanr

    rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    lines += [
        "",
        f"Proxy fidelity over {len(pairs)} random designs: Spearman rank correlation between proxy "
        f"reward and full-training test accuracy = {rho:.3f} (p = {p:.3f}).",
        "",
        "| design | proxy reward | full-training test accuracy |",
        "|---|---|---|",
    ]
    for d, (r, a) in zip(designs, pairs):
        lines.append(f"| {', '.join(f'{k}={v}' for k, v in d.items())} | {r:.4f} | {a:.4f} |")
    _emit("acceleration", "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("study", choices=["accuracy", "search", "acceleration"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=SCHED["epochs"])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--designs", type=int, default=8)
    ap.add_argument(
        "--spec", default=None, help="searched spec for `accuracy` [default: a search run here]"
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    {"accuracy": accuracy, "search": search, "acceleration": acceleration}[args.study](args)


if __name__ == "__main__":
    main()
