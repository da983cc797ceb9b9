"""Full-training test accuracy of the classic distillers on the embedded default, from the CLI.

    python benchmarks/studies/distillers_table.py                     # all classics, seeds 0 1 2
    python benchmarks/studies/distillers_table.py --specs none kd dkd --seeds 0 1 2 3 4
    python benchmarks/studies/distillers_table.py --student vit_compact --out runs/vit-table

Each cell is ``autokd-cli distill --spec NAME --seed S --out OUT`` run as a user runs it (the
command's defaults: the data set's full schedule, online teacher, dense student), so the table is
what the CLI gives. One teacher serves every run: the first command trains it into
``OUT/teacher.pt`` (seed 0) and the others load it. ``--seed`` also picks the validation split
carved from the training data, so seeds differ in initialisation, batch order and the 90% of the
training split that is trained on; the test split is fixed. Finished runs (``result.json``) are
read back, not repeated: a table can be extended seed by seed. Prints a Markdown table and
writes it to ``--table`` (default ``OUT/distillers.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from autokd.space import list_distillers


def run_one(args, spec: str, seed: int) -> float:
    # a spec file (e.g. a search's best.yaml) is named by its file name
    name = os.path.splitext(os.path.basename(spec))[0]
    run_dir = os.path.join(args.out, f"distill-{name}-{seed}")
    result = os.path.join(run_dir, "result.json")
    if not os.path.exists(result):
        cmd = [
            sys.executable,
            "-m",
            "autokd.cli",
            "distill",
            "--spec",
            spec,
            "--seed",
            str(seed),
            "--out",
            args.out,
            "--run-dir",
            run_dir,
            "--quiet",
            *args.extra,
        ]
        if args.student:
            cmd += ["--student", args.student]
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    with open(result) as f:
        return float(json.load(f)["test_accuracy"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--specs",
        nargs="+",
        default=None,
        help="classic names or spec files [default: none and every classic]",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--student", default=None, help="default: the data set's default student")
    p.add_argument("--out", default="runs/distillers")
    p.add_argument("--table", default=None)
    p.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        help="after --: more options for every distill command (e.g. -- --epochs 30)",
    )
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    specs = args.specs or ["none"] + [n for n in list_distillers() if n != "none"]
    rows = {name: [run_one(args, name, s) for s in args.seeds] for name in specs}
    base = statistics.mean(rows["none"]) if "none" in rows else None
    extra = " ".join(args.extra)
    student = f" --student {args.student}" if args.student else ""
    lines = [
        "| distiller | test accuracy, mean +- std | vs none | per seed |",
        "|---|---|---|---|",
    ]
    for name, accs in sorted(rows.items(), key=lambda kv: -statistics.mean(kv[1])):
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = f"{100 * (mean - base):+.2f}" if base is not None and name != "none" else ""
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
        lines.append(f"| {name} | {100 * mean:.2f} +- {100 * std:.2f} | {delta} | {per_seed} |")
    cmd = f"autokd-cli distill --spec NAME --seed S --out {args.out}{student}" + (
        f" {extra}" if extra else ""
    )
    head = f"Seeds {args.seeds}; each cell: `{cmd}`; accuracy in %, std over seeds (sample std)."
    text = "\n".join([head, "", *lines])
    table = args.table or os.path.join(args.out, "distillers.md")
    os.makedirs(os.path.dirname(os.path.abspath(table)), exist_ok=True)
    with open(table, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
