"""The package's import graph has no cycle and never runs up the stage order, counting imports inside functions
too, and every module imports first in a fresh interpreter.

The layer check was seen to fail on an upward import: with ``from asr_onnx.pipeline.guard import guard_repair``
added inside a function of ``asr_onnx/measure/passes.py`` (a commit-local experiment, not kept),
``test_no_import_runs_up_the_stage_order`` failed with ``asr_onnx.measure.passes (measure) imports
asr_onnx.pipeline.guard (pipeline)``; ``test_the_layer_check_sees_an_upward_import`` makes the same check on
a built tree in every run.
"""

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


# the stage order, low to high: a module may import its own layer and the layers below it, never one above.
# refit and correct are peers (neither imports the other).
LAYERS = [{"errors", "progress", "filekinds", "tempdirs"}, {"calib"}, {"outputs"}, {"model"}, {"measure"}, {"refit", "correct"}, {"prune"},
          {"verify"}, {"quantize"}, {"report"}, {"pipeline"}, {"cli"}]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def layer_of(name: str) -> str | None:
    """The stage a module belongs to: its first component under asr_onnx (None for the root package)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up the stage order, or sideways between the peers refit and correct."""
    found = []
    for name, targets in sorted(graph.items()):
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            if here is None or there is None or here == there:
                continue
            if RANK[there] > RANK[here] or {here, there} == {"refit", "correct"}:
                found.append(f"{name} ({here}) imports {target} ({there})")
    return found


def test_every_module_has_a_layer():
    names = module_names()
    assert {layer_of(name) for name in names} - {None} <= set(RANK)


def test_no_import_runs_up_the_stage_order():
    names = module_names()
    graph = {name: imported(name, path, set(names)) for name, path in names.items()}
    assert upward(graph) == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a measurement module that imports the pipeline, and a refit module that imports
    correct, are both found; a pipeline module importing measure is fine."""
    (tmp_path / "passes.py").write_text("def f():\n    from asr_onnx.pipeline.guard import g\n")
    (tmp_path / "gram.py").write_text("from asr_onnx.correct import recal\n")
    (tmp_path / "guard.py").write_text("from asr_onnx.measure import passes\n")
    known = {"asr_onnx.measure", "asr_onnx.measure.passes", "asr_onnx.pipeline", "asr_onnx.pipeline.guard",
             "asr_onnx.refit", "asr_onnx.refit.gram", "asr_onnx.correct", "asr_onnx.correct.recal"}
    graph = {"asr_onnx.measure.passes": imported("asr_onnx.measure.passes", tmp_path / "passes.py", known),
             "asr_onnx.refit.gram": imported("asr_onnx.refit.gram", tmp_path / "gram.py", known),
             "asr_onnx.pipeline.guard": imported("asr_onnx.pipeline.guard", tmp_path / "guard.py", known)}
    assert upward(graph) == [
        "asr_onnx.measure.passes (measure) imports asr_onnx.pipeline (pipeline)",
        "asr_onnx.measure.passes (measure) imports asr_onnx.pipeline.guard (pipeline)",
        "asr_onnx.refit.gram (refit) imports asr_onnx.correct (correct)",
        "asr_onnx.refit.gram (refit) imports asr_onnx.correct.recal (correct)",
    ]


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
