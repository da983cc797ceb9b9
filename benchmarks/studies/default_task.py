"""What a default search is worth on the embedded default task, through the CLI as a user runs it.

    python benchmarks/studies/default_task.py            # writes benchmarks/results/default_task.md

1. ``autokd-cli compare`` of the classic distillers and the student alone (3 seeds): does
   distillation matter on this task, and which classic is best?
2. For each strategy (MCTS, the default; random search; Optuna's TPE): a default
   ``autokd-cli search --strategy S`` (same budget, same proxy, same selection stage), then
   ``autokd-cli compare`` of its best.yaml against KD (3 seeds): each strategy's hand-back,
   fully trained.
Every run shares one teacher (trained by the first command). Runs live in --out; a rerun
reuses what is there (searches resume, compare runs are read back).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CLASSICS = ["none", "kd", "dkd", "dist", "ls_kd", "fitnet", "at", "cwd", "mgd"]
STRATEGIES = ["mcts", "random", "tpe"]


def cli(*args):
    cmd = [sys.executable, "-m", "autokd.cli", *args, "--quiet"]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def rows(out):
    with open(os.path.join(out, "compare.json")) as f:
        return json.load(f)["rows"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/study-default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--result",
        default=os.path.join(os.path.dirname(__file__), "..", "results", "default_task.md"),
    )
    args = ap.parse_args(argv)
    base = os.path.join(args.out, "classics")
    cli("compare", "--out", base, "--specs", ",".join(CLASSICS), "--seeds", str(args.seeds))
    teacher = os.path.join(base, "teacher.pt")
    lines = [
        "Embedded default task (`autokd-cli` defaults: digits, digits_teacher on the whole "
        "training split, digits_student on a fixed 20% of it; 60 epochs, batch 32, SGD lr 0.1). "
        f"Test accuracy of full trainings, seeds 0-{args.seeds - 1}. "
        "`python benchmarks/studies/default_task.py`",
        "",
        "Classic distillers (`autokd-cli compare --specs " + ",".join(CLASSICS) + "`):",
        "",
        "| spec | test accuracy | per seed |",
        "|---|---|---|",
    ]
    for r in rows(base):
        lines.append(
            f"| {r['spec']} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
            + ", ".join(f"{100 * a:.2f}" for a in r["accuracies"])
            + " |"
        )
    lines += [
        "",
        "Default searches (`autokd-cli search --strategy S`, then `autokd-cli compare "
        "--specs best.yaml,kd`):",
        "",
        "| strategy | handed back (best.yaml) | its test accuracy | KD | cost (full trainings: "
        "work; time) |",
        "|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        out = os.path.join(args.out, f"search-{strategy}")
        log = cli("search", "--out", out, "--teacher-checkpoint", teacher, "--strategy", strategy)
        chosen = next(
            (ln.split("chosen: ", 1)[1] for ln in log.splitlines() if "chosen: " in ln), "?"
        )
        cost = next(
            (ln.split("cost: ", 1)[1] for ln in log.splitlines() if ln.startswith("cost: ")), "?"
        )
        with open(os.path.join(out, "search.log"), "w") as f:
            f.write(log)
        cli(
            "compare",
            "--out",
            out,
            "--teacher-checkpoint",
            teacher,
            "--specs",
            f"{os.path.join(out, 'best.yaml')},kd",
            "--seeds",
            str(args.seeds),
        )
        best, kd = rows(out)
        lines.append(
            f"| {strategy} | {chosen} | {100 * best['mean']:.2f} +- {100 * best['std']:.2f} | "
            f"{100 * kd['mean']:.2f} +- {100 * kd['std']:.2f} | {cost} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.result:
        with open(args.result, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
