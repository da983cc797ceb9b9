"""Eager PyTorch references: one function per op, same name as the op; the kernels' spec.

Tests and benchmarks import these; nothing else copies their math. Each module
``autokd/reference/<op>.py`` defines a function ``<op>``; modules are discovered here.
"""

from autokd._discover import export_same_name

__all__ = export_same_name(__name__, __path__, globals())
