"""Does the proxy rank designs as full training does, among the good ones too?

    python benchmarks/studies/proxy_fidelity.py                 # the embedded default task
    python benchmarks/studies/proxy_fidelity.py --designs 6     # fewer searched designs

1. A default search (MCTS, 100 trials, the paper's proxy settings) gives the designs: its 6
   best by estimate and 6 spread evenly over the rest of its ranking; the classic distillers
   (kd, dkd, dist, ls_kd) and the student alone join them.
2. Each is fully trained (``autokd-cli distill``'s training: whole schedule, dense, online
   teacher) with seeds 0, 1, 2: mean test accuracy.
3. Each proxy setting (data subset, fraction of the epochs, sparsity; 2 seeds each) scores
   every design by several held-out metrics: the paper's reward 1 - (CE + 1 - CKA), held-out
   accuracy, held-out CE alone.
4. Rank correlation of each (setting, metric) with full-training accuracy: Kendall tau and
   Spearman rho over all designs, Kendall tau among the proxy's top 6, and the cost of the
   setting in full trainings of work.

Results are cached in --out (every run is kept in results.json: a rerun only runs what is
missing); the Markdown table goes to benchmarks/results/proxy_fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from scipy.stats import kendalltau, spearmanr

from autokd.search.driver import SearchConfig, run_search
from autokd.search.estimate import rank
from autokd.search.journal import Journal
from autokd.search.selection import SelectionConfig
from autokd.search.trial import TrialRunner, TrialTask, prepare
from autokd.space import load_space
from autokd.space.spec import DistillerSpec, load_distiller
from autokd.train.final import run_distill
from autokd.train.loop import TrainConfig

CLASSICS = ["kd", "dkd", "dist", "ls_kd", "none"]
# (label, subset, stop_fraction, sparsity): the paper's accelerations and cheaper/dearer ones
SETTINGS = [
    ("paper: 20% data, 20% epochs, 50% sparse", 0.2, 0.2, 0.5),
    ("20% data, 20% epochs, dense", 0.2, 0.2, 0.0),
    ("all data, 5% epochs, dense", 1.0, 0.05, 0.0),
    ("all data, 10% epochs, dense", 1.0, 0.1, 0.0),
    ("all data, 10% epochs, 50% sparse", 1.0, 0.1, 0.5),
    ("all data, 20% epochs, dense", 1.0, 0.2, 0.0),
    ("all data, 33% epochs, dense", 1.0, 0.33, 0.0),
    ("all data, 50% epochs, dense", 1.0, 0.5, 0.0),
]
METRICS = [("reward", True), ("val_acc", True), ("val_ce", False)]


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/study-proxy")
    ap.add_argument("--designs", type=int, default=6, help="top designs (and as many spread ones)")
    ap.add_argument("--seeds", type=int, default=3, help="full-training seeds per design")
    ap.add_argument("--proxy-seeds", type=int, default=2)
    ap.add_argument(
        "--result",
        default=os.path.join(os.path.dirname(__file__), "..", "results", "proxy_fidelity.md"),
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    cache_path = os.path.join(args.out, "results.json")
    cache = _load(cache_path)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    # 1. the designs
    search_out = os.path.join(args.out, "search")
    cfg = SearchConfig(out=search_out, budget=100, selection=SelectionConfig(fidelity=0.0))
    if (
        not os.path.exists(os.path.join(search_out, "journal.sqlite"))
        or len(Journal(os.path.join(search_out, "journal.sqlite"))) < cfg.budget
    ):
        run_search(cfg, log=lambda _m: None, progress=False)
    space = load_space(cfg.space)
    with Journal(os.path.join(search_out, "journal.sqlite")) as j:
        trials = j.trials()
    ranked = rank(space, [(t.design, t.reward) for t in trials if t.status == "ok"])
    top = ranked[: args.designs]
    rest = ranked[args.designs :]
    step = max(1, len(rest) // args.designs)
    spread = rest[::step][: args.designs]
    specs = {}
    for i, e in enumerate(top):
        specs[f"top {i + 1}"] = space.spec_from_design(e.design).to_dict()
    for i, e in enumerate(spread):
        specs[f"rank {args.designs + 1 + i * step}"] = space.spec_from_design(e.design).to_dict()
    for name in CLASSICS:
        spec = DistillerSpec.from_dict({"name": name}) if name == "none" else load_distiller(name)
        specs[name] = spec.to_dict()

    prepared = prepare(cfg, log=lambda _m: None, progress=False)
    data, teacher = prepared.data, prepared.teacher
    base = cfg.proxy

    # 2. full training
    full = cache.setdefault("full", {})
    for label, spec in specs.items():
        for seed in range(args.seeds):
            key = f"{json.dumps(spec, sort_keys=True)}|{seed}"
            if key in full:
                continue
            tc = TrainConfig(
                epochs=base.epochs,
                batch_size=base.batch_size,
                lr=base.lr,
                data_fraction=base.data_fraction,
                offline=False,
                seed=seed,
            )
            res = run_distill(
                DistillerSpec.from_dict(spec),
                data,
                teacher,
                cfg.student,
                prepared.student_taps,
                tc,
                os.path.join(args.out, "full", f"{abs(hash(key))}"),
                augment=prepared.augment,
                log=lambda _m: None,
                progress=False,
            )
            full[key] = res.test_accuracy
            log(f"full {label} seed {seed}: {res.test_accuracy:.4f}")
            _save(cache_path, cache)

    def full_acc(spec):
        return statistics.mean(
            full[f"{json.dumps(spec, sort_keys=True)}|{s}"] for s in range(args.seeds)
        )

    # 3. proxies
    runner = TrialRunner(cfg, prepared)
    proxy = cache.setdefault("proxy", {})
    for name, subset, stop, sparsity in SETTINGS:
        for label, spec in specs.items():
            for seed in range(args.proxy_seeds):
                key = f"{name}|{json.dumps(spec, sort_keys=True)}|{seed}"
                if key in proxy:
                    continue
                over = {"subset": subset, "stop_fraction": stop, "sparsity": sparsity}
                res = runner.run(TrialTask(0, None, None, spec, 1000 + seed, proxy=over))
                m = res["metrics"]
                proxy[key] = {
                    "reward": res["reward"] if res["reward"] is not None else -10.0,
                    "val_acc": m.get("val_acc", 0.0),
                    "val_ce": m.get("val_ce", 10.0),
                    "seconds": res["seconds"],
                }
            _save(cache_path, cache)
        log(f"proxy setting done: {name}")

    # 4. correlations
    labels = list(specs)
    truth = [full_acc(specs[k]) for k in labels]
    lines = [
        f"Proxy fidelity on the embedded default task ({data.summary()}; student {cfg.student} "
        f"on {base.data_fraction:g} of the training split; teacher {cfg.teacher}, test accuracy "
        f"{teacher.test_accuracy:.4f}). Designs: the {args.designs} best of a default 100-trial "
        f"search by estimate, {len(spread)} spread over the rest of its ranking, and "
        f"{', '.join(CLASSICS)}; truth: mean test accuracy of {args.seeds} full trainings "
        f"(seeds 0-{args.seeds - 1}). Proxy scores: mean of {args.proxy_seeds} seeds. "
        f"`python benchmarks/studies/proxy_fidelity.py`",
        "",
        "| proxy setting | work per trial (full trainings) | metric | Kendall tau | Spearman rho | "
        "Kendall tau, proxy's top 6 | s per trial |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, subset, stop, sparsity in SETTINGS:
        secs = statistics.mean(
            proxy[f"{name}|{json.dumps(specs[k], sort_keys=True)}|{s}"]["seconds"]
            for k in labels
            for s in range(args.proxy_seeds)
        )
        work = subset * max(1, round(base.epochs * stop + 0.4999)) / base.epochs
        for metric, higher in METRICS:
            score = [
                statistics.mean(
                    proxy[f"{name}|{json.dumps(specs[k], sort_keys=True)}|{s}"][metric]
                    for s in range(args.proxy_seeds)
                )
                * (1 if higher else -1)
                for k in labels
            ]
            tau = kendalltau(score, truth)[0]
            rho = spearmanr(score, truth)[0]
            order = sorted(range(len(labels)), key=lambda i: -score[i])[:6]
            tau6 = kendalltau([score[i] for i in order], [truth[i] for i in order])[0]
            lines.append(
                f"| {name} | {work:.3f} | {metric} | {tau:.2f} | {rho:.2f} | {tau6:.2f} | "
                f"{secs:.2f} |"
            )
    lines += ["", "| design | full-training test accuracy (mean of seeds) |", "|---|---|"]
    for k, t in sorted(zip(labels, truth), key=lambda kt: -kt[1]):
        lines.append(f"| {k} | {100 * t:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.result:
        with open(args.result, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
