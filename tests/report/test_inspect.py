"""`asr-onnx inspect`: per-layer weights, sparsity, 2:4 conformance, eligibility and the normalisation after each layer."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import make_model

from asr_onnx.cli.main import main
from asr_onnx.pipeline.driver import Repair
from asr_onnx.report.inspect import format_inspection, inspect_model


def mixed_model():
    """Conv+BN, depthwise Conv + Mul/Add chain, two Convs sharing one weight, MatMul, Gemm."""
    rng = np.random.default_rng(0)

    def init(name, shape, zero_every=None):
        w = rng.normal(size=shape).astype(np.float32)
        if zero_every:
            w.reshape(-1)[::zero_every] = 0
        return numpy_helper.from_array(w, name)

    inits = [init("wa", (16, 8, 3, 3), zero_every=4), init("wdw", (16, 1, 3, 3)), init("wc", (16, 16, 1, 1)),
             init("wm", (16, 12)), init("wg", (10, 12)),
             numpy_helper.from_array(np.ones(16, np.float32), "s"), numpy_helper.from_array(np.zeros(16, np.float32), "b"),
             numpy_helper.from_array(np.zeros(16, np.float32), "m"), numpy_helper.from_array(np.ones(16, np.float32), "v"),
             numpy_helper.from_array(np.full((1, 16, 1, 1), 2, np.float32), "k"),
             numpy_helper.from_array(np.full((1, 16, 1, 1), 0.1, np.float32), "c")]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["an"], name="bn_a"),
        helper.make_node("Relu", ["an"], ["ar"]),
        helper.make_node("Conv", ["ar", "wdw"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["d", "k"], ["dm"]),
        helper.make_node("Add", ["dm", "c"], ["da"]),
        helper.make_node("Conv", ["da", "wc"], ["c1"], name="conv_c1"),
        helper.make_node("Conv", ["c1", "wc"], ["c2"], name="conv_c2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "wm"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "wg"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])


def test_rows_and_totals_of_a_mixed_model():
    info = inspect_model(mixed_model())
    rows = {r["name"]: r for r in info["layers"]}
    assert list(rows) == ["conv_a", "dw", "conv_c1", "conv_c2", "mm", "fc"]
    assert rows["conv_a"]["norm"] == {"kind": "BatchNormalization", "node": "bn_a", "ops": ["BatchNormalization"],
                                      "constant_params": True}
    assert rows["dw"]["norm"]["kind"] == "affine" and rows["dw"]["norm"]["ops"] == ["Mul", "Add"]
    assert rows["conv_c1"]["norm"]["kind"] == "none"
    assert rows["conv_a"]["zeros"] == 16 * 8 * 9 // 4 and rows["conv_a"]["sparsity"] == 0.25
    assert rows["conv_a"]["nm_24"] == "no"  # 1 zero in 4 along the flat order is not 2:4 along C
    assert rows["dw"]["nm_24"] == "n.a." and rows["dw"]["eligible"] is False
    assert rows["dw"]["reasons"] == ["depthwise conv"]
    assert rows["conv_c2"]["shared"] and not rows["conv_c1"]["shared"]
    assert rows["mm"]["axis_24"] == 0 and rows["fc"]["axis_24"] == 1
    t = info["totals"]
    # the shared 16x16 weight counts once
    assert t["params"] == 16 * 8 * 9 + 16 * 9 + 16 * 16 + 16 * 12 + 10 * 12
    assert t["zeros"] == 16 * 8 * 9 // 4 and t["layers"] == 6 and t["eligible"] == 5
    assert t["batchnorm_nodes"] == 1 and t["batchnorm_after_layer"] == 1 and t["affine_after_layer"] == 1
    assert info["inputs"] == [{"name": "x", "shape": ["N", 8, 8, 8], "dtype": "float32"}]

    text = format_inspection(info)
    for name in rows:
        assert name in text
    assert "affine(Mul,Add)" in text and "dw: not eligible: depthwise conv" in text
    assert "total: 6 layers" in text


def test_2_4_pruned_model_is_reported_conforming(tmp_path):
    job = Repair(mixed_model(), progress=False).prune(pattern="2:4")
    info = inspect_model(job.pruned)
    verdicts = {r["name"]: r["nm_24"] for r in info["layers"]}
    assert verdicts == {"conv_a": "yes", "dw": "n.a.", "conv_c1": "yes", "conv_c2": "yes", "mm": "yes", "fc": "yes"}
    assert info["totals"]["layers_24"] == 5


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "mixed.onnx"
    onnx.save(mixed_model(), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv_a" in out and "2:4" in out and "total:" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == str(path) and len(info["layers"]) == 6 and info["opset"] == 17


def test_cli_model_without_prunable_layers(tmp_path, capsys):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(model, tmp_path / "relu.onnx")
    assert main(["inspect", str(tmp_path / "relu.onnx")]) == 0
    assert "no prunable layer" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [(None, "model not found"), (b"", "empty"),
                                              (b"\x08\x07garbage" * 50, "not a readable ONNX model")])
def test_cli_bad_model_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
