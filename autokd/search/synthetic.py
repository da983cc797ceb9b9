"""Synthetic rewards over a real search space, to measure strategies without training noise.

A problem draws a hidden value per option of every level, ``N(0, 1)``, and a hidden
interaction for every pair of consecutive levels of a design (the levels a design has, in
level order), ``N(0, interaction_sd)``; a design's true value is their sum, and an evaluation
observes it with ``N(0, noise_sd)`` noise. The space is small enough to enumerate, so a
returned design is scored exactly:

    score = (true(returned) - median true value) / (max true value - median true value)

0 is the median design of the space and 1 its optimum. This is how the search-quality
benchmark (benchmarks/studies/search_quality.py) compares MCTS, random search and TPE at
equal budgets.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import numpy as np

from autokd.space.space import SearchSpace


class DesignTable:
    """Every design of ``space`` as rows of option indices ([D, L], -1 where a level is
    absent), for vectorised scoring."""

    def __init__(self, space: SearchSpace):
        self.space = space
        self.names = [lv.name for lv in space.levels]
        self.options = [list(lv.options) for lv in space.levels]
        designs = list(space.designs())
        rows = np.full((len(designs), len(self.names)), -1, dtype=np.int64)
        for i, d in enumerate(designs):
            for j, name in enumerate(self.names):
                if name in d:
                    rows[i, j] = self.options[j].index(d[name])
        self.rows = rows

    def row(self, design: Mapping[str, str]) -> np.ndarray:
        r = np.full(len(self.names), -1, dtype=np.int64)
        for j, name in enumerate(self.names):
            if name in design:
                r[j] = self.options[j].index(design[name])
        return r

    def __len__(self) -> int:
        return self.rows.shape[0]


class SyntheticProblem:
    """One random problem over a DesignTable (see the module docstring)."""

    def __init__(
        self, table: DesignTable, seed: int, interaction_sd: float = 0.5, noise_sd: float = 1.0
    ):
        rng = np.random.default_rng(seed)
        self.table, self.noise_sd = table, noise_sd
        L = len(table.names)
        self.values = [rng.normal(0.0, 1.0, len(o)) for o in table.options]
        # interaction[(a, b)]: [options of a, options of b], for every ordered pair a < b that
        # can be consecutive in some design
        self.interactions: Dict[Tuple[int, int], np.ndarray] = {}
        for a in range(L):
            for b in range(a + 1, L):
                self.interactions[(a, b)] = rng.normal(
                    0.0, interaction_sd, (len(table.options[a]), len(table.options[b]))
                )
        self._noise = np.random.default_rng(seed + 7_777_777)
        true = self.true_values(table.rows)
        self.median, self.optimum = float(np.median(true)), float(true.max())

    def true_values(self, rows: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(rows)
        total = np.zeros(rows.shape[0])
        L = rows.shape[1]
        for j in range(L):
            present = rows[:, j] >= 0
            total[present] += self.values[j][rows[present, j]]
        # consecutive existing levels: rows are grouped by which levels they have (a few
        # patterns per space), and each present level is paired with the next present one
        present = rows >= 0
        patterns, which = np.unique(present, axis=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            sel = np.flatnonzero(which.reshape(-1) == p)
            levels = np.flatnonzero(pattern)
            for a, b in zip(levels[:-1], levels[1:]):
                total[sel] += self.interactions[(int(a), int(b))][rows[sel, a], rows[sel, b]]
        return total

    def true_value(self, design: Mapping[str, str]) -> float:
        return float(self.true_values(self.table.row(design))[0])

    def observe(self, design: Mapping[str, str]) -> float:
        return self.true_value(design) + float(self._noise.normal(0.0, self.noise_sd))

    def score(self, design: Mapping[str, str]) -> float:
        return (self.true_value(design) - self.median) / (self.optimum - self.median)


def best_observed(history: List[Tuple[Dict[str, str], float]]) -> Dict[str, str]:
    """The design of highest mean observed reward (first seen wins ties)."""
    sums: Dict[Tuple, List[float]] = {}
    order = []
    for d, r in history:
        k = tuple(sorted(d.items()))
        if k not in sums:
            sums[k] = [0.0, 0]
            order.append((k, d))
        sums[k][0] += r
        sums[k][1] += 1
    best = max(order, key=lambda kd: sums[kd[0]][0] / sums[kd[0]][1])
    return best[1]
