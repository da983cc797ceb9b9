"""Cost of one ask+tell through the Python binding, for a given build of autokd._engine.

    python benchmarks/studies/ask_cost.py PATH/_engine.cpython-311-x86_64-linux-gnu.so new uct

Loads the extension from a path (so that two builds, e.g. before and after a binding change,
can be timed on the same machine in turn), asks and tells 2,048 designs of the Auto-KD space
15 times, prints the median microseconds per ask+tell. ``old``: a build whose constructor has
no selection argument (before the Thompson engine). Figures: benchmarks/results/mcts-binding.md.
"""

import importlib.util
import statistics
import sys
import time

so, label, sel = sys.argv[1], sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("_engine", so)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
L = [
    ("global_transform", ["original", "attention", "mask"], []),
    ("intra_spatial", ["original", "multi-scale", "local"], []),
    ("inter_spatial", ["original", "sample-wise", "channel-wise"], []),
    ("feature_distance", ["l2", "kl", "gram_l2"], []),
    ("feature_weight", ["1", "5", "25", "50"], []),
    ("logit_distance", ["none", "kl", "pearson"], []),
    ("temperature", ["1", "2", "4", "8"], [("logit_distance", ["kl", "pearson"])]),
    ("logit_weight", ["0.1", "0.5", "1", "5"], [("logit_distance", ["kl", "pearson"])]),
]


def make():
    if label == "old":
        return m.MCTS(L, 0.7071, 0, True, "reuse", 1000000, 1.0, 100)
    return m.MCTS(L, sel, 4.0, 0.7071, 0, True, "reuse", 1000000, 1.0, 100)


def reward(d):
    return len(d["global_transform"]) * 0.1 + (d["logit_distance"] == "kl")


times = []
for r in range(15):
    e = make()
    ask, tell = e.ask, e.tell
    t0 = time.perf_counter()
    for _ in range(2048):
        for tid, d in ask(1):
            tell(tid, reward(d))
    times.append((time.perf_counter() - t0) / 2048 * 1e6)
print(label, sel, f"{statistics.median(times):.2f} us per ask+tell (median of 15 rounds of 2048)")
