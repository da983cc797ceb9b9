"""The registries of the distillation operations, beside the blocks they hold.

Every operation a ``DistillerSpec`` can name lives in one of four ``autokd.Registry`` tables.
Transforms have three stages that share option names ("original" exists at each stage), so
their keys carry the stage: ``"global/attention"``, ``"intra/multi-scale"``,
``"inter/channel-wise"``. The implementations are the modules of ``autokd.nn.blocks``, which
register themselves here when imported; ``autokd/nn/__init__`` imports that module, so any
import of this one (``from autokd.nn.registry import ...`` runs the package first) sees the
tables filled. ``autokd.space`` validates specs against them and re-exports them.
"""

from autokd.registry import Registry

TRANSFORMS = Registry("transform")
FEATURE_DISTANCES = Registry("feature distance")
LOGIT_DISTANCES = Registry("logit distance")
SCHEDULES = Registry("schedule")

# spec field -> key prefix in TRANSFORMS
TRANSFORM_STAGES = {
    "global_transform": "global",
    "intra_spatial": "intra",
    "inter_spatial": "inter",
}


def stage_options(field: str):
    """Bare option names registered for one transform stage, e.g. ["attention", "mask", ...]."""
    prefix = TRANSFORM_STAGES[field] + "/"
    return [k[len(prefix) :] for k in TRANSFORMS if k.startswith(prefix)]
