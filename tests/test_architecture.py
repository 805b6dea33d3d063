"""The shape of the package, read from its source with :mod:`ast` (nothing is imported):
no import cycles between modules or between the top-level parts (``cxr.report``,
``cxr.workflows``, ...), library code that never prints or exits, heavy optional libraries
imported only where they are used, and nothing test-only under ``src/cxr``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cxr"

# Known cycles, each to be deleted when its fix is merged.
KNOWN_MODULE_CYCLES: list[set[str]] = []


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(name: str, path: Path) -> set[str]:
    """Every ``cxr`` module that ``name`` imports anywhere in its source (module level,
    functions, ``TYPE_CHECKING`` blocks), relative imports resolved: for ``from A import b``,
    ``A`` and, where ``A.b`` is a module, ``A.b``."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {n for n in found if n in MODULES and n != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. The root package ``cxr`` is left out as a target: it
    is the façade over the whole library (its exports are loaded lazily, from everywhere),
    and modules take only ``__version__`` from it (:func:`test_modules_take_only_the_version_
    from_the_root_package`)."""
    return {
        name: {target for target in imported_names(name, path) if target != "cxr"}
        for name, path in MODULES.items()
    }


def part(module: str) -> str:
    """The top-level part a module belongs to: ``cxr.report.build`` -> ``cxr.report``; a
    top-level module (``cxr.metrics``) is a part of its own."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    # A function-level import (the card's view of the data's origin).
    assert "cxr.report.numbers" in graph["cxr.workflows.card"]
    # `from cxr.cli import data, dicom, ...` names modules.
    assert {"cxr.cli.data", "cxr.cli.serve"} <= graph["cxr.cli"]


def test_no_import_cycle_between_modules():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_MODULE_CYCLES]
    assert found == [], f"import cycles: {[sorted(c) for c in found]}"


def test_no_import_cycle_between_the_top_level_parts():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(part(module), set()).update(
            part(t) for t in targets if part(t) != part(module)
        )
    found = cycles(graph)
    assert found == [], f"cycles between parts: {[sorted(c) for c in found]}"
    assert "cxr.report" in graph and "cxr.workflows" not in graph["cxr.report"]


def test_modules_take_only_the_version_from_the_root_package():
    taken = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "cxr" and not node.level:
                taken.update(alias.name for alias in node.names)
    assert taken <= {"__version__"}


def _calls(tree: ast.AST) -> list[tuple[int, str]]:
    """``print(...)``, ``sys.exit``/``exit``/``quit``, ``typer.Exit``/``raise SystemExit``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("print", "exit", "quit"):
                found.append((node.lineno, func.id))
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in (("sys", "exit"), ("os", "_exit"))
            ):
                found.append((node.lineno, f"{func.value.id}.{func.attr}"))
        if isinstance(node, ast.Attribute) and node.attr in ("Exit", "Abort"):
            found.append((node.lineno, f"*.{node.attr}"))
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append((node.lineno, "SystemExit"))
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "typer"
            and {a.name for a in node.names} & {"Exit", "Abort"}
        ):
            found.append((node.lineno, "from typer import Exit"))
    return found


def test_the_exit_scan_sees_each_form():
    source = "print(1)\nsys.exit(2)\nraise typer.Exit(1)\nraise SystemExit(3)\n"
    assert [what for _, what in _calls(ast.parse(source))] == [
        "print",
        "sys.exit",
        "*.Exit",
        "SystemExit",
    ]


def test_library_code_never_prints_or_exits():
    """Only the CLI (``cxr.cli``) talks to the terminal and chooses exit codes; the library
    raises :mod:`cxr.errors` and logs."""
    found = [
        f"{path.relative_to(SRC)}:{line}: {what}"
        for name, path in MODULES.items()
        if not (name == "cxr.cli" or name.startswith("cxr.cli."))
        for line, what in _calls(ast.parse(path.read_text()))
    ]
    assert found == []


# ---------------------------------------------------------------------------- heavy imports

# Imported only by the functions that use them (or by modules only those functions import).
# scipy is not here: scikit-learn, which the metrics need, imports it; nor pyarrow, which
# pandas imports itself where it is installed.
HEAVY = (
    "captum",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "fastapi",
    "fastapi_offline",
    "uvicorn",
    "starlette",
    "pynetdicom",
    "highdicom",
    "sqlalchemy",
    "psycopg",
    "prometheus_client",
    "tensorboard",
)
# What a notebook user imports to train, evaluate, predict, explain and report.
LIBRARY_ENTRY = (
    "cxr",
    "cxr.api",
    "cxr.api.dataset",
    "cxr.api.models",
    "cxr.api.runs",
    "cxr.cli",
    "cxr.config",
    "cxr.data.datasets",
    "cxr.data.synthetic",
    "cxr.engine.inference",
    "cxr.engine.trainer",
    "cxr.explain.gradcam",
    "cxr.explain.localize",
    "cxr.explain.render",
    "cxr.model.bundle",
    "cxr.model.onnx",
    "cxr.run",
    "cxr.workflows.calibrate",
    "cxr.workflows.demo",
    "cxr.workflows.evaluate",
    "cxr.workflows.explain",
    "cxr.workflows.external",
    "cxr.workflows.localize",
    "cxr.workflows.ood",
    "cxr.workflows.train",
)


def _loaded_after(modules: tuple[str, ...]) -> list[str]:
    """The top-level modules in ``sys.modules`` after a fresh interpreter imports
    ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_importing_the_library_loads_no_heavy_optional_library():
    loaded = _loaded_after(LIBRARY_ENTRY)
    assert "torch" in loaded  # the check itself sees what an import loads
    assert [name for name in HEAVY if name in loaded] == []


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("cxr.serve.app", "fastapi"),
        ("cxr.dicom.node", "pynetdicom"),
        ("cxr.results.store", "sqlalchemy"),
        ("cxr.model.onnx", "torch"),
    ],
)
@pytest.mark.slow
def test_the_heavy_check_sees_a_heavy_import(module, heavy):
    assert heavy in _loaded_after((module,))


# ---------------------------------------------------------------------------- the wheel


def test_nothing_test_only_ships_in_the_wheel():
    """The wheel holds what setuptools finds under src/ (pyproject's packages.find): no
    module there is test support, and none imports the tests' support package."""
    from setuptools import find_namespace_packages

    packages = find_namespace_packages(where=str(SRC))
    assert packages and all(p == "cxr" or p.startswith("cxr.") for p in packages)
    shipped = [n for n in MODULES if n.split(".")[0] == "cxr"]
    assert not [n for n in shipped if "test" in n.rpartition(".")[2]]
    importers = [
        name
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
            in ("support", "tests", "conftest", "dicom_support", "decode_hooks")
            for alias in node.names
        )
    ]
    assert importers == []
