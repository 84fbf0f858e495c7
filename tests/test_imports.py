"""The package's import graph has no cycle, counting imports inside functions too, and every module imports
first in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asr_onnx

PACKAGE = Path(asr_onnx.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("asr_onnx",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file.

    The root package's lazy exports (``asr_onnx.Repair`` and friends, imported inside its ``__getattr__``)
    run only when such a name is asked for, from outside the package; they are not counted.
    """
    tree = ast.parse(path.read_text())
    nodes = tree.body if name == "asr_onnx" else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")  # importing a.b.c runs a and a.b first
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {t for t in found & known if t != name and not name.startswith(f"{t}.")}


# none left: auto's and the guard's probes are Repair.fork()s, so select.py and guard.py never import api
KNOWN_CYCLES: list[set[str]] = []


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: each is one or more import cycles."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {name: reach(name) for name in graph}
    found = {frozenset({name} | {other for other in reachable[name] if name in reachable[other]})
             for name in graph if name in reachable[name]}
    return sorted((set(c) for c in found), key=sorted)


def test_the_import_graph_has_no_cycle():
    names = module_names()
    graph = {name: imported(name, path, set(names)) for name, path in names.items()}
    assert cycles(graph) == KNOWN_CYCLES


def test_the_graph_check_sees_a_cycle_inside_a_function(tmp_path):
    """The check itself: two modules that import each other lazily form a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    from . import a\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    known = {"asr_onnx.a", "asr_onnx.b", "asr_onnx.c"}
    graph = {name: imported(name, tmp_path / f"{name[-1]}.py", known) for name in known}
    assert graph == {"asr_onnx.a": {"asr_onnx.b"}, "asr_onnx.b": {"asr_onnx.a"}, "asr_onnx.c": {"asr_onnx.a"}}
    assert cycles(graph) == [{"asr_onnx.a", "asr_onnx.b"}]


def test_every_module_imports_in_a_fresh_interpreter_in_several_orders():
    names = sorted(module_names())
    for order in (names, names[::-1], names[1::2] + names[::2]):
        code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % order
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


def test_the_public_names_stay_what_they_are_once_every_module_is_imported():
    """A submodule named like a public function (``asr_onnx.evaluate``) would replace it on the package."""
    code = ("import importlib, types, asr_onnx\nfor name in %r:\n    importlib.import_module(name)\n"
            "bad = [n for n in asr_onnx.__all__ if isinstance(getattr(asr_onnx, n), types.ModuleType)]\n"
            "assert not bad, bad\n" % sorted(module_names()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
