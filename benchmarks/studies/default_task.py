"""What a default search is worth on the embedded digits task, through the CLI as a user runs it.

    python benchmarks/studies/default_task.py            # writes benchmarks/results/default_task.md
    python benchmarks/studies/default_task.py --student vit_compact --search-seeds 3 \\
        --result vit_task.md --out runs/study-vit       # another student, 3 MCTS searches

1. ``autokd-cli compare`` of the classic distillers and the student alone (3 seeds): does
   distillation matter on this task, and which classic is best?
2. For each strategy (MCTS, the default; random search; Optuna's TPE): a default
   ``autokd-cli search --strategy S`` (same budget, same proxy, same selection stage), then
   ``autokd-cli compare`` of its best.yaml against the best classic of step 1 (3 seeds): each
   strategy's hand-back, fully trained. These share the teacher of step 1.
3. With ``--search-seeds N``: N - 1 more default MCTS searches, ``--seed 1``, ``--seed 2``, ...,
   each a whole run as a user would start it in a new folder (its own teacher, trained with
   that seed, its own split of the held-out data), then ``compare`` of its best.yaml against
   the best classic and the student alone in that folder (seeds s, s+1, s+2).
Runs live in --out; a rerun reuses what is there (searches resume, compare runs are read back).
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


def acc(row):
    return f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f}"


def search(out, common, *extra):
    """A default search in ``out``; (what the selection stage chose, the cost line)."""
    log = cli("search", "--out", out, *common, *extra)
    with open(os.path.join(out, "search.log"), "w") as f:
        f.write(log)

    def line(key):
        return next((ln.split(key, 1)[1] for ln in log.splitlines() if key in ln), "?")

    return line("chosen: "), line("cost: ")


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/study-default")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per compared spec")
    ap.add_argument("--student", default=None, help="default: the data set's (digits_student)")
    ap.add_argument("--search-seeds", type=int, default=1, help="MCTS searches, --seed 0..N-1")
    ap.add_argument(
        "--result",
        default=os.path.join(os.path.dirname(__file__), "..", "results", "default_task.md"),
    )
    args = ap.parse_args(argv)
    student = ["--student", args.student] if args.student else []
    seeds = ["--seeds", str(args.seeds)]
    base = os.path.join(args.out, "classics")
    cli("compare", "--out", base, "--specs", ",".join(CLASSICS), *seeds, *student)
    teacher = os.path.join(base, "teacher.pt")
    classics = rows(base)
    best_classic = max((r for r in classics if r["spec"] != "none"), key=lambda r: r["mean"])
    bc = best_classic["spec"]
    who = args.student or "digits_student"
    lines = [
        f"Embedded digits task, student `{who}` (`autokd-cli` defaults otherwise: "
        "digits_teacher on the whole training split, the student on a fixed 20% of it; 60 "
        "epochs, batch 32; SGD lr 0.1 for CNNs, AdamW lr 1e-3 with warm-up for ViTs). "
        f"Test accuracy of full trainings, seeds 0-{args.seeds - 1}. "
        "`python benchmarks/studies/default_task.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        + "`",
        "",
        "Classic distillers (`autokd-cli compare --specs " + ",".join(CLASSICS) + "`):",
        "",
        "| spec | test accuracy | per seed |",
        "|---|---|---|",
    ]
    for r in classics:
        lines.append(
            f"| {r['spec']} | {acc(r)} | "
            + ", ".join(f"{100 * a:.2f}" for a in r["accuracies"])
            + " |"
        )
    lines += [
        "",
        f"Default searches (`autokd-cli search --strategy S`, then `autokd-cli compare "
        f"--specs best.yaml,{bc}`; {bc} is the best classic above), one teacher for all:",
        "",
        f"| strategy | handed back (best.yaml) | its test accuracy | {bc} | cost (full "
        "trainings: work; time) |",
        "|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        out = os.path.join(args.out, f"search-{strategy}")
        common = [*student, "--teacher-checkpoint", teacher]
        chosen, cost = search(out, common, "--strategy", strategy)
        specs = f"{os.path.join(out, 'best.yaml')},{bc}"
        cli("compare", "--out", out, "--specs", specs, *seeds, *common)
        best, classic = rows(out)
        lines.append(f"| {strategy} | {chosen} | {acc(best)} | {acc(classic)} | {cost} |")
    if args.search_seeds > 1:
        lines += [
            "",
            "Replicates: default MCTS searches with `--seed S` in a new folder each (own "
            f"teacher, own held-out split), then `compare --specs best.yaml,{bc},none` "
            "there (seeds S, S+1, S+2):",
            "",
            f"| --seed | handed back | its test accuracy | {bc} | student alone | cost |",
            "|---|---|---|---|---|---|",
        ]
        for s in range(1, args.search_seeds):
            out = os.path.join(args.out, f"mcts-seed{s}")
            chosen, cost = search(out, student, "--seed", str(s))
            specs = f"{os.path.join(out, 'best.yaml')},{bc},none"
            cli("compare", "--out", out, "--specs", specs, *seeds, *student, "--seed", str(s))
            best, classic, alone = rows(out)
            lines.append(
                f"| {s} | {chosen} | {acc(best)} | {acc(classic)} | {acc(alone)} | {cost} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.result:
        with open(args.result, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
