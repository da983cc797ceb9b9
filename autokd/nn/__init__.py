"""nn.Module losses on top of torch.ops.autokd, for use in other codebases.

``DistillLoss(spec, channels=[(c_s, c_t), ...])`` is a whole distiller design on any features
(e.g. one pair per FPN level); the transforms, distances and schedules are modules of their own.
"""

from autokd.nn.blocks import (
    Adapter,
    AttentionMap,
    ChannelWise,
    DistillLoss,
    FeatureLoss,
    GlobalOriginal,
    GramL2Distance,
    GramL2Embedding,
    InterOriginal,
    IntraOriginal,
    KLDistance,
    L2Distance,
    LocalPatches,
    LogitDistance,
    LogitDKD,
    LogitKL,
    LogitLoss,
    LogitMultiLevel,
    LogitPearson,
    LogitStandardDKD,
    LogitStandardKL,
    LogitStandardMultiLevel,
    LossOutput,
    MultiScale,
    RandomMask,
    RenyiDistance,
    SampleWise,
    SpatialAttention,
    feature_entropy,
    standardize_logits,
    train_free_factors,
)

__all__ = [
    "Adapter",
    "AttentionMap",
    "ChannelWise",
    "DistillLoss",
    "FeatureLoss",
    "GlobalOriginal",
    "GramL2Distance",
    "GramL2Embedding",
    "InterOriginal",
    "IntraOriginal",
    "KLDistance",
    "L2Distance",
    "LocalPatches",
    "LogitDKD",
    "LogitDistance",
    "LogitKL",
    "LogitLoss",
    "LogitMultiLevel",
    "LogitPearson",
    "LogitStandardDKD",
    "LogitStandardKL",
    "LogitStandardMultiLevel",
    "LossOutput",
    "MultiScale",
    "RandomMask",
    "RenyiDistance",
    "SampleWise",
    "SpatialAttention",
    "feature_entropy",
    "standardize_logits",
    "train_free_factors",
]

# The kernels' own thin modules.
from autokd.nn.losses import DIST, CKALoss, GramL2, MultiScalePool, SoftmaxKL  # noqa: E402

__all__ += ["CKALoss", "DIST", "GramL2", "MultiScalePool", "SoftmaxKL"]

# Forward hooks that read named modules' outputs (the Distiller's feature taps).
from autokd.nn.taps import FeatureTaps  # noqa: E402

__all__ += ["FeatureTaps"]
