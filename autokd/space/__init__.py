"""The distiller search space: specs, the search tree, and the operation registries (re-exported
from autokd.nn.registry).

    from autokd.space import load_space, DistillerSpec
    space = load_space("autokd")                 # the paper's Table 1 (10,692 designs)
    spec = space.spec_from_design(space.sample(random.Random(0)))
    print(spec.to_yaml())
"""

# The operation registries live beside the blocks they hold (autokd.nn.registry, filled when
# autokd.nn is imported); re-exported here, where specs name their keys.
from autokd.nn.registry import (
    FEATURE_DISTANCES,
    LOGIT_DISTANCES,
    SCHEDULES,
    TRANSFORM_STAGES,
    TRANSFORMS,
)
from autokd.space.space import Level, SearchSpace, list_spaces, load_space, space_fingerprint
from autokd.space.spec import (
    DistillerSpec,
    OpChoice,
    SpecError,
    allowed_options,
    list_distillers,
    load_distiller,
)

__all__ = [
    "FEATURE_DISTANCES",
    "LOGIT_DISTANCES",
    "SCHEDULES",
    "TRANSFORMS",
    "TRANSFORM_STAGES",
    "DistillerSpec",
    "Level",
    "OpChoice",
    "SearchSpace",
    "SpecError",
    "allowed_options",
    "list_distillers",
    "list_spaces",
    "load_distiller",
    "load_space",
    "space_fingerprint",
]
