"""Small real ONNX graphs built with onnx.helper, for the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inits, inputs, outputs, opset=17, metadata=None):
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="asr-onnx-tests")
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def conv_net(seed=0, bn=True, channels=(3, 8, 16), classes=10, size=8, batch="N", opset=17, eps=1e-5):
    """Conv -> [BN] -> Relu -> Conv -> [BN] -> Relu (+ residual 1x1) -> GAP -> Flatten -> Gemm.

    With ``bn=False`` the convs carry biases, as in an eval-mode export with BN folded.
    """
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    nodes, inits = [], []

    def conv(name, x, cin, cout, k, with_bias):
        w = rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32)
        inits.append(_init(f"{name}.weight", w))
        ins = [x, f"{name}.weight"]
        if with_bias:
            inits.append(_init(f"{name}.bias", rng.normal(0, 0.1, cout).astype(np.float32)))
            ins.append(f"{name}.bias")
        nodes.append(helper.make_node("Conv", ins, [f"{name}.out"], name=name, pads=[k // 2] * 4))
        return f"{name}.out"

    def norm(name, x, c):
        if not bn:
            return x
        inits.extend([
            _init(f"{name}.scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            _init(f"{name}.bias", rng.normal(0, 0.1, c).astype(np.float32)),
            _init(f"{name}.mean", rng.normal(0, 0.1, c).astype(np.float32)),
            _init(f"{name}.var", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        ])
        nodes.append(helper.make_node(
            "BatchNormalization", [x] + [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")],
            [f"{name}.out"], name=name, epsilon=eps))
        return f"{name}.out"

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [x + ".relu"]))
        return x + ".relu"

    h = relu(norm("bn1", conv("conv1", "input", c0, c1, 3, not bn), c1))
    main = norm("bn2", conv("conv2", h, c1, c2, 3, not bn), c2)
    skip = norm("bn3", conv("proj", h, c1, c2, 1, not bn), c2)
    nodes.append(helper.make_node("Add", [main, skip], ["sum"]))
    h = relu("sum")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(_init("fc.weight", rng.normal(0, (1 / c2) ** 0.5, (classes, c2)).astype(np.float32)))
    inits.append(_init("fc.bias", np.zeros(classes, np.float32)))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c0, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return make_model(nodes, inits, inputs, outputs, opset=opset)


def random_inputs(n=32, shape=(3, 8, 8), seed=1):
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


class ArraySet:
    """A minimal calibration set over in-memory arrays (the real one lives in asr_onnx.calib)."""

    def __init__(self, x, name="input", labels=None):
        self.x, self.name, self.labels = x, name, labels

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size):
        for i in range(0, len(self.x), batch_size):
            yield {self.name: self.x[i : i + batch_size]}


def sweep_inputs(folder):
    """A BN conv net, a 32-sample calibration folder and a labelled 20-sample eval set under ``folder``."""
    model, calib, eval_path = folder / "m.onnx", folder / "calib", folder / "eval.npz"
    onnx.save(conv_net(bn=True), model)
    calib.mkdir()
    np.save(calib / "x.npy", random_inputs(32))
    np.savez(eval_path, x=random_inputs(20, seed=4), y=np.arange(20) % 10)
    return model, calib, eval_path
