"""What a search's trials say about each design, beyond its own noisy reward.

A proxy reward is one noisy measurement. Ranking designs by it alone picks the luckiest of a
hundred draws (the winner's curse): on the synthetic benchmark the design of best observed
reward is clearly worse than one chosen with the evidence of every trial. The estimate here
is the same hierarchical shrinkage the MCTS engine's Thompson selection draws from:

    g        mean of all rewards
    q(l, o)  = (S_lo + k g) / (n_lo + k)              option o of level l, shrunk to g
    q(l, o | l', o')                                  the pair with the previous level the
             = (S_p + k q(l, o)) / (n_p + k)          design has, shrunk to the option's q
    prior(d) = g + sum over d's levels of (q(l, o | ...) - g)     an additive model
    est(d)   = (sum of d's rewards + w prior(d)) / (count + w)

with ``k`` = ``prior_strength`` pseudo-observations and ``w`` = ``own_weight``. The search
recommends the design of best estimate among those it evaluated (``rank``), whatever the
strategy that proposed them, so MCTS, random search and TPE are compared under one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

from autokd.space.space import SearchSpace

Design = Dict[str, str]

#: pseudo-observations of the option and pair priors (the synthetic benchmark's best of 1, 2, 4)
PRIOR_STRENGTH = 2.0
#: how many observations the additive prior is worth against a design's own rewards
OWN_WEIGHT = 1.0


@dataclass
class Estimate:
    design: Design
    estimate: float
    mean: float  # of the design's own rewards
    count: int
    prior: float


def _key(design: Mapping[str, str]) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted(design.items()))


class Shrinkage:
    """Option and pair statistics of ``history`` ([(design, reward)]) over ``space``."""

    def __init__(
        self,
        space: SearchSpace,
        history: Sequence[Tuple[Mapping[str, str], float]],
        prior_strength: float = PRIOR_STRENGTH,
    ):
        self.space, self.k = space, prior_strength
        self.names = [lv.name for lv in space.levels]
        self.n = len(history)
        self.g = sum(r for _, r in history) / self.n if self.n else 0.0
        self.opt: Dict[Tuple[str, str], List[float]] = {}
        self.pair: Dict[Tuple[str, str, str, str], List[float]] = {}
        for design, reward in history:
            prev = None
            for name in self.names:
                if name not in design:
                    continue
                o = design[name]
                s = self.opt.setdefault((name, o), [0, 0.0])
                s[0] += 1
                s[1] += reward
                if prev is not None:
                    s = self.pair.setdefault((prev[0], prev[1], name, o), [0, 0.0])
                    s[0] += 1
                    s[1] += reward
                prev = (name, o)

    def option_value(self, name: str, option: str, prev=None) -> float:
        k, g = self.k, self.g
        n, s = self.opt.get((name, option), (0, 0.0))
        q = (s + k * g) / (n + k)
        if prev is not None and (prev[0], prev[1], name, option) in self.pair:
            n, s = self.pair[(prev[0], prev[1], name, option)]
            q = (s + k * q) / (n + k)
        return q

    def prior(self, design: Mapping[str, str]) -> float:
        total, prev = self.g, None
        for name in self.names:
            if name in design:
                total += self.option_value(name, design[name], prev) - self.g
                prev = (name, design[name])
        return total


def rank(
    space: SearchSpace,
    history: Sequence[Tuple[Mapping[str, str], float]],
    prior_strength: float = PRIOR_STRENGTH,
    own_weight: float = OWN_WEIGHT,
) -> List[Estimate]:
    """Every design of ``history``, best estimate first (ties: first seen first)."""
    if not history:
        return []
    model = Shrinkage(space, history, prior_strength)
    own: Dict[Tuple, List] = {}
    for design, reward in history:
        e = own.setdefault(_key(design), [dict(design), 0, 0.0])
        e[1] += 1
        e[2] += reward
    out = []
    for design, count, total in own.values():
        prior = model.prior(design)
        out.append(
            Estimate(
                design,
                (total + own_weight * prior) / (count + own_weight),
                total / count,
                count,
                prior,
            )
        )
    out.sort(key=lambda e: -e.estimate)  # stable: first seen wins ties
    return out
