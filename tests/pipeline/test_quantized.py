"""Quantized graphs (QDQ, ConvInteger, MatMulInteger): their weights are integers, so nothing is pruned.
``--sparsity 0 --method none`` is the identity, pruning them is one error line, and onnxruntime's own
log stays quiet. The zoo graphs are checked against numpy first, so that the identity is of a real model."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import numpy_helper
from oracles import conv3x3

from asr_onnx.pipeline.driver import repair


def arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def quantize(x, scale, zero):
    return np.clip(np.round(x / scale) + zero, 0, 255)  # uint8; np.round rounds half to even, as ONNX does


def qdq(x, scale, zero=128):
    return (quantize(x, scale, zero) - zero) * scale


def oracle(name, model, x):
    """The zoo graph computed in numpy from its initializers."""
    a = arrays(model)
    x = x.astype(np.float64)
    if name == "qdq_conv":
        conv_w, fc_w = (a[k].astype(np.float64) * float(a[s]) for k, s in (("wq6", "ws7"), ("wq23", "ws24")))
        h = np.maximum(conv3x3(qdq(x, 0.05), conv_w) + a["b10"].reshape(1, -1, 1, 1), 0)
        h = qdq(qdq(h, 0.02).mean(axis=(2, 3)), 0.02)
        return h @ fc_w.T
    q = quantize(x, 0.05, 128) - 128
    h = np.maximum(conv3x3(q, a["w3"].astype(np.float64)) * np.float32(0.05 * 0.01), 0).mean(axis=(2, 3))
    return ((quantize(h, 0.05, 128) - 128) @ a["w12"].astype(np.float64)) * np.float32(0.05 * 0.01)


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
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


@pytest.mark.parametrize("name", list(zoo.QUANTIZED))
def test_sparsity_0_is_the_identity(name):
    model, feeds = zoo.QUANTIZED[name]()
    calib = zoo.DictSet(feeds)
    for method in ("none", "bn"):
        job = repair(model, calib, sparsity=0.0, method=method, batch_size=zoo.N, device="cpu", progress=False)
        assert sorted(map(str, job.output.graph.node)) == sorted(map(str, model.graph.node))
        used = {name for node in model.graph.node for name in node.input}
        assert {k: v.tobytes() for k, v in arrays(job.output).items()} == \
            {k: v.tobytes() for k, v in arrays(model).items() if k in used}  # only the unused one is dropped
        np.testing.assert_array_equal(run(job.output, feeds["input"]), run(model, feeds["input"]))


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
    pruned = cli("repair", source, "--calib", calib, "--sparsity", "0.5", "-o", tmp_path / "pruned.onnx")
    assert pruned.returncode == 1 and pruned.stdout == ""
    assert pruned.stderr.splitlines() == [pruned.stderr.strip()] and "no prunable layer" in pruned.stderr
    assert pruned.stderr.startswith("error: ") and not (tmp_path / "pruned.onnx").exists()
