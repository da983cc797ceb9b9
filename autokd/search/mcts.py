"""Monte Carlo tree search over tree-structured design spaces (Python face of the C++ engine).

The algorithm, its formulas and limits are documented in ``csrc/engine/mcts/mcts.h``. Two
selection rules:

- ``selection="thompson"`` (default): Thompson sampling down the tree. Each child's value is
  its own mean reward shrunk toward a prior built from statistics every trial shares: the mean
  reward of its option at that level and of the pair (previous choice, this option), both
  shrunk toward the global mean with ``prior_strength`` pseudo-observations; the walk follows
  the largest posterior draw to a complete design. A trial thus informs every branch that
  makes the same choices, which UCT's per-node statistics cannot (benchmarks/RESULTS.md,
  search quality: better designs than UCT, random search and TPE at equal budgets).
- ``selection="uct"``: the Auto-KD paper's rule, UCT ``Q_i + C * sqrt(2 ln N_parent / N_i)``
  with unvisited children first (picked uniformly at random), expansion of one child block per
  walk, a uniform random rollout to a complete design, and backpropagation of the told reward
  along the walked path. Rewards are min-max normalised by the running range of told rewards;
  pending asks carry a virtual loss.

A space is an ordered list of levels::

    levels = [
        {"name": "logit_distance", "options": ["none", "kl", "pearson"]},
        {"name": "tau", "options": ["1", "2", "4", "8"],
         "requires": {"logit_distance": ["kl", "pearson"]}},
    ]

``requires`` maps earlier levels to allowed options (ANDed); a level whose requirements are not
met is absent from the design. Designs are ``{level: option}`` dicts of strings.

    eng = MCTS(levels, seed=0)
    for trial_id, design in eng.ask(4):     # 4 designs at once, for 4 workers
        eng.tell(trial_id, reward(design))  # any order, from any thread
    eng.best()                              # (design, mean reward) or None

Batches without a Python object per design: ``ask_many(k)`` returns ``(ids, designs)``, an
int64 array ``[k]`` and an int32 array ``[k, levels]`` of option indices (position in the
level's ``options``; -1 where the level is absent), the same proposals as ``ask(k)``;
``tell_many(ids, rewards)`` tells them in order after checking the whole batch (NaN/Inf, an
unknown, already told or repeated id, or mismatched lengths -> ValueError and nothing is told);
``decode(designs)`` turns rows into ``{level: option}`` dicts::

    ids, designs = eng.ask_many(256)                        # [256], [256, levels]
    eng.tell_many(ids, rewards_of(designs))                 # e.g. vectorised over the rows
    eng.decode(designs[0])                                  # {level: option}

``ask_many(1)``/``tell_many`` of one trial is the serial algorithm exactly; with k > 1 the k
pending designs steer each other through the virtual loss, as k workers would.

The engine is thread-safe (one mutex): workers in several threads may ask and tell freely. The
GIL is released in the long calls (``ask(k)``, ``ask_many(k)`` and ``tell_many`` of 8 or more,
``serialize``, ``deserialize``, ``from_history``, ``tree``); ``ask(1)`` and ``tell`` take about
a microsecond and keep it, because releasing it would cost as much.

Reproducibility: the engine draws from its own splitmix64 stream, so the same seed and the same
sequence of calls give the same proposals; ``tests/engine/mcts_reference.py`` is the pure-Python
specification it is tested against, proposal for proposal.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

from autokd import _engine

__all__ = ["MCTS", "DEFAULT_EXPLORATION", "DEFAULT_PRIOR_STRENGTH"]

#: C in the UCB formula; 1/sqrt(2) is the UCT constant for rewards in [0, 1], which the
#: min-max normalisation provides.
DEFAULT_EXPLORATION = 1.0 / math.sqrt(2.0)
#: k of Thompson selection: how many observations a node's shared-statistics prior is worth.
DEFAULT_PRIOR_STRENGTH = 4.0

Design = Dict[str, str]
_LEVEL_KEYS = ("name", "options", "requires")


def _parse_levels(levels: Any) -> list:
    """Check Python types of a level list; semantic checks (duplicates, unknown or later
    levels, unknown options) happen in the engine's constructor."""
    if isinstance(levels, (str, bytes, Mapping)) or not isinstance(levels, Iterable):
        raise ValueError(f"MCTS: expected levels as a list of dicts, got {type(levels).__name__}")
    out = []
    for i, lv in enumerate(levels):
        if not isinstance(lv, Mapping):
            raise ValueError(f"MCTS: expected level {i} as a dict, got {type(lv).__name__}")
        unknown = sorted(set(lv) - set(_LEVEL_KEYS))
        if unknown:
            raise ValueError(
                f"MCTS: level {i} has unknown keys {unknown}; valid keys: {list(_LEVEL_KEYS)}"
            )
        if "name" not in lv or "options" not in lv:
            raise ValueError(f"MCTS: level {i} needs 'name' and 'options', got keys {sorted(lv)}")
        name = lv["name"]
        if not isinstance(name, str):
            raise ValueError(f"MCTS: expected level {i} name as a string, got {name!r}")
        options = lv["options"]
        if isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
            raise ValueError(
                f"MCTS: expected options of level '{name}' as a list of strings, got {options!r}"
            )
        options = list(options)
        for o in options:
            if not isinstance(o, str):
                raise ValueError(f"MCTS: expected options of level '{name}' as strings, got {o!r}")
        req = lv.get("requires") or {}
        if not isinstance(req, Mapping):
            raise ValueError(
                f"MCTS: expected requires of level '{name}' as a dict {{level: [options]}}, "
                f"got {req!r}"
            )
        reqs = []
        for other, allowed in req.items():
            if isinstance(allowed, str):
                allowed = [allowed]
            if not isinstance(other, str) or not isinstance(allowed, Iterable):
                raise ValueError(f"MCTS: bad requirement {other!r}: {allowed!r} on level '{name}'")
            allowed = list(allowed)
            if not all(isinstance(a, str) for a in allowed):
                raise ValueError(
                    f"MCTS: expected allowed options of '{other}' (required by '{name}') "
                    f"as strings, got {allowed!r}"
                )
            reqs.append((other, allowed))
        out.append((name, options, reqs))
    return out


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"MCTS: expected {name} an integer in [{lo}, {hi}], got {value!r}")
    return value


class MCTS(_engine.MCTS):
    """MCTS engine over a tree of levels. See the module docstring and mcts.h.

    Args:
        levels: ordered levels, each ``{"name", "options", "requires"?}``.
        selection: ``"thompson"`` (default) or ``"uct"`` (the paper's); see the module docstring.
        prior_strength: Thompson only: pseudo-observations of a node's shared prior (> 0).
        exploration: UCT only: C in the UCB formula (>= 0).
        seed: seed of the engine's splitmix64 stream (0 <= seed < 2**64).
        normalize_rewards: UCT only: min-max normalise rewards by their running range.
        on_repeat: ``"reuse"`` feeds a known design's reward back and proposes another design
            (subtrees whose designs are all told or pending are skipped; after ``max_retries``
            retries, or once every design is told or pending, a repeat is returned);
            ``"average"`` returns the repeat to be evaluated again and averages its rewards.
        max_nodes: node budget of the tree (root included); when reached, the tree stops
            growing and walks roll out from the deepest existing node.
        virtual_loss: UCT only: virtual visits (of normalised reward 0) per pending ask on its path.
        max_retries: ``"reuse"`` only: retries of a repeated proposal per ask.

    Inherited from the C++ engine (no Python layer in the loop):
        ask(k=1) -> [(trial_id, {level: option})], pending until told.
        tell(trial_id, reward): any order; NaN/Inf or an unknown/already told id -> ValueError.
        ask_many(k) -> (ids int64[k], designs int32[k, levels]); tell_many(ids, rewards);
        decode(designs) -> {level: option} of a row, or a list of them of a [k, levels] array.
        num_told, num_pending, num_reused (known rewards fed back by "reuse"; root visits ==
        num_told + num_reused), num_nodes, best() -> (design, mean reward) or None,
        num_designs() -> exact size of the dependent space (ValueError in the rare space whose
        dependencies are too entangled to count), tree(), level_stats(), pair_stats(),
        serialize().
    """

    def __init__(
        self,
        levels: Sequence[Mapping[str, Any]],
        selection: str = "thompson",
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
        exploration: float = DEFAULT_EXPLORATION,
        seed: int = 0,
        normalize_rewards: bool = True,
        on_repeat: str = "reuse",
        max_nodes: int = 1_000_000,
        virtual_loss: float = 1.0,
        max_retries: int = 100,
    ):
        parsed = _parse_levels(levels)
        if selection not in ("uct", "thompson"):
            raise ValueError(f"MCTS: expected selection 'uct' or 'thompson', got {selection!r}")
        if on_repeat not in ("reuse", "average"):
            raise ValueError(f"MCTS: expected on_repeat 'reuse' or 'average', got {on_repeat!r}")
        for name, v in (
            ("exploration", exploration),
            ("virtual_loss", virtual_loss),
            ("prior_strength", prior_strength),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"MCTS: expected {name} a number, got {v!r}")
        if not isinstance(normalize_rewards, bool):
            raise ValueError(f"MCTS: expected normalize_rewards a bool, got {normalize_rewards!r}")
        super().__init__(
            parsed,
            selection,
            float(prior_strength),
            float(exploration),
            _check_int("seed", seed, 0, 2**64 - 1),
            normalize_rewards,
            on_repeat,
            _check_int("max_nodes", max_nodes, 1, 2**31 - 1),
            float(virtual_loss),
            _check_int("max_retries", max_retries, 0, 2**32 - 1),
        )

    @property
    def levels(self) -> List[Dict[str, Any]]:
        """The space, in the constructor's format."""
        return self._levels_list()

    @property
    def options(self) -> Dict[str, Any]:
        """The engine's options (exploration, seed, ...), as accepted by the constructor."""
        return self._options_dict()

    @classmethod
    def deserialize(cls, blob: bytes) -> "MCTS":
        """An engine identical to the serialised one (same state, same future proposals).
        A corrupt blob (magic, version, length, checksum or content) -> ValueError."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise ValueError(f"MCTS.deserialize: expected bytes, got {type(blob).__name__}")
        self = cls.__new__(cls)
        _engine.MCTS.__init__(self, bytes(blob))
        return self

    @classmethod
    def from_history(
        cls,
        levels: Sequence[Mapping[str, Any]],
        history: Iterable[Tuple[Mapping[str, str], float]],
        **options,
    ) -> "MCTS":
        """An engine with the given (design, reward) pairs told in order, e.g. from a journal.

        Each design walks down the tree with the same rule as a proposal, so a sequential
        search replayed from its journal gets the same tree, best design and level statistics
        (under on_repeat="reuse", rewards the engine fed back itself are not in a journal, so
        visit counts can differ). The random stream restarts from ``seed``: to continue a
        search with the same future proposals, use ``serialize``/``deserialize``. Trial ids
        continue after the history (the first ask gets id ``len(history)``).
        """
        eng = cls(levels, **options)
        items = []
        for i, item in enumerate(history):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"MCTS.from_history: entry {i}: expected (design, reward), got {item!r}"
                )
            design, reward = item
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise ValueError(
                    f"MCTS.from_history: entry {i}: expected a numeric reward, got {reward!r}"
                )
            items.append((dict(design) if isinstance(design, Mapping) else design, float(reward)))
        eng._tell_history(items)
        return eng

    def __reduce__(self):
        return (_restore, (type(self), self.serialize()))

    def __repr__(self) -> str:
        o = self.options
        try:
            designs = self.num_designs()
        except ValueError:  # too entangled to count
            designs = "?"
        return (
            f"MCTS(levels={len(self.levels)}, designs={designs}, told={self.num_told}, "
            f"pending={self.num_pending}, nodes={self.num_nodes}, selection={o['selection']!r}, "
            f"on_repeat={o['on_repeat']!r})"
        )


def _restore(cls, blob):
    return cls.deserialize(blob)
