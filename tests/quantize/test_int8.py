"""INT8 output (--int8): onnxruntime's static quantizer on the repaired model. Zeros survive as code 0, the
2:4 check reads the integer codes and refuses a model that lost a zero, the output passes onnx.checker and
runs in onnxruntime, the quantization correction brings each layer's mean back to the float model's and keeps
the codes, the report's typed quantization section round-trips and reaches the page, and bench times the int8
model against the dense and the float one."""

import json
import re

import numpy as np
import onnx
import pytest
import zoo
from onnx import numpy_helper

from asr_onnx.errors import AsrError
from asr_onnx.model.qdq import dequantize_weights, float_twin, quantized_tensors
from asr_onnx.model.session import Runner
from asr_onnx.pipeline.driver import Repair
from asr_onnx.prune.sparsecore import layer_rows as sparse_rows
from asr_onnx.quantize import QuantRecipe, check_rows, correct_quantization, layer_rows, prepare, quantize


def calib_set(n=48, seed=1):
    return zoo.DictSet({"input": zoo.random_inputs(n, seed=seed)})


def run(model, x):
    with Runner(model, device="cpu") as session:
        return session.run(None, {"input": x})[session.output_names[0]]


def repair_to_int8(float_layers: str):
    job = Repair(zoo.conv_net(bn=True, channels=(3, 8, 16)), device="cpu", progress=False, batch_size=24)
    job.prune(0.0, "2:4").run(calib_set(), "bn")
    float_model = job.output
    job.to_int8(calib_set(), float_layers=float_layers)
    return float_model, job


@pytest.fixture(scope="module")
def repaired():
    """conv_net pruned to 2:4 and repaired, then to_int8 with every layer int8 and the other choices automatic.

    Every layer: which layers the automatic choice leaves in float depends on the CPU's int8 kernels (on a CPU
    without VNNI onnxruntime's u8s8 kernels add more error, and there it left fc and conv2 in float)."""
    return repair_to_int8("none")


@pytest.fixture(scope="module")
def repaired_auto():
    """As :func:`repaired`, with the layers left in float chosen on held-out samples."""
    return repair_to_int8("auto")


def codes_of(model, layer):
    """The integer codes and scales of the weight a node reads, through its DequantizeLinear."""
    node = next(n for n in model.graph.node if n.name == layer)
    tensor = quantized_tensors(model)[node.input[1]]
    return tensor.signed(), np.asarray(tensor.scale)


def float_weights(model):
    from asr_onnx.model.graph import find_layers, to_graph

    return {layer.name: np.asarray(layer.weight.values) for layer in find_layers(to_graph(model))}


def test_zeros_survive_quantization_exactly_and_keep_2_4(repaired):
    float_model, job = repaired
    weights = float_weights(prepare(float_model))
    assert len(weights) == 4
    for name, values in weights.items():
        codes, _ = codes_of(job.output, name)
        assert codes.shape == values.shape and codes.dtype == np.int64
        assert np.all(codes[values == 0] == 0) and np.any(values == 0) == (name != "conv1")
    rows = {row["name"]: row for row in job.report()["sparse_core"]}
    assert {name: row["nm_24"] for name, row in rows.items() if row["axis_24"] is not None} == \
        {name: "n.a." if name == "conv1" else "yes" for name in weights}  # 3 input channels: n.a.
    assert all(row["precision"] == "int8" for row in rows.values())
    from asr_onnx.report.inspect import format_inspection, inspect_model

    info = inspect_model(job.output)  # `asr-onnx inspect` reads the QDQ initializers too
    assert info["totals"]["layers"] == 4 and info["totals"]["layers_24"] == 3
    assert "conv2 Conv int8" in format_inspection(info)


def test_the_int8_output_passes_the_checker_runs_and_stays_near_float(repaired_auto):
    float_model, job = repaired_auto
    onnx.checker.check_model(job.output, full_check=True)
    ops = {n.op_type for n in job.output.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    x = zoo.random_inputs(64, seed=7)
    got, want = run(job.output, x), run(float_model, x)
    assert np.linalg.norm(got - want) <= 0.1 * np.linalg.norm(want)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    entry = job.report()["quantization"]
    assert entry["format"] == "QDQ" and entry["target"] == "cpu" and entry["activations"]["type"] == "uint8"
    assert entry["calibration"]["picked"]["calibration"] in ("MinMax", "Percentile", "Entropy")
    assert entry["calibration"]["fit"] + entry["calibration"]["held_out"] == 48
    floats = entry["float_layers"]  # none left in float unless that is better past two paired standard errors
    assert floats["candidates"][0] == {"layers": [], "agreement": floats["candidates"][0]["agreement"],
                                       "logit_rel_l2": floats["candidates"][0]["logit_rel_l2"],
                                       "picked": floats["picked"] == []}
    assert [len(c["layers"]) for c in floats["candidates"]] == [0, 1, 2, 4]
    # a layer left in float takes its input with it (quantize.layers.float_nodes_for): more may be float
    assert all(not row["quantized"] for row in entry["layers"] if row["name"] in floats["picked"])
    assert all(row["quantized"] for row in entry["layers"]) == (floats["picked"] == [])
    assert entry["correction"]["picked"] in ("none", "bn")
    assert [c["correction"] for c in entry["correction"]["candidates"]] == ["none", "bn"]
    assert entry["correction"]["verdict"] in ("correction better", "plain PTQ better", "tie")
    for row in entry["layers"]:
        if row["quantized"]:
            assert row["zeros_kept"] and 0 < row["scale"]["min"] <= row["scale"]["max"]
            assert row["rel_l2_ptq"] >= 0 and row["rel_l2_corrected"] >= 0
    assert job.settings["int8"] is True and job.settings["int8_target"] == "cpu"


def test_the_quantization_section_round_trips_and_reaches_the_summary_and_the_page(repaired, tmp_path):
    from asr_onnx.report.build import summary
    from asr_onnx.report.html import render
    from asr_onnx.report.schema import from_dict, read_json, to_dict, write_json

    _, job = repaired
    report = job.report()
    typed = from_dict(report)
    live = json.loads(json.dumps(report["quantization"]))
    assert to_dict(typed.quantization) == live
    assert typed.quantization.layers[1].nm_24 == "yes" and typed.quantization.weights.range in (63, 127)
    write_json(typed, tmp_path / "r.json")
    assert to_dict(read_json(tmp_path / "r.json").quantization) == live
    text = summary(typed)
    assert "int8 QDQ for onnxruntime on the CPU" in text and "2:4 in the int8 weights: 3 of the 3" in text
    page = render(typed, plots=False)
    section = page[page.index('<section id="quantization">'):page.index('<section id="eval">')]
    assert "QDQ for onnxruntime on the CPU" in section and "held-out candidate" in section
    assert all(f"<td class=\"name\">{row.name}</td>" in section for row in typed.quantization.layers)
    assert "correction bn" in section and "Not run" not in section


def test_the_2_4_check_on_int8_weights_refuses_a_lost_zero(repaired):
    float_model, job = repaired
    base = prepare(float_model)
    broken = onnx.ModelProto()
    broken.CopyFrom(job.output)
    name = "conv2"
    weight = next(n for n in broken.graph.node if n.name == name).input[1]
    codes_name = quantized_tensors(broken)[weight].node.input[0]
    init = next(t for t in broken.graph.initializer if t.name == codes_name)
    codes = numpy_helper.to_array(init).copy()
    codes.flat[np.flatnonzero(codes == 0)[0]] = 1  # one pruned weight off zero: its group of 4 has 3 nonzeros
    init.CopyFrom(numpy_helper.from_array(codes, codes_name))
    rows = {row["name"]: row for row in layer_rows(base, broken)}
    assert rows[name]["float_nm_24"] == "yes" and rows[name]["nm_24"] == "no" and not rows[name]["zeros_kept"]
    assert all(row["nm_24"] == row["float_nm_24"] for key, row in rows.items() if key != name)
    with pytest.raises(AsrError, match=f"a zero weight of {name} is not code 0"):
        check_rows(list(rows.values()))
    with pytest.raises(AsrError, match="the 2:4 pattern of .* is lost"):
        check_rows([dict(rows[name], zeros_kept=True)])
    assert {r["name"]: r["nm_24"] for r in sparse_rows(broken)}[name] == "no"
    check_rows(layer_rows(base, job.output))


def layer_means(model, keys, x):
    """Per-channel means of the named tensors over x (axis 1), from an onnxruntime run."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None) for k in keys)
    with Runner(copy, device="cpu") as session:
        outs = session.run(keys, {"input": x})
    return {k: v.mean(axis=(0,) + tuple(range(2, v.ndim))) for k, v in outs.items()}


def test_the_correction_moves_each_layer_mean_back_and_keeps_the_codes():
    base = prepare(zoo.conv_net(bn=True, channels=(3, 8, 16), seed=3))
    calib = calib_set(96, seed=2)
    plain = quantize(base, calib, QuantRecipe("MinMax", "reduced"))
    fixed, report = correct_quantization(base, plain, calib, method="bn", batch_size=48, device="cpu")
    assert report.method == "bn" and len(report.sites) == 4
    fake_plain, fake_fixed = dequantize_weights(plain)[0], dequantize_weights(fixed)[0]
    twin, matched = float_twin(base, fake_plain)
    keys = sorted(matched)
    x = calib.feeds["input"]
    want = layer_means(twin, keys, x)
    before, after = layer_means(fake_plain, keys, x), layer_means(fake_fixed, keys, x)
    gap_before = sum(np.abs(before[k] - want[k]).sum() for k in keys)
    gap_after = sum(np.abs(after[k] - want[k]).sum() for k in keys)
    assert gap_after < 0.25 * gap_before  # exactly the float means on the calibration data, up to rounding
    for name in float_weights(base):
        old_codes, old_scale = codes_of(plain, name)
        new_codes, new_scale = codes_of(fixed, name)
        assert np.array_equal(old_codes, new_codes)  # the factor went into the scales
        assert not np.array_equal(old_scale, new_scale)


def amplified_oracle(model, x):
    """zoo.amplified_channel in numpy, from its initializers."""
    from oracles import conv3x3

    a = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = np.maximum(conv3x3(x.astype(np.float64), a["conv1.w"]) + a["conv1.b"].reshape(1, -1, 1, 1), 0)
    h = np.maximum(conv3x3(h, a["conv2.w"]) + a["conv2.b"].reshape(1, -1, 1, 1), 0)
    return h.mean(axis=(2, 3)) @ a["fc.w"].T + a["fc.b"]


def test_a_layer_that_amplifies_a_crushed_channel_is_left_in_float_with_its_input():
    """conv1's channel 0 is 1000 times smaller than the others where onnxruntime quantizes conv1's output per
    tensor, and conv2 multiplies it back: conv2 adds by far the most error, and leaving it in float with its input
    (conv1 and the Relu too) is better on the held-out half, so to_int8 does; the other layers stay int8."""
    from asr_onnx.quantize.int8 import to_int8
    from asr_onnx.quantize.layers import added_errors, float_nodes_for

    model, feeds = zoo.amplified_channel()
    x = feeds["input"]
    want = amplified_oracle(model, x)
    assert np.abs(run(model, x) - want).max() <= 1e-4 * np.abs(want).max()
    base = prepare(model)
    calib = zoo.DictSet(feeds)
    plain = quantize(base, calib, QuantRecipe("MinMax", "reduced"))
    added = added_errors(base, plain, calib)
    assert max(added, key=added.get) == "conv2" and added["conv2"] > 5 * max(added["conv1"], added["fc"])
    assert float_nodes_for(base, "conv2") == ["conv2", "relu1", "conv1"] and float_nodes_for(base, "conv1") == ["conv1"]
    int8, entry = to_int8(model, calib, correction="none")
    floats = entry["float_layers"]
    assert floats["picked"] == ["conv2"] and [c["picked"] for c in floats["candidates"]][:2] == [False, True]
    assert floats["candidates"][1]["logit_rel_l2"] < 0.5 * floats["candidates"][0]["logit_rel_l2"]
    assert {row["name"]: row["quantized"] for row in entry["layers"]} == {"conv1": False, "conv2": False, "fc": True}
    assert np.linalg.norm(run(int8, x) - want) < 0.05 * np.linalg.norm(want)


def test_the_tensorrt_target_has_symmetric_int8_activations():
    base = prepare(zoo.conv_net(bn=True, channels=(3, 8, 16)))
    model = quantize(base, calib_set(), QuantRecipe("MinMax", "full", "tensorrt"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()
                               for n in activations)
    assert all(np.abs(t.signed()).max() == 127 for t in quantized_tensors(model).values() if t.codes.dtype == np.int8)


def test_an_opset_11_model_gets_opset_13_for_its_per_channel_scales():
    """onnxruntime's quantizer writes a per-channel DequantizeLinear's axis whatever the opset; under 13 the
    model would not load (the PP-OCR classifier is opset 11)."""
    base = prepare(zoo.conv_net(bn=True, opset=11))
    assert [o.version for o in base.opset_import if o.domain == ""] == [13]
    model = quantize(base, calib_set(), QuantRecipe())
    x = zoo.random_inputs(8, seed=3)
    got, want = run(model, x), run(zoo.conv_net(bn=True, opset=11), x)
    assert np.linalg.norm(got - want) <= 0.1 * np.linalg.norm(want)


def write_inputs(tmp_path):
    source, calib = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(zoo.conv_net(bn=True, channels=(3, 8, 16)), source)
    np.save(calib, zoo.random_inputs(48, seed=1))
    return source, calib


def test_int8_needs_calibration_data_and_a_float_model(tmp_path, capsys):
    from asr_onnx.cli.main import main

    source, calib = write_inputs(tmp_path)
    out = tmp_path / "out.onnx"
    code = main(["repair", str(source), "--sparsity", "0.5", "--method", "none", "--int8", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: --calib is required for --int8\n" and not out.exists()
    model, _ = zoo.qdq_residual()
    onnx.save(model, source)
    code = main(["repair", str(source), "--calib", str(calib), "--sparsity", "0.5", "--int8", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --int8: the model is quantized already") and not out.exists()
    assert len(err.splitlines()) == 1


def test_the_cli_writes_an_int8_model_and_its_quantization_report(tmp_path, capsys):
    from asr_onnx.cli.main import main

    source, calib = write_inputs(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(["repair", str(source), "--calib", str(calib), "--pattern", "2:4", "--int8", "--batch-size", "24",
                 "--report", str(report), "-o", str(out)])
    printed = capsys.readouterr()
    stages = [line.split()[0] for line in printed.err.splitlines()]  # off a TTY: a line per stage, nothing else
    assert code == 0 and "int8" in stages and all(re.fullmatch(r"\w+ done in [\d.]+ s", line)
                                                   for line in printed.err.splitlines())
    assert "int8 QDQ for onnxruntime on the CPU" in printed.out and "2:4 in the int8 weights: 3 of the 3" in printed.out
    written = onnx.load(out)
    saved = json.loads(report.read_text())
    assert quantized_tensors(written) and saved["quantization"]["format"] == "QDQ"
    # the guard scored the float32 repair: the verdict is of the INT8 model shipped, scored on the calibration data
    assert "before INT8" in saved["verdict"]["reason"] and "calibration samples, not held out" in saved["verdict"]["reason"]
    assert onnx.load(source).graph.node[0].op_type == "Conv"  # the input is untouched


def test_bench_times_int8_against_dense_and_float_and_says_what_each_is_for(repaired, tmp_path, capsys,
                                                                           monkeypatch):
    from asr_onnx.cli.main import main

    float_model, job = repaired
    paths = {key: tmp_path / f"{key}.onnx" for key in ("int8", "dense", "float")}
    for key, model in (("int8", job.output), ("dense", job.dense), ("float", float_model)):
        onnx.save(model, paths[key])
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    args = ["bench", str(paths["int8"]), "--reference", str(paths["dense"]), "--float", str(paths["float"]),
            "--runs", "3", "--warmup", "1", "--threads", "1", "--batch-size", "4"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    models = result["models"]
    assert [models[k]["precision"] for k in ("model", "reference", "float")] == ["int8 (QDQ)", "float32", "float32"]
    assert models["model"]["runtime"].startswith("onnxruntime (its uint8 activations have zero points")
    assert result["schedule"][:3] == ["model", "reference", "float"] and len(result["schedule"]) == 9
    assert result["speedup_float"] > 0 and 0 < result["output_rel_l2_float"] < 0.1
    assert "--int8" in result["trtexec"]["command"] and "--sparsity=enable" in result["trtexec"]["command"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "model     is int8 (QDQ), for onnxruntime" in text and "against float (float median / model median)" in text


def test_every_layer_is_int8_when_no_float_layer_is_asked(repaired):
    from asr_onnx.quantize.int8 import to_int8

    float_model, job = repaired
    entry = job.quantization
    assert entry["float_layers"] == {"picked": [], "candidates": [], "rule": "none: every layer int8, as asked"}
    assert all(row["quantized"] for row in entry["layers"]) and len(entry["layers"]) == 4
    with pytest.raises(AsrError, match="float_layers must be auto or none"):
        to_int8(float_model, calib_set(), float_layers="some")
