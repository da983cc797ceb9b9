"""Search quality without training noise: strategies on synthetic rewards over the real space.

    python benchmarks/studies/search_quality.py                       # 24 problems, Auto-KD space
    python benchmarks/studies/search_quality.py --space extended --problems 12

Each problem (autokd.search.synthetic) hides a value per option, N(0, 1), and an interaction
per pair of consecutive levels, N(0, 0.5), observed with N(0, 1) noise. Every strategy runs
through the same ask/tell interface as a real search (autokd.search.strategies), one design at
a time, to the largest budget; its recommendation after the first 50, 100 and 300 evaluations
is scored exactly: (true value - median of the space) / (optimum - median), 0 the median
design, 1 the optimum. Two recommendation rules, each applied to every strategy alike:
``estimate`` (what autokd recommends: autokd.search.estimate.rank, the evaluated design of best
shrunk estimate) and ``best observed`` (the evaluated design of highest mean reward, what
Optuna's ``study.best_trial`` gives). Mean and standard error over problems; problem i uses
seed 1000 + i and every strategy is seeded with i.

Writes the Markdown table to benchmarks/results/search_quality.md (or --out).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Dict, List

from autokd.search.estimate import rank
from autokd.search.strategies import make_strategy
from autokd.search.synthetic import DesignTable, SyntheticProblem, best_observed
from autokd.space import load_space

STRATEGIES = {
    "mcts (thompson, default)": ("mcts", {}),
    "mcts (uct, the paper's)": ("mcts", {"selection": "uct"}),
    "random": ("random", {}),
    "tpe (optuna)": ("tpe", {}),
}
RULES = ("estimate", "best observed")


def run_one(
    space, problem: SyntheticProblem, name: str, options: dict, seed: int, budgets: List[int]
) -> Dict[str, Dict[int, float]]:
    strategy = make_strategy(name, space, seed, **options)
    history = []
    scores: Dict[str, Dict[int, float]] = {r: {} for r in RULES}
    for t in range(1, max(budgets) + 1):
        (p,) = strategy.ask(1)
        reward = problem.observe(p.design)
        strategy.tell(p, reward)
        history.append((p.design, reward))
        if t in budgets:
            scores["estimate"][t] = problem.score(rank(space, history)[0].design)
            scores["best observed"][t] = problem.score(best_observed(history))
    return scores


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--space", default="autokd")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 300])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "..", "results", "search_quality.md"),
    )
    args = ap.parse_args(argv)
    space = load_space(args.space)
    table = DesignTable(space)
    results: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    seconds = {}
    for label in args.strategies:
        name, options = STRATEGIES[label]
        t0 = time.perf_counter()
        per = {r: {b: [] for b in args.budgets} for r in RULES}
        for i in range(args.problems):
            problem = SyntheticProblem(table, 1000 + i)
            one = run_one(space, problem, name, options, i, args.budgets)
            for r in RULES:
                for b in args.budgets:
                    per[r][b].append(one[r][b])
        results[label] = per
        seconds[label] = time.perf_counter() - t0
        print(f"{label}: done in {seconds[label]:.0f} s", file=sys.stderr)

    def cell(xs):
        se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.3f} +- {se:.3f}"

    lines = [
        f"Search quality on synthetic rewards over the `{args.space}` space "
        f"({len(table):,} designs), {args.problems} problems "
        f"(`python benchmarks/studies/search_quality.py --space {args.space} "
        f"--problems {args.problems}`). Normalised true value of the recommended design "
        "(0: median design, 1: optimum), mean +- standard error over problems.",
        "",
    ]
    for r in RULES:
        lines += [
            f"Recommendation rule: **{r}** (applied to every strategy)",
            "",
            "| strategy | " + " | ".join(f"{b} evaluations" for b in args.budgets) + " |",
            "|---|" + "---|" * len(args.budgets),
        ]
        for label in args.strategies:
            lines.append(
                f"| {label} | "
                + " | ".join(cell(results[label][r][b]) for b in args.budgets)
                + " |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        mode = "a" if os.path.exists(args.out) and args.space != "autokd" else "w"
        with open(args.out, mode) as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
