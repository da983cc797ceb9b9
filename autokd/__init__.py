"""autokd: automatic search for knowledge-distillation designs (Auto-KD), with fused kernels.

Importing autokd loads the compiled ops into ``torch.ops.autokd``. Public API is re-exported
here; everything else is internal.
"""
import torch  # noqa: F401  (must be imported before autokd._C)

from autokd import ops, reference  # noqa: F401
from autokd.registry import Registry

__version__ = "0.1.0"

__all__ = ["Registry", "ops", "reference", "__version__"]
