"""The distiller search space: registries of operations, specs, and the search tree.

    from autokd.space import load_space, DistillerSpec
    space = load_space("autokd")                 # the paper's Table 1 (10,692 designs)
    spec = space.spec_from_design(space.sample(random.Random(0)))
    print(spec.to_yaml())
"""
from autokd.space.registry import (FEATURE_DISTANCES, LOGIT_DISTANCES, SCHEDULES, TRANSFORMS,
                                   TRANSFORM_STAGES)
from autokd.space.spec import (DistillerSpec, OpChoice, SpecError, allowed_options, list_distillers,
                               load_distiller)
from autokd.space.space import Level, SearchSpace, list_spaces, load_space, space_fingerprint

from autokd.nn import blocks as _blocks  # noqa: E402,F401  (registers the operations)

__all__ = [
    "DistillerSpec", "FEATURE_DISTANCES", "LOGIT_DISTANCES", "Level", "OpChoice", "SCHEDULES",
    "SearchSpace", "SpecError", "TRANSFORMS", "TRANSFORM_STAGES", "allowed_options",
    "list_distillers", "list_spaces", "load_distiller", "load_space", "space_fingerprint",
]
