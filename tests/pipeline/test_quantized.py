"""Quantized graphs. A QDQ model (int8 weights behind DequantizeLinear) is pruned and repaired on its weights
seen in float, then quantized again with its own scales where the repaired weights still fit them;
``--sparsity 0`` gives the input model back, byte for byte. An integer-op model (ConvInteger,
MatMulInteger) has no float weight to prune: ``--sparsity 0 --method none`` is the identity, pruning it is
one error line. onnxruntime's own log stays quiet. The zoo graphs are checked against numpy first, so that
the identity is of a real model."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import numpy_helper
from oracles import conv3x3

from asr_onnx.model.qdq import dequantize_weights, quantized_tensors, same_model
from asr_onnx.model.requantize import requantize
from asr_onnx.pipeline.driver import Repair, repair


def arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def quantize(x, scale, zero):
    return np.clip(np.round(x / scale) + zero, 0, 255)  # uint8; np.round rounds half to even, as ONNX does


def qdq(x, scale, zero=128):
    return (quantize(x, scale, zero) - zero) * scale


def residual_oracle(model, x):
    """zoo.qdq_residual in numpy, from its initializers."""
    a = arrays(model)

    def act(v, name):
        return qdq(v, float(a[f"{name}.s"]), float(a[f"{name}.z"]))

    def layer(name):
        codes, scale = a[f"{name}.w_q"].astype(np.float64), a[f"{name}.w_s"].astype(np.float64)
        return codes * scale.reshape((-1,) + (1,) * (codes.ndim - 1)), a[f"{name}.b_q"] * a[f"{name}.b_s"].astype(
            np.float64)

    (w1, b1), (w2, b2), (wf, bf) = layer("conv1"), layer("conv2"), layer("fc")
    h1 = act(conv3x3(act(x.astype(np.float64), "x"), w1) + b1.reshape(1, -1, 1, 1), "h1")
    h3 = act(act(conv3x3(h1, w2) + b2.reshape(1, -1, 1, 1), "h2") + h1, "h3")
    return act(act(h3.mean(axis=(2, 3)), "pool") @ wf.T + bf, "logits")


def oracle(name, model, x):
    """The zoo graph computed in numpy from its initializers."""
    a = arrays(model)
    x = x.astype(np.float64)
    if name == "qdq_residual":
        return residual_oracle(model, x)
    if name == "qdq_conv":
        conv_w, fc_w = (a[k].astype(np.float64) * float(a[s]) for k, s in (("wq6", "ws7"), ("wq23", "ws24")))
        h = np.maximum(conv3x3(qdq(x, 0.05), conv_w) + a["b10"].reshape(1, -1, 1, 1), 0)
        h = qdq(qdq(h, 0.02).mean(axis=(2, 3)), 0.02)
        return h @ fc_w.T
    q = quantize(x, 0.05, 128) - 128
    h = np.maximum(conv3x3(q, a["w3"].astype(np.float64)) * np.float32(0.05 * 0.01), 0).mean(axis=(2, 3))
    return ((quantize(h, 0.05, 128) - 128) @ a["w12"].astype(np.float64)) * np.float32(0.05 * 0.01)


def run(model, x, optimize=True):
    """onnxruntime's own session, with its defaults (graph optimisations on, WeightBiasQuantization included)."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("name", list(zoo.QUANTIZED))
def test_the_zoo_graph_computes_what_numpy_does(name):
    model, feeds = zoo.QUANTIZED[name]()
    got, want = run(model, feeds["input"]), oracle(name, model, feeds["input"])
    assert got.shape == want.shape == (zoo.N, 5)
    error = np.abs(got - want).max(axis=1)
    # onnxruntime runs the QDQ conv in integers, numpy in float64: a value on a rounding boundary may
    # land one quantization step (0.02 of the pooled features) away, on a few samples at most
    assert np.mean(error <= 1e-4 * np.abs(want).max()) >= 0.9
    a = arrays(model)
    step = 0.02 * np.abs(a["wq23"] * a["ws24"]).sum(axis=1).max() if name == "qdq_conv" else 0.0
    assert error.max() <= 1e-4 * np.abs(want).max() + step


@pytest.mark.parametrize("name", zoo.QDQ)
def test_the_float_form_computes_what_the_qdq_model_does_and_quantizes_back_to_it(name):
    model, feeds = zoo.QUANTIZED[name]()
    fake, tensors = dequantize_weights(model)
    assert tensors and not any(n.op_type == "DequantizeLinear" and n.output[0] in tensors for n in fake.graph.node)
    assert all(numpy_helper.to_array(t).dtype == np.float32 for t in fake.graph.initializer if t.name in tensors)
    x = feeds["input"]
    np.testing.assert_array_equal(run(fake, x, optimize=False), run(model, x, optimize=False))
    # as asr-onnx's sessions run it: onnxruntime's WeightBiasQuantization would quantize the float weights again
    from asr_onnx.model.session import Runner

    with Runner(fake, device="cpu") as session:
        got = session.run(None, {"input": x})["logits" if name == "qdq_residual" else session.output_names[0]]
    np.testing.assert_allclose(got, run(model, x), atol=1e-5)
    back = requantize(fake, tensors)
    assert same_model(back, model)
    onnx.checker.check_model(back, full_check=True)


def test_weight_bias_quantization_would_change_the_float_form():
    """Why asr-onnx's sessions disable onnxruntime's WeightBiasQuantization: with it (onnxruntime's default)
    the float form of the QDQ model no longer computes what the QDQ model does."""
    model, feeds = zoo.qdq_residual()
    fake, _ = dequantize_weights(model)
    x = feeds["input"]
    assert not np.allclose(run(fake, x), run(model, x), atol=1e-5)


def test_requantize_keeps_codes_under_a_rescale_rounds_what_fits_and_rescales_what_does_not():
    model, _ = zoo.qdq_residual()
    fake, tensors = dequantize_weights(model)
    a = arrays(fake)
    w, b = a["conv2.w"].astype(np.float64), a["conv2.b"].astype(np.float64)
    codes, scale = arrays(model)["conv2.w_q"], arrays(model)["conv2.w_s"]
    w[0] *= 1.3  # a correction folded into the weight: the codes stay, the scale takes the factor
    w[1, :4] = 0  # pruned
    w[2] += 0.2 * scale[2]  # a refit that still fits the old scale: rounded at it
    w[3] *= 3.0  # no longer fits 63 steps: a new scale
    w[3, 0, 0, 0] += 0.1 * scale[3]
    b[0] *= 1.3
    inits = [numpy_helper.from_array(w.astype(np.float32), "conv2.w") if t.name == "conv2.w" else
             numpy_helper.from_array(b.astype(np.float32), "conv2.b") if t.name == "conv2.b" else t
             for t in fake.graph.initializer]
    del fake.graph.initializer[:]
    fake.graph.initializer.extend(inits)
    log = []
    out = arrays(requantize(fake, tensors, log))
    new_codes, new_scale = out["conv2.w_q"], out["conv2.w_s"]
    np.testing.assert_array_equal(new_codes[0], codes[0])
    assert new_scale[0] == np.float32(scale[0] * 1.3)
    assert np.all(new_codes[1, :4] == 0) and np.array_equal(new_codes[1, 4:], codes[1, 4:])
    assert new_scale[2] == scale[2] and np.array_equal(new_codes[2], np.round(w[2] / scale[2]))
    assert new_scale[3] > 2.9 * scale[3] and np.abs(new_codes[3]).max() == 63
    assert np.array_equal(new_scale[4:], scale[4:]) and np.array_equal(new_codes[4:], codes[4:])
    # the bias scale follows its weight's, so that the integer kernel's input x weight scale still holds
    assert np.isclose(out["conv2.b_s"][0], arrays(model)["conv2.b_s"][0] * 1.3, rtol=1e-6)
    assert np.array_equal(out["conv2.b_s"][4:], arrays(model)["conv2.b_s"][4:])
    assert abs(out["conv2.b_q"][0] * np.float64(out["conv2.b_s"][0]) - b[0]) <= out["conv2.b_s"][0]
    entry = next(e for e in log if e["layer"] == "conv2")
    assert entry == {"layer": "conv2", "weight": "conv2.w", "channels": 8, "kept": 5, "rescaled": 1, "rounded": 1,
                     "new_scale": 1}


@pytest.mark.parametrize("name", list(zoo.QUANTIZED))
def test_sparsity_0_is_the_identity(name):
    model, feeds = zoo.QUANTIZED[name]()
    calib = zoo.DictSet(feeds)
    for method in ("none", "bn"):
        job = repair(model, calib, sparsity=0.0, method=method, batch_size=zoo.N, device="cpu", progress=False)
        if name in zoo.QDQ:  # the input model itself, every byte of it
            assert job.output.SerializeToString() == model.SerializeToString()
            assert job.report()["quantization"]["unchanged"] is True
            continue
        assert sorted(map(str, job.output.graph.node)) == sorted(map(str, model.graph.node))
        used = {name for node in model.graph.node for name in node.input}
        assert {k: v.tobytes() for k, v in arrays(job.output).items()} == \
            {k: v.tobytes() for k, v in arrays(model).items() if k in used}  # only the unused one is dropped
        np.testing.assert_array_equal(run(job.output, feeds["input"]), run(model, feeds["input"]))


@pytest.mark.parametrize("pattern", ["global", "2:4"])
def test_a_qdq_model_is_pruned_on_its_float_weights_repaired_and_quantized_again(pattern):
    model, feeds = zoo.qdq_residual()
    calib = zoo.DictSet(feeds)
    job = Repair(model, device="cpu", progress=False, batch_size=zoo.N).prune(0.5, pattern)
    pruned = {layer: arrays(job.pruned_alone)[f"{layer}.w"] for layer in ("conv1", "conv2", "fc")}
    assert all(np.mean(w == 0) >= 0.2 for layer, w in pruned.items() if layer != "conv1" or pattern == "global")
    job.run(calib, "bn", guard="off")
    out = job.output
    onnx.checker.check_model(out, full_check=True)
    tensors = quantized_tensors(out)
    assert {t.output for t in tensors.values()} >= {"conv1.w", "conv2.w", "fc.w", "conv1.b", "conv2.b", "fc.b"}
    for layer, values in pruned.items():
        codes = arrays(out)[f"{layer}.w_q"]
        assert codes.dtype == np.int8 and np.all(codes[values == 0] == 0)  # pruned: code 0, the zero point
    original = arrays(model)
    for layer in ("conv2", "fc"):  # only pruned and corrected: the codes kept, each scale times its gain
        kept = original[f"{layer}.w_q"] * (pruned[layer] != 0)
        assert np.array_equal(arrays(out)[f"{layer}.w_q"], kept)
    got, alone = run(out, feeds["input"]), run(requantize(job.pruned_alone, dequantize_weights(model)[1]),
                                                   feeds["input"])
    dense = run(model, feeds["input"])
    assert np.linalg.norm(got - dense) < np.linalg.norm(alone - dense)  # the repair helps
    report = job.report()
    entry = report["quantization"]
    assert entry["input"] == "quantized" and entry["unchanged"] is False
    assert sum(t["channels"] for t in entry["tensors"]) == 8 + 8 + 5
    if pattern == "2:4":
        rows = {row["name"]: row for row in report["sparse_core"]}
        assert rows["conv2"]["nm_24"] == rows["fc"]["nm_24"] == "yes" and rows["conv2"]["precision"] == "int8"
    from asr_onnx.report.build import summary

    assert "int8 (QDQ input, quantized again): weight channels" in summary(report)


def test_a_quantized_model_refuses_channel_pruning_fp16_and_int8():
    from asr_onnx.errors import AsrError

    model, feeds = zoo.qdq_residual()
    with pytest.raises(AsrError, match="channel pruning of a quantized"):
        Repair(model, device="cpu").prune(0.5, "channels")
    job = repair(model, zoo.DictSet(feeds), sparsity=0.5, method="none", device="cpu", progress=False)
    with pytest.raises(AsrError, match="quantized"):
        job.to_fp16()
    with pytest.raises(AsrError, match="quantized already"):
        job.to_int8(zoo.DictSet(feeds))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "asr_onnx.cli.main", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("name", zoo.slow_except(list(zoo.QUANTIZED), ("qdq_conv",)))  # one CLI path for both
def test_the_cli_prints_one_error_line_and_no_onnxruntime_log(name, tmp_path):
    model, feeds = zoo.QUANTIZED[name]()
    source, calib = tmp_path / "q.onnx", tmp_path / "x.npy"
    onnx.save(model, source)
    np.save(calib, feeds["input"])
    same = cli("repair", source, "--calib", calib, "--sparsity", "0", "--batch-size", zoo.N, "-q",
               "-o", tmp_path / "same.onnx")
    assert same.returncode == 0 and same.stderr == "" and same.stdout == ""
    if name in zoo.QDQ:
        assert (tmp_path / "same.onnx").read_bytes() == source.read_bytes()
    pruned = cli("repair", source, "--calib", calib, "--sparsity", "0.5", "--batch-size", zoo.N, "-q",
                 "-o", tmp_path / "pruned.onnx")
    if name in zoo.QDQ:  # pruned on its float weights, quantized again
        assert pruned.returncode == 0 and pruned.stderr == "" and pruned.stdout == ""
        assert quantized_tensors(onnx.load(tmp_path / "pruned.onnx"))
        return
    assert pruned.returncode == 1 and pruned.stdout == ""
    assert pruned.stderr.splitlines() == [pruned.stderr.strip()] and "no prunable layer" in pruned.stderr
    assert pruned.stderr.startswith("error: ") and not (tmp_path / "pruned.onnx").exists()
