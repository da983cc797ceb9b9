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
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import yaml

from autokd.fsutil import atomic_write_text
from autokd.search.journal import Trial

TOP_K = 10


def best_trial(trials: Sequence[Trial]) -> Optional[Trial]:
    ok = [t for t in trials if t.status == "ok"]
    return max(ok, key=lambda t: t.reward) if ok else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_rewards(trials: Sequence[Trial]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in level_names if any(lv in t.design for t in trials)]
    cols = 3
    rows = max(1, (len(levels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(levels):]:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

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
        children = sorted((p for p in counts if len(p) == len(prefix) + 1 and p[: len(prefix)] == prefix),
                          key=lambda p: p[-1][1])
        x = x0
        for child in children:
            n, m, _ = counts[child]
            w = width * n / counts[prefix][0]
            ax.add_patch(plt.Rectangle((x, -d - 1), w, 0.95, color=cmap(norm(m)), ec="white"))
            if w > 0.055:
                ax.text(x + w / 2, -d - 0.52, f"{child[-1][1]}\n{n}", ha="center", va="center", fontsize=6.5,
                        color="white" if norm(m) < 0.6 else "black")
            draw(child, x, w, d + 1)
            x += w

    draw((), 0.0, 1.0, 0)
    shown = sorted({p[len(p) - 1][0] for p in counts if 0 < len(p) <= depth},
                   key=lambda name: list(level_names).index(name))
    ax.set_yticks([-i - 0.52 for i in range(len(shown))])
    ax.set_yticklabels(shown, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-depth - 0.1, 0.05)
    ax.set_xticks([])
    ax.set_title(f"search tree, first {depth} levels: width = visits ({total} trials), colour = mean reward", fontsize=9)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01)
    return _png(fig)


def _table(trials: Sequence[Trial], level_names: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["#", "reward", "val acc", "CKA", "s", *level_names])
    rows = []
    for t in trials:
        cells = [str(t.id), f"{t.reward:.4f}", f"{t.metrics.get('val_acc', float('nan')):.3f}",
                 f"{t.metrics.get('val_cka', float('nan')):.3f}", f"{t.seconds:.1f}"]
        cells += [t.design.get(n, "") for n in level_names]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_report(trials: Sequence[Trial], level_names: Sequence[str], title: str, config: Optional[dict] = None) -> str:
    ranked = sorted(trials, key=lambda t: -t.reward)
    diverged = sum(t.status != "ok" for t in trials)
    secs = sum(t.seconds for t in trials)
    best = best_trial(trials)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#eee}img{max-width:100%}code,pre{background:#f5f5f5}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(trials)} trials ({diverged} diverged), {secs:.0f} s of proxy training in all, "
        f"{secs / max(len(trials), 1):.1f} s per trial.</p>",
    ]
    if best is not None:
        parts.append(f"<h2>Best design (reward {best.reward:.4f})</h2><pre>{html.escape(yaml.safe_dump(best.design, sort_keys=False))}</pre>")
    if trials:
        parts += [
            "<h2>Reward per trial</h2>", f"<img src='data:image/png;base64,{plot_rewards(trials)}'>",
            "<h2>Reward by option at each level</h2>",
            f"<img src='data:image/png;base64,{plot_by_option(trials, level_names)}'>",
            "<h2>Search tree</h2>", f"<img src='data:image/png;base64,{plot_tree(trials, level_names)}'>",
            f"<h2>Top {min(TOP_K, len(trials))} designs</h2>", _table(ranked[:TOP_K], level_names),
        ]
    if config:
        parts.append(f"<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def write_outputs(out: str, trials: Sequence[Trial], space, engine=None, log: Callable[[str], None] = print,
                  config: Optional[dict] = None) -> dict:
    """best.yaml, top.yaml and report.html in ``out``; prints the summary table.

    Each file is written whole or not at all (temporary file, fsync, rename): a full disk or a
    kill leaves the previous version in place, never a truncated one."""
    level_names = [lv.name for lv in space.levels]
    result: dict = {"best": best_trial(trials)}
    best = result["best"]
    if best is not None:
        spec = space.spec_from_design(best.design)
        path = os.path.join(out, "best.yaml")
        atomic_write_text(path, f"# best design of {len(trials)} trials; reward {best.reward:.6f} "
                                f"(trial {best.id})\n" + spec.to_yaml())
        result["best_spec"] = path
    ranked = sorted((t for t in trials if t.status == "ok"), key=lambda t: -t.reward)[:TOP_K]
    atomic_write_text(os.path.join(out, "top.yaml"), yaml.safe_dump(
        [{"trial": t.id, "reward": round(t.reward, 6), "metrics": t.metrics, "design": t.design} for t in ranked],
        sort_keys=False,
    ))
    report = os.path.join(out, "report.html")
    atomic_write_text(report, render_report(
        trials, level_names, f"autokd search: {os.path.basename(os.path.abspath(out))}", config))
    result["report"] = report
    if ranked:
        log(summary_table(ranked[:5], level_names))
    return result


def summary_table(trials: Sequence[Trial], level_names: Sequence[str]) -> str:
    lines = [f"{'trial':>5}  {'reward':>8}  {'acc':>6}  {'CKA':>6}  design"]
    for t in trials:
        design = ", ".join(f"{k}={t.design[k]}" for k in level_names if k in t.design)
        lines.append(f"{t.id:>5}  {t.reward:>8.4f}  {t.metrics.get('val_acc', float('nan')):>6.3f}  "
                     f"{t.metrics.get('val_cka', float('nan')):>6.3f}  {design}")
    return "\n".join(lines)
