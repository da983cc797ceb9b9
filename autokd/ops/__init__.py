"""Python faces of the ``torch.ops.autokd`` custom ops.

Each op lives in its own module ``autokd/ops/<op>.py`` that defines a function of the same name
(the public wrapper) and registers the op's fake kernel and autograd formula. Modules are
discovered here, so adding an op is adding one file.
"""

import torch

from autokd import _C  # noqa: F401  (registers the schemas and kernels)
from autokd._discover import export_same_name  # noqa: E402

WITH_CUDA = bool(_C.WITH_CUDA)

__all__ = export_same_name(__name__, __path__, globals())


def op_names():
    """Names of the forward ops in the autokd namespace (backward ops excluded)."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, name = qualified.partition("::")
        if ns == "autokd" and not name.endswith("_backward"):
            names.add(name.split(".")[0])
    return sorted(names)
