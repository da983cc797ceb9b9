"""Discovery of one-function-per-module packages (autokd.ops, autokd.reference)."""

import importlib
import pkgutil


def export_same_name(package_name, package_path, namespace):
    """Import each public module ``<pkg>.<name>`` and put its function ``<name>`` in
    ``namespace``; return the exported names."""
    names = []
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package_name}.{info.name}")
        if hasattr(mod, info.name):
            namespace[info.name] = getattr(mod, info.name)
            names.append(info.name)
    return names
