"""``autokd-cli compare``: full training of several specs with several seeds, on the user's
data and models, ending in a table. This is how a user learns what a search was worth on
their own problem: the searched design against the classic distillers and the student alone,
each trained the way ``autokd-cli distill`` trains, with the spread over seeds.

Every (spec, seed) is one ``distill`` run in ``<out>/compare/<spec>-<hash>-<seed>/`` (the hash
of the spec's content), resumable like any distill run (an interrupted compare loses at most
the epoch that was running; finished runs are read back, never rerun). The table goes to
``<out>/compare.md`` and ``<out>/compare.json`` and into the search's report.html.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from typing import Callable, List, Sequence

from autokd.errors import PipelineError
from autokd.fsutil import atomic_write_text
from autokd.space.spec import DistillerSpec
from autokd.train.final import resolve_spec, run_distill

Log = Callable[[str], None]


@dataclass
class CompareRow:
    spec: str  # as named by the user (best.yaml, kd, ...)
    label: str  # the spec's own name
    accuracies: List[float]  # test accuracy per seed, in seed order
    seeds: List[int]
    digest: str = ""  # of the spec's content: two names of one spec share it

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def spec_label(name: str) -> str:
    """A short label for a spec argument: a file's name without .yaml, a classic's name."""
    base = os.path.basename(name)
    return base[:-5] if base.endswith(".yaml") else base


def run_compare(
    specs: Sequence[str],
    seeds: Sequence[int],
    data,
    teacher,
    student: str,
    student_taps,
    train_config: Callable[[int], object],
    out: str,
    store=None,
    augment=None,
    log: Log = print,
    progress: bool = False,
) -> List[CompareRow]:
    """Train every spec with every seed (``train_config(seed)`` gives each run's TrainConfig)."""
    if not specs:
        raise PipelineError("compare: expected at least one spec")
    if not seeds:
        raise PipelineError("compare: expected at least one seed")
    labels = [spec_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise PipelineError(f"compare: two specs share a name ({labels}); rename one file")
    resolved = [resolve_spec(s) for s in specs]  # every name checked before any training
    rows = []
    total = len(specs) * len(seeds)
    done = 0
    for name, label, spec in zip(specs, labels, resolved):
        # the folder names the spec's content too: a search rerun that rewrites best.yaml gets
        # new runs, and the runs of the earlier best.yaml stay as they were
        tag = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        accs = []
        for seed in seeds:
            done += 1
            run_dir = os.path.join(out, "compare", f"{label}-{tag}-{seed}")
            log(f"compare [{done}/{total}]: {label}, seed {seed}")
            res = run_distill(
                spec,
                data,
                teacher,
                student,
                student_taps,
                train_config(seed),
                run_dir,
                store=store,
                augment=augment,
                log=lambda _m: None,
                progress=progress,
            )
            accs.append(res.test_accuracy)
        rows.append(CompareRow(name, spec.name or label, accs, list(seeds), tag))
    write_table(rows, out)
    return rows


def table_text(rows: Sequence[CompareRow]) -> str:
    lines = ["| spec | test accuracy (mean +- std) | per seed |", "|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.spec} | {100 * r.mean:.2f} +- {100 * r.std:.2f}% | "
            + ", ".join(f"{100 * a:.2f}" for a in r.accuracies)
            + " |"
        )
    best = max(rows, key=lambda r: r.mean)
    lines += ["", f"Best: {best.spec} ({100 * best.mean:.2f}%); seeds {rows[0].seeds}."]
    worth = worth_lines(rows)
    return "\n".join(lines + ([""] + worth if worth else []))


def worth_lines(rows: Sequence[CompareRow]) -> List[str]:
    """What the first spec (after a search: its hand-back, best.yaml) was worth against each
    other spec: the gain in mean test accuracy, the gain per seed (every spec trains with the
    same seeds, so these pair up), and whether the gain is beyond the larger of the two
    standard deviations over seeds, the bar below which a difference is seed noise."""
    if len(rows) < 2:
        return []
    first = rows[0]
    lines = [f"{first.spec} against each (points of test accuracy, same seeds):"]
    for r in rows[1:]:
        if first.digest and r.digest == first.digest:
            lines.append(f"- {r.spec}: the same spec")
            continue
        gain = 100 * (first.mean - r.mean)
        per = ", ".join(f"{100 * (a - b):+.2f}" for a, b in zip(first.accuracies, r.accuracies))
        spread = 100 * max(first.std, r.std)
        if len(first.accuracies) < 2:
            verdict = "one seed: no spread to judge it by"
        elif abs(gain) > spread:
            verdict = f"{'above' if gain > 0 else 'below'} it by more than one std ({spread:.2f})"
        else:
            verdict = f"within one std ({spread:.2f}): seed noise"
        lines.append(f"- {r.spec}: {gain:+.2f} (per seed {per}); {verdict}")
    return lines


def write_table(rows: Sequence[CompareRow], out: str) -> None:
    atomic_write_text(os.path.join(out, "compare.md"), table_text(rows) + "\n")
    atomic_write_text(
        os.path.join(out, "compare.json"),
        json.dumps(
            {
                "rows": [
                    {
                        "spec": r.spec,
                        "label": r.label,
                        "mean": r.mean,
                        "std": r.std,
                        "accuracies": r.accuracies,
                        "seeds": r.seeds,
                        "digest": r.digest,
                    }
                    for r in rows
                ],
                "worth": worth_lines(rows),
            },
            indent=2,
        ),
    )


def default_specs(out: str) -> List[str]:
    """best.yaml of the run folder (when a search wrote one), then the classics a user would
    try by hand, then the student alone."""
    best = os.path.join(out, "best.yaml")
    classics = ["kd", "dkd", "dist", "none"]
    if os.path.exists(best):
        # a selection stage that chose a classic wrote it as best.yaml: compare it once
        chosen = DistillerSpec.from_yaml(best).name
        return [best] + [c for c in classics if c != chosen]
    return classics
