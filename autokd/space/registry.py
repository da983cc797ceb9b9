"""The registries of the distiller search space.

Every operation a ``DistillerSpec`` can name lives in one of four ``autokd.Registry`` tables.
Transforms have three stages that share option names ("original" exists at each stage), so
their keys carry the stage: ``"global/attention"``, ``"intra/multi-scale"``,
``"inter/channel-wise"``. The implementations are the modules of ``autokd.nn.blocks``, which
register themselves here when imported (``import autokd.space`` does that).
"""
from autokd.registry import Registry

TRANSFORMS = Registry("transform")
FEATURE_DISTANCES = Registry("feature distance")
LOGIT_DISTANCES = Registry("logit distance")
SCHEDULES = Registry("schedule")

# spec field -> key prefix in TRANSFORMS
TRANSFORM_STAGES = {"global_transform": "global", "intra_spatial": "intra", "inter_spatial": "inter"}


def stage_options(field: str):
    """Bare option names registered for one transform stage, e.g. ["attention", "mask", ...]."""
    prefix = TRANSFORM_STAGES[field] + "/"
    return [k[len(prefix):] for k in TRANSFORMS.keys() if k.startswith(prefix)]
