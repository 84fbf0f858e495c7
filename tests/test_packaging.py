"""The wheel carries every package of the source tree (a subpackage missing from pyproject installs
without error and fails only at import time, outside the repository)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_library_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asr_onnx").rglob("__init__.py")}
    assert found and found <= listed, f"not in pyproject packages: {sorted(found - listed)}"


def test_requires_python_admits_no_version_that_lacks_a_module_the_code_imports():
    """Issue 14.14: tomllib (here) is new in Python 3.11, so pyproject may not admit 3.10."""
    import re

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(v) for v in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups())
    newer = {"tomllib": (3, 11)}  # stdlib modules newer than the oldest Python anyone might declare
    sources = [*(ROOT / "asr_onnx").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    imported = {m for path in sources for m in re.findall(r"^\s*(?:import|from)\s+(\w+)", path.read_text(), re.MULTILINE)}
    for module, since in newer.items():
        assert module not in imported or minimum >= since, f"{module} needs Python {since}, pyproject allows {spec}"
