"""Outputs of a search, made from its journal alone: best spec, top designs, report.html.

Everything here reads the journal's trials, so ``autokd-cli report`` rebuilds the same report
from a finished or interrupted search without the engine. The tree view counts, for every
prefix of a design (in level order), how many trials went through it: exactly the visit counts
MCTS backpropagates.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import yaml

from autokd.fsutil import atomic_write_text
from autokd.search.estimate import rank
from autokd.search.journal import Trial
from autokd.search.selection import METRICS, SelectionResult
from autokd.space.spec import DistillerSpec

TOP_K = 10


def best_trial(trials: Sequence[Trial]) -> Optional[Trial]:
    ok = [t for t in trials if t.status == "ok"]
    return max(ok, key=lambda t: t.reward) if ok else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt  # lazy: loaded by the plot that made fig

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_rewards(trials: Sequence[Trial]) -> str:
    import matplotlib  # lazy: ~0.5 s with pyplot, only the report draws

    matplotlib.use("Agg")  # before pyplot loads: no display needed
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = list(range(1, len(trials) + 1))
    ys = [t.reward for t in trials]
    colors = ["tab:blue" if t.status == "ok" else "tab:red" for t in trials]
    ax.scatter(xs, ys, s=14, c=colors, label="trial reward (red: diverged)")
    best, run = [], float("-inf")
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.step(xs, best, where="post", color="black", lw=1.5, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("reward  1 - (CE + 1 - CKA)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_by_option(trials: Sequence[Trial], level_names: Sequence[str]) -> str:
    import matplotlib  # lazy: ~0.5 s with pyplot, only the report draws

    matplotlib.use("Agg")  # before pyplot loads: no display needed
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    levels = [lv for lv in level_names if any(lv in t.design for t in trials)]
    cols = 3
    rows = max(1, (len(levels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(levels) :]:
        ax.axis("off")
    for ax, level in zip(axes.flat, levels):
        groups: Dict[str, List[float]] = defaultdict(list)
        for t in trials:
            if level in t.design and t.status == "ok":
                groups[t.design[level]].append(t.reward)
        names = sorted(groups)
        if names:
            ax.boxplot([groups[n] for n in names], showfliers=False)
            for i, n in enumerate(names, start=1):
                ax.scatter([i] * len(groups[n]), groups[n], s=8, alpha=0.6, color="tab:blue")
            ax.set_xticks(range(1, len(names) + 1))
            ax.set_xticklabels([f"{n}\n(n={len(groups[n])})" for n in names], fontsize=7)
        ax.set_title(level, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def tree_counts(trials: Sequence[Trial], level_names: Sequence[str]):
    """{prefix tuple: (visits, mean reward, best reward)} over design prefixes in level order."""
    acc: Dict[tuple, List[float]] = defaultdict(list)
    for t in trials:
        prefix: tuple = ()
        acc[prefix].append(t.reward)
        for level in level_names:
            if level in t.design:
                prefix = prefix + ((level, t.design[level]),)
                acc[prefix].append(t.reward)
    return {p: (len(v), sum(v) / len(v), max(v)) for p, v in acc.items()}


def plot_tree(trials: Sequence[Trial], level_names: Sequence[str], depth: int = 4) -> str:
    """Icicle chart of the search tree's top levels: width = visits, colour = mean reward."""
    import matplotlib  # lazy: ~0.5 s with pyplot, only the report draws

    matplotlib.use("Agg")  # before pyplot loads: no display needed
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    from matplotlib import cm, colors  # lazy: as pyplot above

    counts = tree_counts(trials, level_names)
    total = counts.get((), (0, 0.0, 0.0))[0]
    fig, ax = plt.subplots(figsize=(11, 0.9 * depth + 0.8))
    if total == 0:
        ax.text(0.5, 0.5, "no trials yet", ha="center")
        ax.axis("off")
        return _png(fig)
    means = [m for p, (n, m, b) in counts.items() if p]
    norm = colors.Normalize(vmin=min(means, default=0), vmax=max(means, default=1))
    cmap = matplotlib.colormaps["viridis"]

    def draw(prefix, x0, width, d):
        if d >= depth:
            return
        children = sorted(
            (p for p in counts if len(p) == len(prefix) + 1 and p[: len(prefix)] == prefix),
            key=lambda p: p[-1][1],
        )
        x = x0
        for child in children:
            n, m, _ = counts[child]
            w = width * n / counts[prefix][0]
            ax.add_patch(plt.Rectangle((x, -d - 1), w, 0.95, color=cmap(norm(m)), ec="white"))
            if w > 0.055:
                ax.text(
                    x + w / 2,
                    -d - 0.52,
                    f"{child[-1][1]}\n{n}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if norm(m) < 0.6 else "black",
                )
            draw(child, x, w, d + 1)
            x += w

    draw((), 0.0, 1.0, 0)
    shown = sorted(
        {p[len(p) - 1][0] for p in counts if 0 < len(p) <= depth},
        key=lambda name: list(level_names).index(name),
    )
    ax.set_yticks([-i - 0.52 for i in range(len(shown))])
    ax.set_yticklabels(shown, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-depth - 0.1, 0.05)
    ax.set_xticks([])
    ax.set_title(
        f"search tree, first {depth} levels: width = visits ({total} trials), colour = mean reward",
        fontsize=9,
    )
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01)
    return _png(fig)


def _table(
    trials: Sequence[Trial],
    level_names: Sequence[str],
    estimates: Optional[Dict[int, float]] = None,
) -> str:
    head = "".join(
        f"<th>{html.escape(n)}</th>"
        for n in ["#", "estimate", "reward", "val acc", "CKA", "s", *level_names]
    )
    rows = []
    for t in trials:
        est = (estimates or {}).get(t.id)
        cells = [
            str(t.id),
            "" if est is None else f"{est:.4f}",
            f"{t.reward:.4f}",
            f"{t.metrics.get('val_acc', float('nan')):.3f}",
            f"{t.metrics.get('val_cka', float('nan')):.3f}",
            f"{t.seconds:.1f}",
        ]
        cells += [t.design.get(n, "") for n in level_names]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _selection_html(sel) -> str:
    """The selection stage: one table, a row per candidate, a column per round."""
    higher = METRICS[sel.metric][1]
    parts = [
        f"<p>Every candidate trained on the whole training split, dense; score: held-out "
        f"<code>{html.escape(sel.metric)}</code> ({'higher' if higher else 'lower'} is better), "
        f"mean +- std over seeds. The search's finalists halve round by round at twice the "
        f"fidelity; every classic meets the search's best in the last round, where a lead "
        f"inside the seed noise gets more seeds (their count in brackets). {sel.work:.2f} full "
        f"trainings of work, {sel.seconds:.0f} s.</p>",
        f"<p>Chosen: {html.escape(sel.winner.label + sel.verdict())}.</p>",
    ]
    if sel.from_rows:
        parts.append(
            "<p>Rebuilt from the journal's runs: this journal has no record of which runs made "
            "each round (written before autokd kept one), so a round may miss runs reused from "
            "an earlier stage; best.yaml is the choice the stage made when it ran.</p>"
        )
    head = "<th>candidate</th><th>design</th>" + "".join(
        f"<th>round {r.index + 1}<br>{r.fidelity:.3g} of the schedule x {len(r.seeds)}</th>"
        for r in sel.rounds
    )
    rows = []
    for c in sel.candidates:
        cells = [
            html.escape(c.label + (" (chosen)" if c.label == sel.winner.label else "")),
            html.escape(
                ", ".join(f"{k}={v}" for k, v in c.design.items())
                if c.design
                else "classic distiller"
            ),
        ]
        for r in sel.rounds:
            xs = r.scores.get(c.label)
            if not xs:
                cells.append("")
                continue
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.4f} +- {sd:.4f}{r.seeds_note(c.label)}")
        style = " style='font-weight:bold'" if c.label == sel.winner.label else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    parts.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def _compare_html(out: str) -> str:
    """The table of ``autokd-cli compare`` (compare.json in the run folder), when there is one."""
    path = os.path.join(out, "compare.json")
    if not os.path.exists(path):
        return ""
    try:
        with open(path) as f:
            table = json.load(f)
        rows = table["rows"]
        # what the first spec was worth against the others (autokd.compare.worth_lines), as
        # compare wrote it; absent from tables written before it was
        worth = [str(w) for w in table.get("worth", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "<p>compare.json is unreadable; run <code>autokd-cli compare</code> again.</p>"
    head = "<th>spec</th><th>test accuracy (mean +- std)</th><th>seeds</th><th>per seed</th>"
    body = "".join(
        f"<tr><td>{html.escape(r['spec'])}</td>"
        f"<td>{100 * r['mean']:.2f} +- {100 * r['std']:.2f}%</td>"
        f"<td>{len(r['accuracies'])}</td><td>"
        + ", ".join(f"{100 * a:.2f}" for a in r["accuracies"])
        + "</td></tr>"
        for r in rows
    )
    verdict = (
        f"<p>{html.escape(worth[0])}</p><ul>"
        + "".join(f"<li>{html.escape(w[2:])}</li>" for w in worth[1:])
        + "</ul>"
        if worth
        else ""
    )
    return (
        "<h2>Full training: what the search was worth (autokd-cli compare)</h2>"
        f"<table><tr>{head}</tr>{body}</table>{verdict}"
    )


def render_report(
    trials: Sequence[Trial],
    level_names: Sequence[str],
    title: str,
    config: Optional[dict] = None,
    estimates=None,
    selection=None,
    cost=None,
    out: Optional[str] = None,
) -> str:
    est_by_id = {}
    if estimates:
        first_of = {}
        for t in trials:
            first_of.setdefault(tuple(sorted(t.design.items())), t.id)
        for e in estimates:
            est_by_id[first_of[tuple(sorted(e.design.items()))]] = e.estimate
    by_id = {t.id: t for t in trials}
    ranked = [by_id[i] for i in est_by_id] if est_by_id else sorted(trials, key=lambda t: -t.reward)
    diverged = sum(t.status != "ok" for t in trials)
    secs = sum(t.seconds for t in trials)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#eee}img{max-width:100%}code,pre{background:#f5f5f5}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(trials)} trials ({diverged} diverged or failed), {secs:.0f} s of proxy training "
        f"in all, {secs / max(len(trials), 1):.1f} s per trial.</p>",
    ]
    if cost is not None:
        parts.append(f"<p>{html.escape(cost.summary())}.</p>")
    if selection is not None:
        parts += [
            "<h2>Selection stage: the search's best against the classic distillers</h2>",
            f"<p>Handed back (best.yaml): <b>{html.escape(selection.winner.label)}</b>.</p>",
            _selection_html(selection),
        ]
    if out:
        parts.append(_compare_html(out))
    if ranked:
        best = ranked[0]
        parts.append(
            f"<h2>The search's best design (estimate "
            f"{est_by_id.get(best.id, best.reward):.4f}, reward {best.reward:.4f})</h2>"
            f"<pre>{html.escape(yaml.safe_dump(best.design, sort_keys=False))}</pre>"
            "<p>Estimate: the design's reward shrunk toward what every trial says about "
            "its options (autokd.search.estimate), the ranking the search recommends by.</p>"
        )
    if trials:
        parts += [
            "<h2>Reward per trial</h2>",
            f"<img src='data:image/png;base64,{plot_rewards(trials)}'>",
            "<h2>Reward by option at each level</h2>",
            f"<img src='data:image/png;base64,{plot_by_option(trials, level_names)}'>",
            "<h2>Search tree</h2>",
            f"<img src='data:image/png;base64,{plot_tree(trials, level_names)}'>",
            f"<h2>Top {min(TOP_K, len(ranked))} designs</h2>",
            _table(ranked[:TOP_K], level_names, est_by_id),
        ]
    if config:
        parts.append(
            "<h2>Configuration</h2>"
            f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def write_outputs(
    out: str,
    trials: Sequence[Trial],
    space,
    engine=None,
    log: Callable[[str], None] = print,
    config: Optional[dict] = None,
    selection=None,
    evaluations=None,
    cost=None,
    selection_record=None,
) -> dict:
    """best.yaml, top.yaml and report.html in ``out``; prints the summary table.

    best.yaml is the selection stage's choice when there was one (a searched design, or the
    classic distiller the search did not beat), else the search's design of best estimate.
    Each file is written whole or not at all (temporary file, fsync, rename): a full disk or a
    kill leaves the previous version in place, never a truncated one."""
    level_names = [lv.name for lv in space.levels]
    ok = [t for t in trials if t.status == "ok"]
    estimates = rank(space, [(t.design, t.reward) for t in ok])
    if selection is None and evaluations:
        selection = SelectionResult.from_evaluations(evaluations, selection_record)
    first_of: Dict[tuple, Trial] = {}
    for t in ok:
        first_of.setdefault(tuple(sorted(t.design.items())), t)
    result: dict = {
        "best": first_of[tuple(sorted(estimates[0].design.items()))] if estimates else None,
        "selection": selection,
    }
    path = os.path.join(out, "best.yaml")
    if selection is not None and selection.from_rows and os.path.exists(path):
        # a journal from before stages were recorded: its rows may not hold every run the last
        # stage reused, so the rebuilt winner can differ from the one the stage chose; the
        # best.yaml the search wrote is the stage's choice
        log(
            f"{path} kept as the search wrote it: this journal has no record of its selection "
            "stage (written before autokd kept one), so the stage is shown as rebuilt from its "
            "runs"
        )
        result["best_spec"] = path
    elif selection is not None:
        w = selection.winner
        spec = DistillerSpec.from_dict(w.spec)
        classic = selection.best_classic.label if selection.best_classic else "none measured"
        kind = (
            "a classic distiller: the search did not beat it"
            if w.is_anchor
            else "a searched design"
        )
        head = (
            f"# chosen by the selection stage: {w.label} ({kind}); best classic: {classic}; "
            f"held-out {selection.metric}; see report.html\n"
        )
        atomic_write_text(path, head + spec.to_yaml())
        result["best_spec"] = path
    elif estimates:
        best = estimates[0]
        spec = space.spec_from_design(best.design)
        atomic_write_text(
            path,
            f"# best design of {len(trials)} trials by estimate {best.estimate:.6f} "
            f"(mean reward {best.mean:.6f} over {best.count} trial(s))\n" + spec.to_yaml(),
        )
        result["best_spec"] = path
    atomic_write_text(
        os.path.join(out, "top.yaml"),
        yaml.safe_dump(
            [
                {
                    "trial": first_of[tuple(sorted(e.design.items()))].id,
                    "estimate": round(e.estimate, 6),
                    "reward": round(e.mean, 6),
                    "trials": e.count,
                    "metrics": first_of[tuple(sorted(e.design.items()))].metrics,
                    "design": e.design,
                }
                for e in estimates[:TOP_K]
            ],
            sort_keys=False,
        ),
    )
    report = os.path.join(out, "report.html")
    atomic_write_text(
        report,
        render_report(
            trials,
            level_names,
            f"autokd search: {os.path.basename(os.path.abspath(out))}",
            config,
            estimates,
            selection,
            cost,
            out,
        ),
    )
    result["report"] = report
    if estimates:
        log(
            summary_table(
                [first_of[tuple(sorted(e.design.items()))] for e in estimates[:5]], level_names
            )
        )
    if selection is not None:
        log(selection.summary())
    if cost is not None:
        log(cost.summary())
    return result


def summary_table(trials: Sequence[Trial], level_names: Sequence[str]) -> str:
    lines = [f"{'trial':>5}  {'reward':>8}  {'acc':>6}  {'CKA':>6}  design"]
    for t in trials:
        design = ", ".join(f"{k}={t.design[k]}" for k in level_names if k in t.design)
        lines.append(
            f"{t.id:>5}  {t.reward:>8.4f}  {t.metrics.get('val_acc', float('nan')):>6.3f}  "
            f"{t.metrics.get('val_cka', float('nan')):>6.3f}  {design}"
        )
    return "\n".join(lines)
