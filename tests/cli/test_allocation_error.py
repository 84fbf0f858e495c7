"""``repair --allocation error`` (issue 28): the measured allocation end to end, against LAMP's budget."""

import json

import onnx
from onnx import numpy_helper

from asr_onnx.cli.main import main


def zeros(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {t.name: int((numpy_helper.to_array(t) == 0).sum()) for t in model.graph.initializer
            if t.name.endswith("weight")}


def test_repair_with_the_error_allocation_meets_lamps_count_and_reports_it(bn_model, calib_dir, tmp_path):
    reports = {}
    for allocation in ("error", "lamp"):
        report = tmp_path / f"{allocation}.json"
        code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(tmp_path / f"{allocation}.onnx"),
                     "--allocation", allocation, "--sparsity", "0.7", "--batch-size", "16", "--report", str(report),
                     "-q", "--device", "cpu", "--guard", "off"])
        assert code == 0
        reports[allocation] = json.loads(report.read_text())
    assert reports["error"]["settings"]["allocation"] == "error"
    assert {layer["allocation"] for layer in reports["error"]["layers"] if layer["pruned"]} == {"error"}
    error, lamp = zeros(tmp_path / "error.onnx"), zeros(tmp_path / "lamp.onnx")
    assert sum(error.values()) == sum(lamp.values()) and error != lamp


def test_the_error_allocation_without_data_is_one_line(bn_model, tmp_path, capsys):
    code = main(["repair", str(bn_model), "--method", "none", "--allocation", "error", "-o", str(tmp_path / "o.onnx"),
                 "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "--calib is required for --allocation error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
