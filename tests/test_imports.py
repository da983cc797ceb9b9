"""The import graph of autokd: every module imports on its own, imports run one way, and every
lazy import says why.

- ``test_every_module_imports_first``: each module of the package is the first autokd module
  imported in a clean interpreter. An import cycle shows only for some entry points (the one
  whose import starts the loop finds a half-initialised module), so every module is tried as
  the entry point. One interpreter imports torch (the first thing ``import autokd`` does, and
  nearly all of the start-up time), then forks one child per module: each child starts with
  no autokd module loaded, exactly as a fresh interpreter would.
- ``test_layers``: the module-level autokd imports (read from the source with ``ast``, so
  nothing is imported) point only down the table ``LAYERS``, or inside one package; the same
  graph has no cycle.
- ``test_lazy_imports_say_why``: an import inside a function carries a comment saying why it
  is not at module level (an optional dependency, a slow import kept out of
  ``autokd-cli --help``).
"""

from __future__ import annotations

import ast
import os
import pathlib
import pkgutil
import subprocess
import sys

import autokd

PACKAGE_DIR = pathlib.Path(autokd.__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent

# Lowest first. A module may import a module of a lower layer, or of its own package; never one
# of a higher layer, nor another package of its own layer (those are independent of each
# other). A package is `autokd.<name>` with every module under it.
LAYERS: list[tuple[str, ...]] = [
    ("autokd.errors", "autokd.registry", "autokd._discover"),  # import nothing of autokd
    ("autokd.fsutil",),  # atomic files; raises PipelineError
    ("autokd._C", "autokd._engine"),  # the compiled extensions
    ("autokd.ops", "autokd.reference"),  # one function per op
    ("autokd",),  # the package itself: loads the ops, re-exports the public API lazily
    ("autokd.nn",),  # blocks, their registries, losses, feature taps
    ("autokd.space",),  # specs and the search tree, validated against nn's registries
    ("autokd.data", "autokd.models"),
    ("autokd.store",),  # teacher feature stores (reads data's augmentation, nn's taps)
    ("autokd.distill",),  # the Distiller: a student, its taps and a spec's loss
    ("autokd.train",),  # training loops, teacher training, a full distill run
    ("autokd.pipeline",),  # the steps commands share: data, teachers, stores
    ("autokd.search",),  # trials, strategies, executors, journal, report
    ("autokd.compare",),  # classic distillers against a searched design
    ("autokd.cli",),
]


def _modules() -> list[str]:
    """Every module of the package (``.py`` and compiled), found on disk without importing."""
    found = ["autokd"]

    def walk(path: pathlib.Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            found.append(name)
            if info.ispkg:
                walk(path / info.name, name)

    walk(PACKAGE_DIR, "autokd")
    return sorted(found)


MODULES = _modules()

# Runs in a fresh interpreter: argv[1:] are module names; prints one line per failure.
_FORK_EACH = r"""
import os, sys, traceback
import torch  # noqa: F401  (what `import autokd` does first; shared by every child)

assert not any(m == "autokd" or m.startswith("autokd.") for m in sys.modules), "autokd preloaded"
failed = 0
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            import importlib
            importlib.import_module(name)
        except BaseException:
            lines = traceback.format_exc().strip().splitlines()
            os.write(w, " | ".join(lines[-3:]).encode())
            code = 1
        os.close(w)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed += 1
        print(f"{name}: {message or 'child exited with status %d' % status}", flush=True)
print(f"checked {len(sys.argv) - 1} modules, {failed} failed", flush=True)
sys.exit(1 if failed else 0)
"""


def _env() -> dict[str, str]:
    """A child interpreter's environment: one thread, and the autokd under test first on the
    path (not an installed copy elsewhere)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SOURCE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def test_module_list_is_complete():
    # the walk must see every kind of module, or the tests below check less than they claim
    for name in (
        "autokd",
        "autokd._C",
        "autokd._engine",
        "autokd.nn.registry",
        "autokd.search.driver",
        "autokd.cli",
    ):
        assert name in MODULES, f"module walk missed {name}; found {MODULES}"


def test_every_module_imports_first():
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_EACH, *MODULES],
        env=_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(SOURCE_ROOT),
    )
    out = proc.stdout.strip().splitlines()
    done = f"checked {len(MODULES)} modules, 0 failed"
    assert proc.returncode == 0 and out and out[-1] == done, (
        "modules that fail to import when imported first (module: last lines of the error):\n"
        + "\n".join(out[:-1])
        + f"\nexit status {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    )


# -- the static graph ---------------------------------------------------------------------------


def _source(name: str) -> pathlib.Path | None:
    rel = pathlib.Path(*name.split(".")[1:])
    for path in (PACKAGE_DIR / rel / "__init__.py", (PACKAGE_DIR / rel).with_suffix(".py")):
        if path.is_file():
            return path
    return None  # a compiled extension


def _is_package(name: str) -> bool:
    return name == "autokd" or (PACKAGE_DIR / pathlib.Path(*name.split(".")[1:])).is_dir()


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import reads from."""
    if not node.level:
        return node.module or ""
    package = name if _is_package(name) else name.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk_imports(tree: ast.AST, in_function: bool = False):
    """(node, in_function) for every import statement of a module."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        yield from _walk_imports(child, inner)


def _targets(name: str, node) -> list[str]:
    """The autokd modules one import statement loads (a ``from`` import of a submodule counts
    as that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "autokd" or a.name.startswith("autokd.")]
    base = _resolve(name, node)
    if not (base == "autokd" or base.startswith("autokd.")):
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _module_level_graph() -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported autokd module, line)] for the imports that run at import time."""
    graph = {}
    for name in MODULES:
        path = _source(name)
        if path is None:
            graph[name] = []
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = [
            (t, node.lineno)
            for node, lazy in _walk_imports(tree)
            if not lazy
            for t in _targets(name, node)
        ]
    return graph


def _layer(name: str) -> tuple[int, str]:
    """(layer index, package) of a module: the longest prefix in LAYERS."""
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"module {name} is in no layer: add its package to LAYERS"
    return best


def _layer_violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    wrong = []
    for name, imports in sorted(graph.items()):
        layer, package = _layer(name)
        for target, line in sorted(set(imports)):
            t_layer, t_package = _layer(target)
            if t_layer > layer or (t_layer == layer and t_package != package):
                where = _source(name)
                where = where.relative_to(SOURCE_ROOT) if where else name
                wrong.append(
                    f"{where}:{line}: {name} (layer {layer}, {package}) imports "
                    f"{target} (layer {t_layer}, {t_package}); expected only lower "
                    "layers or its own package"
                )
    return wrong


def test_layers():
    wrong = _layer_violations(_module_level_graph())
    assert not wrong, "imports that point up or across the layers:\n" + "\n".join(wrong)


def _with_packages(graph: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    """``graph`` plus what Python runs first when it imports a submodule: the packages above
    it (``import autokd.space.spec`` runs ``autokd/space/__init__``), except the importer's own
    packages, which are always initialised before the importer itself."""
    out = {}
    for name, imports in graph.items():
        own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
        edges = []
        for target, line in imports:
            parts = target.split(".")
            parents = [".".join(parts[:k]) for k in range(1, len(parts))]
            edges += [(p, line) for p in parents if p not in own] + [(target, line)]
        out[name] = edges
    return out


def _cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One cycle of the module graph (as a closed path), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target, _ in graph.get(node, []):
            if target == node:
                continue  # `from autokd.x import name` inside autokd.x/__init__: not a cycle
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_cycle():
    cycle = _cycle(_with_packages(_module_level_graph()))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_cycle_and_layer_checks_can_fail():
    # the cycle this layering removed: autokd.nn.blocks imported autokd.space.registry, whose
    # package's __init__ imported autokd.nn.blocks (silent at run time: nothing used the
    # half-initialised module during the import)
    graph = {
        "autokd.nn.blocks": [("autokd.space.registry", 33)],
        "autokd.space": [("autokd.nn.blocks", 14)],
        "autokd.space.registry": [],
        "autokd.data": [("autokd.models", 7)],
    }
    assert _cycle(graph) is None  # only through the package __init__
    assert _cycle(_with_packages(graph)) == ["autokd.nn.blocks", "autokd.space", "autokd.nn.blocks"]
    wrong = _layer_violations(graph)
    assert len(wrong) == 2, wrong
    assert "autokd.data (layer 7, autokd.data) imports autokd.models" in wrong[0]
    assert "autokd.nn.blocks (layer 5, autokd.nn) imports autokd.space.registry" in wrong[1]


def test_lazy_imports_say_why():
    missing = []
    for name in MODULES:
        path = _source(name)
        if path is None:
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node, lazy in _walk_imports(ast.parse(text)):
            span = lines[node.lineno - 1 : node.end_lineno]
            if lazy and not any("#" in line for line in span):
                missing.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno}: {span[0].strip()}")
    assert not missing, (
        "imports inside functions without a comment saying why they are not "
        "at module level:\n" + "\n".join(missing)
    )


def test_space_sees_every_operation_in_a_fresh_interpreter():
    # The registries live in autokd.nn and fill when autokd.nn.blocks is imported; a program
    # that imports autokd.space alone must still validate every shipped design.
    code = (
        "import autokd.space as s\n"
        "for name in s.list_distillers(): s.load_distiller(name)\n"
        "for name in s.list_spaces(): s.load_space(name)\n"
        "print(len(s.TRANSFORMS), len(s.FEATURE_DISTANCES), len(s.LOGIT_DISTANCES), "
        "len(s.SCHEDULES))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(int(n) > 0 for n in proc.stdout.split()), proc.stdout
