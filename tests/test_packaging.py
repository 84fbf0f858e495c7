"""The wheel carries every package of the source tree (a subpackage missing from pyproject installs
without error and fails only at import time, outside the repository)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_library_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asr_onnx").rglob("__init__.py")}
    assert found and found <= listed, f"not in pyproject packages: {sorted(found - listed)}"
