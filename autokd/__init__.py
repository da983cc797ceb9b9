"""autokd: automatic search for knowledge-distillation designs (Auto-KD), with fused kernels.

Importing autokd loads the compiled ops into ``torch.ops.autokd``. The public API is re-exported
here (loaded on first use, so ``import autokd`` stays cheap); everything else is internal.
"""

import importlib

import torch  # noqa: F401  (must be imported before autokd._C)

from autokd import ops, reference  # noqa: F401
from autokd.registry import Registry

__version__ = "0.1.0"

_LAZY = {
    "Distiller": "autokd.distill",
    "DistillerSpec": "autokd.space",
    "load_space": "autokd.space",
    "build_model": "autokd.models",
    "default_taps": "autokd.models",
    "load_data": "autokd.data",
    "FeatureStore": "autokd.store",
    "MCTS": "autokd.search.mcts",
}

__all__ = ["Registry", "ops", "reference", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autokd' has no attribute {name!r}")
