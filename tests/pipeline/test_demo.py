"""`asr-onnx demo` on the bundled sample model and data."""

import re

from asr_onnx.cli.main import main


def test_demo_prints_every_method_next_to_dense(capsys):
    assert main(["demo", "--eval-size", "100", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {m[0]: float(m[1]) for m in re.findall(r"^(dense|none|bn|lw|naive|asr)\s+([\d.]+)%", out, re.M)}
    assert set(rows) == {"dense", "none", "bn", "lw", "naive", "asr"}
    assert all(0 <= v <= 100 for v in rows.values())
    assert rows["bn"] == rows["naive"]  # identical in the default placement
    assert "100 test images" in out
    default = re.search(r"^default\s+([\d.]+)%", out, re.M)  # `repair`'s default, which the demo ends with
    assert default and float(default[1]) > rows["bn"] and "least-squares refit" in out


def test_demo_refuses_an_unknown_model(capsys):
    assert main(["demo", "--model", "alexnet"]) == 1
    assert "no sample model 'alexnet'" in capsys.readouterr().err


def test_demo_names_a_models_dir_without_samples(tmp_path, capsys):
    assert main(["demo", "--models-dir", str(tmp_path)]) == 1
    assert "sample models not found" in capsys.readouterr().err
