"""Search strategies behind one ask/tell interface: MCTS (the product's engine), uniform random
search and Optuna's TPE, so that comparisons run through one driver at equal budgets.

    strategy = STRATEGIES.get("mcts")(space, seed=0, history=[(design, reward), ...])
    for p in strategy.ask(k):            # k designs at once (k free workers)
        strategy.tell(p, reward_of(p.design))

- ``ask(k)`` returns ``Proposal``s: a design of the space (``{level: option}``) and the
  strategy's handle for it; ``tell(proposal, reward)`` in any order.
- ``history`` (a resumed search's finished trials, in journal order) is replayed at
  construction; the strategy then goes on as if it had proposed them.
- MCTS and random search avoid proposing a design already evaluated (MCTS feeds a known
  design's reward back instead, ``on_repeat="reuse"``): a repeat spends a trial on a known
  answer. TPE is Optuna's, unchanged: its repeats are evaluated again.
- ``recommend(trials)`` is the design the strategy hands back at the end (see each class).

Optuna is optional (``pip install 'autokd[tpe]'``); without it ``--strategy tpe`` says how to
install it.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from autokd.errors import PipelineError
from autokd.registry import Registry
from autokd.search.mcts import MCTS
from autokd.space.space import SearchSpace

Design = Dict[str, str]
History = Sequence[Tuple[Design, float]]

OPTUNA_MISSING = (
    "--strategy tpe needs Optuna, which is not installed: pip install 'autokd[tpe]' "
    "(or pip install 'optuna>=4')"
)


def design_key(design: Design) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted(design.items()))


@dataclass(frozen=True)
class Proposal:
    trial_id: int  # the strategy's handle for tell
    design: Design


class Strategy(abc.ABC):
    """Ask/tell over the designs of ``space``; see the module docstring."""

    name = "?"

    def __init__(self, space: SearchSpace, seed: int = 0, history: History = ()):
        self.space, self.seed = space, seed

    @abc.abstractmethod
    def ask(self, k: int = 1) -> List[Proposal]:
        """``k`` new proposals, pending until told."""

    @abc.abstractmethod
    def tell(self, proposal: Proposal, reward: float) -> None:
        """The finite reward of a pending proposal."""

    @property
    def engine(self) -> Optional[MCTS]:
        """The MCTS engine, for the report's tree view (None for other strategies)."""
        return None


STRATEGIES: Registry = Registry("search strategy")


@STRATEGIES.register("mcts")
class MCTSStrategy(Strategy):
    """The C++ MCTS engine (``autokd.search.mcts``); ``exploration`` and the engine's other
    options pass through."""

    name = "mcts"

    def __init__(self, space: SearchSpace, seed: int = 0, history: History = (), **options: Any):
        super().__init__(space, seed, history)
        options = {k: v for k, v in options.items() if v is not None}
        self._engine = MCTS.from_history(space.engine_levels(), list(history), seed=seed, **options)

    def ask(self, k: int = 1) -> List[Proposal]:
        return [Proposal(i, d) for i, d in self._engine.ask(k)]

    def tell(self, proposal: Proposal, reward: float) -> None:
        self._engine.tell(proposal.trial_id, reward)

    @property
    def engine(self) -> MCTS:
        return self._engine


@STRATEGIES.register("random")
class RandomStrategy(Strategy):
    """Uniform random rollouts (each existing level's option uniformly), without replacement
    while the space allows. Proposal ``i`` (in launch order, history included) is drawn from
    its own stream seeded with ``(seed, i)``, so a resumed search proposes what the
    uninterrupted one would have."""

    name = "random"
    max_retries = 100

    def __init__(self, space: SearchSpace, seed: int = 0, history: History = ()):
        super().__init__(space, seed, history)
        self._seen = {design_key(d) for d, _ in history}
        self._launched = len(history)

    def ask(self, k: int = 1) -> List[Proposal]:
        out = []
        for _ in range(k):
            rng = random.Random(f"{self.seed}:{self._launched}")
            design = self.space.sample(rng)
            for _ in range(self.max_retries):
                if design_key(design) not in self._seen:
                    break
                design = self.space.sample(rng)
            self._seen.add(design_key(design))
            out.append(Proposal(self._launched, design))
            self._launched += 1
        return out

    def tell(self, proposal: Proposal, reward: float) -> None:
        pass  # random search learns nothing


def require_optuna():
    """The optuna module, or a PipelineError that says how to install it."""
    try:
        import optuna  # optional dependency: imported only when TPE is chosen
    except ImportError as e:
        raise PipelineError(OPTUNA_MISSING) from e
    return optuna


@STRATEGIES.register("tpe")
class TPEStrategy(Strategy):
    """Optuna's TPE sampler (seeded) over the space's dependent levels, written the way a user
    wraps a training loop in Optuna: one categorical parameter per level, suggested only where
    the level exists (define-by-run), so TPE sees the same tree. With several designs in
    flight, pending trials take the constant-liar value, Optuna's own remedy for parallel asks.

    Plain Optuna in every other respect (the comparison this strategy exists for): a design TPE
    proposes again is evaluated again (another seed), and ``multivariate`` (joint TPE over the
    parameters that co-occur) is off by default, as in Optuna itself."""

    name = "tpe"

    def __init__(
        self,
        space: SearchSpace,
        seed: int = 0,
        history: History = (),
        n_startup_trials: int = 10,
        multivariate: bool = False,
    ):
        super().__init__(space, seed, history)
        optuna = self._optuna = require_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            multivariate=multivariate,
            group=multivariate,
            constant_liar=True,
        )
        self._study = optuna.create_study(direction="maximize", sampler=sampler)
        dists = {
            lv.name: optuna.distributions.CategoricalDistribution(list(lv.options))
            for lv in space.levels
        }
        for design, reward in history:
            self._study.add_trial(
                optuna.trial.create_trial(
                    params=dict(design), distributions={k: dists[k] for k in design}, value=reward
                )
            )
        self._pending: Dict[int, Any] = {}  # trial number -> optuna trial

    def ask(self, k: int = 1) -> List[Proposal]:
        out = []
        for _ in range(k):
            trial = self._study.ask()
            design: Design = {}
            for lv in self.space.levels:
                if lv.active(design):
                    design[lv.name] = trial.suggest_categorical(lv.name, list(lv.options))
            self._pending[trial.number] = trial
            out.append(Proposal(trial.number, design))
        return out

    def tell(self, proposal: Proposal, reward: float) -> None:
        self._study.tell(self._pending.pop(proposal.trial_id), reward)


def make_strategy(
    name: str, space: SearchSpace, seed: int, history: History = (), **options: Any
) -> Strategy:
    """The strategy called ``name`` (a KeyError with close matches when unknown); ``options``
    go to its constructor (e.g. MCTS's ``exploration``)."""
    cls = STRATEGIES.get(name)
    return cls(space, seed=seed, history=history, **options)
