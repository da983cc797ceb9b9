"""nn.Module losses on top of torch.ops.autokd, for use in other codebases.

``DistillLoss(spec, channels=[(c_s, c_t), ...])`` is a whole distiller design on any features
(e.g. one pair per FPN level); the transforms, distances and schedules are modules of their own.
"""
from autokd.nn.blocks import (Adapter, AttentionMap, ChannelWise, DistillLoss, FeatureLoss,
                              GlobalOriginal, GramL2Distance, GramL2Embedding, InterOriginal,
                              IntraOriginal, KLDistance, L2Distance, LocalPatches, LogitKL, LogitLoss,
                              LogitPearson, LogitStandardKL, LossOutput, MultiScale, RandomMask,
                              RenyiDistance, SampleWise, SpatialAttention, feature_entropy,
                              train_free_factors)

__all__ = [
    "Adapter", "AttentionMap", "ChannelWise", "DistillLoss", "FeatureLoss", "GlobalOriginal",
    "GramL2Distance", "GramL2Embedding", "InterOriginal", "IntraOriginal", "KLDistance",
    "L2Distance", "LocalPatches", "LogitKL", "LogitLoss", "LogitPearson", "LogitStandardKL",
    "LossOutput", "MultiScale", "RandomMask", "RenyiDistance", "SampleWise", "SpatialAttention",
    "feature_entropy", "train_free_factors",
]

# The kernels' own thin modules (autokd/nn/losses.py: SoftmaxKL, DIST, GramL2, CKALoss,
# MultiScalePool) are re-exported when that module is part of the build.
import importlib.util as _ilu  # noqa: E402

if _ilu.find_spec("autokd.nn.losses") is not None:
    from autokd.nn import losses as _losses  # noqa: E402

    _kernel_modules = getattr(_losses, "__all__", None) or [
        n for n, v in vars(_losses).items()
        if isinstance(v, type) and v.__module__ == _losses.__name__ and not n.startswith("_")]
    globals().update({n: getattr(_losses, n) for n in _kernel_modules})
    __all__ += list(_kernel_modules)
