"""The wheel carries every package of the source tree (a subpackage missing from pyproject installs
without error and fails only at import time, outside the repository)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import asr_onnx

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


def build_wheel(folder: Path) -> Path:
    """The wheel of a copy of the source tree (so that the build writes nothing into the repository)."""
    source = folder / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pt", "build", "*.egg-info")
    for name in ("asr_onnx", "sample_models"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(folder / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return next((folder / "dist").glob("asr_onnx-*.whl"))


def test_the_wheel_carries_the_demo_and_one_version(tmp_path):
    import zipfile

    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the wheel package
    wheel = build_wheel(tmp_path)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("version")
    assert version is None, "the version is kept once, in asr_onnx/__init__.py"
    assert wheel.name.startswith(f"asr_onnx-{asr_onnx.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    samples = "asr_onnx/samples/"
    assert {samples + "resnet20_bn.onnx", samples + "data/eval.npz", samples + "data/LICENSE-fashion-mnist.txt",
            "asr_onnx/cli/main.py"} <= names
    assert sum(n.startswith(samples + "data/calib/") and n.endswith(".png") for n in names) == 512
    assert not any(n.startswith(samples) and n.endswith((".pt", ".md")) for n in names)
    assert not any(n.startswith(samples) and n.endswith(".onnx") and "resnet20_bn" not in n for n in names)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_from_any_folder(tmp_path):
    """pip install of the wheel into a fresh venv; `asr-onnx demo` then runs from an empty folder."""
    pytest.importorskip("setuptools", minversion="70.1")
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the runtime dependencies come from this interpreter's environment (no download): its site folders
    # are listed after the venv's own, so the wheel's asr_onnx comes first
    site_packages = next((venv / "lib").glob("python*/site-packages"))
    here = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site_packages / "test-environment.pth").write_text("\n".join(here) + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--force-reinstall", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing points back at the source tree
    where = subprocess.run([str(python), "-c", "import asr_onnx.pipeline.demo as d; print(d.sample_folder())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(venv), where.stderr[-2000:]
    demo = subprocess.run([str(venv / "bin" / "asr-onnx"), "demo", "--eval-size", "200", "--device", "cpu"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "resnet20_bn: global pruning at 0.9, 512 calibration images, 200 test images" in demo.stdout
    rows = dict(re.findall(r"^(dense|none|bn|lw|naive|asr)\s+([\d.]+)%", demo.stdout, re.M))
    assert set(rows) == {"dense", "none", "bn", "lw", "naive", "asr"} and rows["bn"] == rows["naive"]
    assert list(elsewhere.iterdir()) == []  # the demo writes nothing
