"""Every fixture graph of the tests, built with onnx.helper: the one builder.

``conv_net()`` is the plain model most unit tests use (``random_inputs``, ``ArraySet`` and ``sweep_inputs``
feed it). Each exporter-shaped builder below it returns ``(model, feeds)``: a checked onnx.ModelProto and a
dict of calibration arrays keyed by input name; ``CLASSES`` lists them for tests/test_graphs.py, whose
numpy oracle checks each. Every graph has a few channels and 8x8 (or length-16) inputs, so a test runs in
well under a second.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

N = 24  # calibration samples


def slow_except(values, default_run) -> list:
    """``values`` as pytest parameters, each one not in ``default_run`` marked ``slow`` (run by ``-m slow``)."""
    return [pytest.param(v, marks=() if v in default_run else pytest.mark.slow) for v in values]


# --------------------------------------------------------------------------- the plain conv net
# conv_net(): the model most unit tests use; random_inputs(), ArraySet and sweep_inputs() feed it.


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


# --------------------------------------------------------------------------- exporter shapes


class G:
    """A graph under construction: nodes, initializers and a seeded generator."""

    def __init__(self, seed=0, dtype=np.float32):
        self.rng, self.dtype = np.random.default_rng(seed), np.dtype(dtype)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}{self.count}"

    def init(self, hint, array, dtype=None):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype or self.dtype), name))
        return name

    def weight(self, shape, fan_in):
        return self.rng.normal(0, (2 / fan_in) ** 0.5, shape)

    def node(self, op, inputs, hint=None, domain=None, **attrs):
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, bias=True, group=1, shape=None, **attrs):
        w = self.weight(shape or (cout, cin // group, k, k), cin // group * k * k)
        ins = [x, self.init("w", w)] + ([self.init("b", self.rng.normal(0, 0.1, cout))] if bias else [])
        pads = attrs.pop("pads", [k // 2 * attrs.get("dilations", [1])[0]] * 4)
        return self.node("Conv", ins, "conv", group=group, pads=pads, **attrs)

    def bn(self, x, c, eps=1e-5):
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.1, c), self.rng.normal(0, 0.1, c),
                  self.rng.uniform(0.5, 2.0, c)]
        return self.node("BatchNormalization", [x] + [self.init("bn", p) for p in params], "bn", epsilon=eps)

    def relu(self, x):
        return self.node("Relu", [x])

    def head(self, x, c, classes=5):
        flat = self.node("Flatten", [self.node("GlobalAveragePool", [x])])
        w, b = self.init("fc", self.weight((classes, c), c)), self.init("fcb", np.zeros(classes))
        return self.node("Gemm", [flat, w, b], "fc", transB=1)

    def model(self, inputs, output, opset=17, out_shape=None, ir=8, extra_opsets=()):
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        ins = [helper.make_tensor_value_info(n, t or elem, s) for n, s, t in inputs]
        outs = [helper.make_tensor_value_info(output, elem, out_shape)]
        graph = helper.make_graph(self.nodes, "zoo", ins, outs, self.inits)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="zoo")
        model.ir_version = ir
        if out_shape is None:  # the exporter's declared output shape, as shape inference finds it
            model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
        onnx.checker.check_model(model)
        return model


def _feed(shape, n=N, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(dtype)


# ---------------------------------------------------------------- 1. BN kept or folded


def bn_kept(opset=17):
    return conv_net(bn=True, opset=opset), {"input": random_inputs(N)}


def bn_folded(opset=17):
    return conv_net(bn=False, opset=opset), {"input": random_inputs(N)}


# ---------------------------------------------------------------- 2. decomposed BN


def decomposed_bn(chain=("Sub", "Mul", "Add")):
    """Conv (no bias) -> Sub/Mul/Add (or Mul/Add) with constant per-channel vectors -> Relu, twice."""
    g = G(2)
    h, cin = "input", 3
    for cout, shape in ((6, (6, 1, 1)), (8, (1, 8, 1, 1))):
        h = g.conv(h, cin, cout, bias=False)
        for op in chain:
            const = g.rng.uniform(0.5, 1.5, shape) if op == "Mul" else g.rng.normal(0, 0.1, shape)
            h = g.node(op, [h, g.init(op.lower(), const)])
        h, cin = g.relu(h), cout
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(h, cin)), {"input": random_inputs(N)}


# ---------------------------------------------------------------- 3. NHWC with Transpose and Cast


def nhwc():
    """A Keras-style graph: NHWC input, Transpose around every Conv, no-op Casts in between (one between a
    Conv and its BN), and a Dense layer (MatMul + Add) applied to the 4-D NHWC tensor."""
    g = G(3)
    h, cin = "input", 3
    for cout in (6, 8):
        h = g.node("Transpose", [g.node("Cast", [h], to=TensorProto.FLOAT)], perm=[0, 3, 1, 2])
        h = g.conv(h, cin, cout)
        if cout == 8:
            h = g.bn(g.node("Cast", [h], to=TensorProto.FLOAT), cout)
        h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
        h, cin = g.relu(g.node("Cast", [h], to=TensorProto.FLOAT)), cout
    h = g.relu(g.node("Add", [g.node("MatMul", [h, g.init("pw", g.weight((8, 8), 8))]), g.init("pb", np.zeros(8))]))
    h = g.node("ReduceMean", [h], axes=[1, 2], keepdims=0)
    w, b = g.init("fc", g.weight((cin, 5), cin)), g.init("fcb", np.zeros(5))
    out = g.node("Add", [g.node("MatMul", [h, w]), b])
    return g.model([("input", ["N", 8, 8, 3], None)], out), {"input": _feed((8, 8, 3))}


# ---------------------------------------------------------------- 3c. Keras NHWC ResNets, as two exporters write them


KERAS_BLOCKS = ((1, 4, 1), (4, 4, 1), (4, 8, 2))  # (in, out, stride) per residual block, after a 1 -> 4 stem


def keras_resnet_weights(seed=21):
    """The weights of a small Keras NHWC ResNet (benchmarks/make_keras_resnet.py in miniature): a stem conv
    and residual blocks of two 3x3 convs (a 1x1 strided projection where the shape changes), each conv
    followed by an inference-mode BN given as a per-channel scale and shift; then global average pooling
    and a Dense layer to 5 classes. Conv weights in Keras's HWIO layout."""
    rng = np.random.default_rng(seed)

    def conv(cin, cout, k=3):
        return {"w": rng.normal(0, (2 / (cin * k * k)) ** 0.5, (k, k, cin, cout)), "scale": rng.uniform(0.5, 1.5, cout),
                "shift": rng.normal(0, 0.1, cout)}

    blocks = [{"a": conv(cin, cout), "b": conv(cout, cout), "stride": stride,
               "skip": conv(cin, cout, 1) if (cin, stride) != (cout, 1) else None}
              for cin, cout, stride in KERAS_BLOCKS[1:]]
    return {"stem": conv(1, 4), "blocks": blocks, "dense": rng.normal(0, 0.5, (8, 5)), "bias": rng.normal(0, 0.1, 5)}


def keras_resnet_oracle(weights, x):
    """The numpy forward pass of :func:`keras_resnet_weights` on NHWC ``x`` (float64): the oracle for both
    exports of :func:`keras_resnet`. "same" padding as Keras pads a strided conv: the extra pixel at the end."""
    def conv(h, layer, stride=1):
        k = layer["w"].shape[0]
        total = max(k - stride, 0) if h.shape[1] % stride == 0 else max(k - h.shape[1] % stride, 0)
        h = np.pad(h, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
        out = (h.shape[1] - k) // stride + 1
        patches = np.stack([h[:, i:i + stride * out:stride, j:j + stride * out:stride] for i in range(k)
                            for j in range(k)], axis=3)  # (N, out, out, k*k, cin)
        y = np.einsum("nhwpc,pco->nhwo", patches, layer["w"].reshape(k * k, *layer["w"].shape[2:]))
        return y * layer["scale"] + layer["shift"]

    h = np.maximum(conv(x.astype(np.float64), weights["stem"]), 0)
    for block in weights["blocks"]:
        skip = h if block["skip"] is None else conv(h, block["skip"], block["stride"])
        h = np.maximum(conv(np.maximum(conv(h, block["a"], block["stride"]), 0), block["b"]) + skip, 0)
    return h.mean(axis=(1, 2)) @ weights["dense"] + weights["bias"]


def keras_resnet(exporter="tf2onnx", seed=21):
    """:func:`keras_resnet_weights` as ONNX, the way each exporter writes a Keras NHWC ResNet (see the
    exports of benchmarks/make_keras_resnet.py):

    - ``tf2onnx``: the one-channel NHWC input turned NCHW by a Reshape to (-1, 1, H, W); every BN folded into
      its Conv (a bias); NCHW all the way, GlobalAveragePool, Squeeze and a MatMul + Add head;
    - ``keras_torch`` (Keras 3 on the torch backend, through torch.onnx): NHWC between the layers, a Transpose
      on each side of every Conv and Casts around it, each BN a Sub/Mul/Add on the channel-last tensor, a strided
      conv's "same" padding an explicit Pad, and ReduceMean over (H, W) before the MatMul + Add head.
    """
    weights, g = keras_resnet_weights(seed), G(seed)

    def conv(h, layer, stride=1):
        k = layer["w"].shape[0]
        w = layer["w"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if exporter == "tf2onnx":
            pads = [k // 2] * 4 if stride == 1 else [0, 0, k - stride, k - stride] if k > stride else [0] * 4
            return g.node("Conv", [h, g.init("w", w * layer["scale"][:, None, None, None]),
                                   g.init("b", layer["shift"])], "conv", pads=pads, strides=[stride] * 2)
        h = g.node("Transpose", [g.node("Cast", [h], to=TensorProto.FLOAT)], perm=[0, 3, 1, 2])
        if stride > 1 and k > stride:  # Keras pads the end only
            h = g.node("Pad", [h, g.init("pads", [0, 0, 0, 0, 0, 0, k - stride, k - stride], np.int64)])
        pads = [k // 2] * 4 if stride == 1 else [0] * 4
        h = g.node("Transpose", [g.node("Conv", [h, g.init("w", w)], "conv", pads=pads, strides=[stride] * 2)],
                   perm=[0, 2, 3, 1])
        mean = g.rng.normal(0, 0.5, layer["shift"].shape)  # y * scale + shift == (y - mean) * scale + beta
        h = g.node("Sub", [g.node("Cast", [h], to=TensorProto.FLOAT), g.init("mean", mean)])
        return g.node("Add", [g.node("Mul", [h, g.init("scale", layer["scale"])]),
                              g.init("beta", layer["shift"] + mean * layer["scale"])])

    if exporter == "tf2onnx":
        h = g.node("Reshape", ["input", g.init("shape", [-1, 1, 8, 8], np.int64)])
    else:
        h = "input"
    h = g.relu(conv(h, weights["stem"]))
    for block in weights["blocks"]:
        skip = h if block["skip"] is None else conv(h, block["skip"], block["stride"])
        h = g.relu(g.node("Add", [conv(g.relu(conv(h, block["a"], block["stride"])), block["b"]), skip]))
    if exporter == "tf2onnx":
        h = g.node("Squeeze", [g.node("GlobalAveragePool", [h]), g.init("axes", [2, 3], np.int64)])
    else:
        h = g.node("ReduceMean", [h, g.init("axes", [1, 2], np.int64)], keepdims=0)
    out = g.node("Add", [g.node("MatMul", [h, g.init("fc", weights["dense"])]), g.init("fcb", weights["bias"])])
    model = g.model([("input", ["N", 8, 8, 1], None)], out, opset=17 if exporter == "tf2onnx" else 20,
                    ir=8 if exporter == "tf2onnx" else 9)
    return model, {"input": _feed((8, 8, 1), seed=seed)}


# ---------------------------------------------------------------- 3b. a bias-less layer read by several nodes


def keras_shared_output():
    """Keras-style NHWC: a bias-less MatMul whose output is a graph output and also feeds a decomposed
    BN (Mul/Add) and a Sigmoid gate, so that a shift folded after it must rewire several consumers."""
    g = G(12)
    h = g.node("Transpose", [g.node("Cast", ["input"], to=TensorProto.FLOAT)], perm=[0, 3, 1, 2])
    h = g.relu(g.node("Transpose", [g.conv(h, 3, 6)], perm=[0, 2, 3, 1]))
    features = g.node("MatMul", [h, g.init("pw", g.weight((6, 8), 6))])
    scaled = g.node("Add", [g.node("Mul", [features, g.init("s", g.rng.uniform(0.5, 1.5, 8))]),
                            g.init("t", g.rng.normal(0, 0.1, 8))])
    gated = g.node("Mul", [g.relu(scaled), g.node("Sigmoid", [features])])
    pooled = g.node("ReduceMean", [gated], axes=[1, 2], keepdims=0)
    out = g.node("Add", [g.node("MatMul", [pooled, g.init("fc", g.weight((8, 5), 8))]), g.init("fcb", np.zeros(5))])
    model = g.model([("input", ["N", 8, 8, 3], None)], out)
    model.graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT, ["N", 8, 8, 8]))
    onnx.checker.check_model(model)
    return model, {"input": _feed((8, 8, 3))}


# ---------------------------------------------------------------- 4. Constant-made weights, old opsets


def constant_weights(opset=11):
    """Weights from Constant and ConstantOfShape nodes; Sum, LRN, Dropout and Softmax elsewhere."""
    g = G(4)

    def constant(array):
        tensor = numpy_helper.from_array(np.asarray(array, np.float32), g.name("cval"))
        return g.node("Constant", [], "const", value=tensor)

    w1, b1 = constant(g.weight((6, 3, 3, 3), 27)), constant(g.rng.normal(0, 0.1, 6))
    a = g.node("Conv", ["input", w1, b1], "conv", pads=[1, 1, 1, 1])
    shape = g.node("Constant", [], "const", value=numpy_helper.from_array(np.array([6, 3, 1, 1], np.int64), "s"))
    fill = numpy_helper.from_array(np.array([0.05], np.float32), "fill")
    w2 = g.node("ConstantOfShape", [shape], "cos", value=fill)
    w2 = g.node("Add", [w2, constant(g.weight((6, 3, 1, 1), 3))])  # a folded weight, not a uniform one
    b = g.node("Conv", ["input", w2], "conv")
    h = g.relu(g.node("Sum", [a, b]))
    h = g.node("LRN", [h], size=3)
    h = g.node("Dropout", [h]) if opset >= 12 else g.node("Dropout", [h], ratio=0.5)
    w3, b3 = constant(g.weight((8, 6, 3, 3), 54)), constant(g.rng.normal(0, 0.1, 8))
    h = g.relu(g.node("Conv", [h, w3, b3], "conv", pads=[1, 1, 1, 1]))
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    out = g.node("Softmax", [g.node("Gemm", [flat, constant(g.weight((8, 5), 8)), constant(np.zeros(5))], "fc")], axis=1)
    return g.model([("input", ["N", 3, 8, 8], None)], out, opset=opset, ir=7 if opset >= 12 else 6), \
        {"input": random_inputs(N)}


# ---------------------------------------------------------------- 5. grouped and odd convs


def odd_convs():
    """Depthwise, grouped, dilated, strided, ConvTranspose (plain and grouped), with and without bias."""
    g = G(5)
    h = g.relu(g.conv("input", 3, 8, bias=False))
    h = g.relu(g.conv(h, 8, 8, group=8))  # depthwise
    h = g.relu(g.conv(h, 8, 8, group=2, bias=False, dilations=[2, 2]))
    h = g.relu(g.conv(h, 8, 12, strides=[2, 2]))  # 4x4
    w = g.init("wt", g.weight((12, 6, 2, 2), 12 * 4))
    h = g.relu(g.node("ConvTranspose", [h, w], "deconv", strides=[2, 2]))  # 8x8, 6 channels
    w, b = g.init("wt", g.weight((6, 4, 3, 3), 6 * 9 // 2)), g.init("bt", g.rng.normal(0, 0.1, 8))
    h = g.relu(g.node("ConvTranspose", [h, w, b], "deconv", group=2, pads=[1, 1, 1, 1]))  # 8 channels
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 8)), {"input": random_inputs(N)}


def conv1d():
    g = G(6)
    h = g.relu(g.conv("input", 4, 8, shape=(8, 4, 3), pads=[1, 1]))
    h = g.relu(g.conv(h, 8, 8, shape=(8, 4, 3), group=2, bias=False, pads=[2, 2], dilations=[2]))
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    out = g.node("Gemm", [flat, g.init("fc", g.weight((8, 5), 8)), g.init("b", np.zeros(5))], "fc")
    return g.model([("input", ["N", 4, 16], None)], out), {"input": _feed((4, 16))}


# ---------------------------------------------------------------- 6. fully connected heads


def fc_heads():
    """Reshape -> Gemm(transB=0) -> Relu -> Flatten -> Gemm(transB=1, alpha, beta) -> MatMul(+Add) -> MatMul."""
    g = G(7)
    h = g.relu(g.conv("input", 3, 4, strides=[2, 2]))  # (N, 4, 4, 4)
    h = g.node("Reshape", [h, g.init("shape", [-1, 64], np.int64)])
    h = g.relu(g.node("Gemm", [h, g.init("fc", g.weight((64, 16), 64)), g.init("b", g.rng.normal(0, .1, 16))], "fc"))
    h = g.node("Flatten", [h])
    w, b = g.init("fc", g.weight((12, 16), 16)), g.init("b", g.rng.normal(0, .1, 12))
    h = g.relu(g.node("Gemm", [h, w, b], "fc", transB=1, alpha=0.5, beta=2.0))
    h = g.relu(g.node("Add", [g.node("MatMul", [h, g.init("mm", g.weight((12, 10), 12))]),
                              g.init("mb", g.rng.normal(0, .1, 10))]))
    out = g.node("MatMul", [h, g.init("mm", g.weight((10, 5), 10))])
    return g.model([("input", ["N", 3, 8, 8], None)], out), {"input": random_inputs(N)}


# ---------------------------------------------------------------- 7. shared and branched


def shared_branched():
    """One weight used by two Convs, and a Conv output feeding a residual Add, a Conv and a Mul."""
    g = G(8)
    h = g.relu(g.conv("input", 3, 8))
    shared = g.init("shared", g.weight((8, 8, 3, 3), 72))
    a = g.node("Conv", [h, shared], "conv", pads=[1, 1, 1, 1])
    b = g.node("Conv", [g.relu(a), shared], "conv", pads=[1, 1, 1, 1])
    branch = g.node("Add", [a, g.relu(b)])  # a feeds a Relu and this residual Add
    gate = g.node("Mul", [branch, g.node("Sigmoid", [a])])  # and a third consumer
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(g.relu(gate), 8)), {"input": random_inputs(N)}


# ---------------------------------------------------------------- 8. batch and inputs


def fixed_batch_1():
    return conv_net(bn=False, batch=1), {"input": random_inputs(N)}


def fixed_batch_1_bn():
    return conv_net(bn=True, batch=1), {"input": random_inputs(N)}


def input_bn_batch_1():
    """A BN straight on a fixed-batch-of-1 input (a normalisation layer exported into the model)."""
    g = G(11)
    h = g.relu(g.conv(g.bn("input", 3), 3, 6))
    return g.model([("input", [1, 3, 8, 8], None)], g.head(h, 6)), {"input": random_inputs(N)}


def reshape_batch(batch=1, opset=9, mix=None):
    """An opset-9 AlexNet-like export with its batch in a Reshape: Conv (stride 2), Relu, LRN, MaxPool,
    Upsample x2 and MaxPool (an FPN-like detour: onnx's shape inference loses a symbolic batch in it),
    Conv, BN, Relu, MaxPool, ``Reshape(x, [batch, -1])``, Gemm, Relu, Gemm. ``batch="N"`` gives the
    same graph as a dynamic-batch export writes it (``[0, -1]``); ``mix`` adds a node that mixes the
    samples along axis 0 without changing the shape ("softmax" or "reduce"), which a batch of 1 hides."""
    g = G(13)
    h = g.node("LRN", [g.relu(g.conv("input", 3, 8, k=5, strides=[2, 2], pads=[2] * 4))], size=3)
    h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Upsample", [h, g.init("scales", [1, 1, 2, 2], np.float32)], mode="nearest")
    h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.relu(g.bn(g.conv(h, 8, 12), 12))
    h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    if mix == "softmax":
        h = g.node("Softmax", [h], axis=0)
    elif mix == "reduce":
        h = g.node("Sub", [h, g.node("ReduceMean", [h], axes=[0], keepdims=1)])
    h = g.node("Reshape", [h, g.init("shape", [0 if batch == "N" else batch, -1], np.int64)])
    h = g.relu(g.node("Gemm", [h, g.init("fc", g.weight((12 * 4 * 4, 16), 192)), g.init("fcb", np.zeros(16))]))
    out = g.node("Gemm", [h, g.init("fc", g.weight((16, 5), 16)), g.init("fcb", np.zeros(5))])
    model = g.model([("input", [batch, 3, 32, 32], None)], out, opset=opset)
    return model, {"input": _feed((3, 32, 32), seed=4)}


def shape_reshape_batch(batch=1):
    """A torch-style flatten: ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Constant [-1]))``
    before the head, opset 13, with shapes in value_info. With a batch of 1, importing the graph folds
    the Shape chain into the constant target ``[1, 384]``, which then names the batch."""
    g = G(30)
    h = g.relu(g.conv("input", 3, 6))
    rows = g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", [h]), g.init("i", np.array(0), np.int64)],
                                       axis=0), g.init("axes", np.array([0]), np.int64)])
    minus = g.node("Constant", [], value=helper.make_tensor("m", TensorProto.INT64, [1], [-1]))
    flat = g.node("Reshape", [h, g.node("Concat", [rows, minus], axis=0)])
    out = g.node("Gemm", [flat, g.init("fc", g.weight((6 * 64, 5), 384)), g.init("fcb", np.zeros(5))])
    model = onnx.shape_inference.infer_shapes(g.model([("input", [batch, 3, 8, 8], None)], out, opset=13,
                                                      out_shape=[batch, 5]))
    return model, {"input": random_inputs(N)}

def two_inputs():
    g = G(9)
    a = g.relu(g.conv("image", 3, 6))
    b = g.relu(g.conv("mask", 1, 6, k=1))
    h = g.relu(g.conv(g.node("Concat", [a, b], axis=1), 12, 8))
    model = g.model([("image", ["N", 3, 8, 8], None), ("mask", ["N", 1, 8, 8], None)], g.head(h, 8))
    return model, {"image": random_inputs(N), "mask": _feed((1, 8, 8), seed=2)}


# ---------------------------------------------------------------- 9. fp16


def to_fp16(model):
    """A float32 model with every float initializer and value turned into float16."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float16), init.name))
    for value in list(out.graph.input) + list(out.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out)
    return out


def half_bn():
    return to_fp16(conv_net(bn=True)), {"input": random_inputs(N).astype(np.float16)}


def half_folded():
    return to_fp16(conv_net(bn=False)), {"input": random_inputs(N).astype(np.float16)}


def half_inside():
    """float32 inputs and outputs, float16 inside: a Cast after the input and before the output."""
    model = to_fp16(conv_net(bn=True))
    graph = model.graph
    for value, cast_to, is_input in ((graph.input[0], TensorProto.FLOAT16, True),
                                     (graph.output[0], TensorProto.FLOAT, False)):
        inner = value.name + ".half"
        for node in graph.node:
            node.input[:] = [inner if t == value.name and is_input else t for t in node.input]
            node.output[:] = [inner if t == value.name and not is_input else t for t in node.output]
        src, dst = (value.name, inner) if is_input else (inner, value.name)
        graph.node.insert(0 if is_input else len(graph.node), helper.make_node("Cast", [src], [dst], to=cast_to))
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model)
    return model, {"input": random_inputs(N)}


# ---------------------------------------------------------------- 1b. initializers listed as inputs


def inits_as_inputs():
    """An old export (IR 3, opset 9): every initializer is also a graph input."""
    model = conv_net(bn=True, opset=9)
    model.ir_version = 3
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    return model, {"input": random_inputs(N)}


# ---------------------------------------------------------------- 11. opsets and custom domains


def custom_domain():
    """A com.microsoft Gelu (a contrib op onnxruntime runs) between two convs."""
    g = G(10)
    h = g.node("Gelu", [g.conv("input", 3, 6)], domain="com.microsoft")
    h = g.relu(g.conv(h, 6, 8))
    model = g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 8), out_shape=["N", 5],
                    extra_opsets=[("com.microsoft", 1)])
    return model, {"input": random_inputs(N)}


# ---------------------------------------------------------------- 12. extreme activations


def huge_activations(bn=False):
    """Activations that reach 1e19 and then 1e30, finite in float32 though their squares are not, as in a
    Caffe-era export whose constant Scale layers grow them: a Mul by 1e19 on the input, one by 1e11 between
    the convs (1e30 after a BN, which normalises), and 1e-30 before the head. The weights themselves are
    ordinary, so that global pruning ranks them as usual."""
    g = G(12)
    h = g.conv(g.node("Mul", ["input", g.init("up", np.float32(1e19))]), 3, 6)
    if bn:
        params = [g.rng.uniform(0.5, 1.5, 6), g.rng.normal(0, 0.1, 6), g.rng.normal(0, 1e18, 6),
                  g.rng.uniform(0.5, 2.0, 6) * 1e38]
        h = g.node("BatchNormalization", [h] + [g.init("bn", p) for p in params], "bn")
    h = g.node("Mul", [g.relu(h), g.init("up", np.float32(1e30 if bn else 1e11))])
    h = g.relu(g.conv(h, 6, 8))
    h = g.node("Mul", [h, g.init("down", np.float32(1e-30))])
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 8)), {"input": random_inputs(N)}


OVERFLOW_UP = 1e20  # the input's scale: every BN's dense variance is near 1e40, past float32's 3.4e38


def overflowing_bn_weights(seed=25):
    """The weights of :func:`overflowing_bn`: two 3x3 convs (3 -> 6 -> 8) with biases, each followed by a BN
    with ordinary running statistics, and a Gemm head to 5 classes."""
    rng = np.random.default_rng(seed)

    def as_stored(values):  # float32 values, so that the oracle computes with what the graph holds
        return values.astype(np.float32).astype(np.float64)

    def conv(cin, cout):
        return {key: as_stored(v) for key, v in (
            ("w", rng.normal(0, (2 / (cin * 9)) ** 0.5, (cout, cin, 3, 3))), ("b", rng.normal(0, 0.1, cout)),
            ("scale", rng.uniform(0.5, 1.5, cout)), ("shift", rng.normal(0, 0.1, cout)),
            ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 2.0, cout)))}

    return {"convs": [conv(3, 6), conv(6, 8)], "fc": as_stored(rng.normal(0, 0.5, (5, 8))),
            "fc_b": as_stored(rng.normal(0, 0.1, 5))}


def overflowing_bn_oracle(weights, x, up=OVERFLOW_UP):
    """The numpy forward pass (float64) of :func:`overflowing_bn` on NCHW ``x``: the logits, and each BN's input."""
    h, bn_inputs = x.astype(np.float64) * np.float64(np.float32(up)), []
    for layer in weights["convs"]:
        padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
        size = h.shape[2]
        patches = np.stack([padded[:, :, i:i + size, j:j + size] for i in range(3) for j in range(3)], axis=2)
        y = np.einsum("ncphw,ocp->nohw", patches, layer["w"].reshape(*layer["w"].shape[:2], 9))
        y = y + layer["b"][None, :, None, None]
        bn_inputs.append(y)
        view = (1, -1, 1, 1)
        h = np.maximum((y - layer["mean"].reshape(view)) / np.sqrt(layer["var"].reshape(view) + 1e-5)
                       * layer["scale"].reshape(view) + layer["shift"].reshape(view), 0)
    pooled = h.mean(axis=(2, 3)) * np.float64(np.float32(1 / up))
    return pooled @ weights["fc"].T + weights["fc_b"], bn_inputs


def overflowing_bn(up=OVERFLOW_UP, seed=25):
    """A Caffe-era graph like onnx's light ResNet-50: a Mul by 1e20 on the input (a constant Scale layer),
    then Conv -> BN -> Relu twice, with BNs whose running statistics are ordinary, GlobalAveragePool, a Mul
    by 1e-20 and a Gemm. The activations reach 1e20, finite in float32, but every BN's variance on the data
    is near 1e40, which float32 cannot hold: a BN rewritten around it must keep the variance representable.
    ``up=1e36`` puts the variances near 1e72. Oracle: :func:`overflowing_bn_oracle`."""
    weights = overflowing_bn_weights(seed)
    g = G(seed)
    h = g.node("Mul", ["input", g.init("up", np.float32(up))])
    for layer in weights["convs"]:
        h = g.node("Conv", [h, g.init("w", layer["w"]), g.init("b", layer["b"])], "conv", pads=[1] * 4)
        params = [layer[key] for key in ("scale", "shift", "mean", "var")]
        h = g.relu(g.node("BatchNormalization", [h] + [g.init("bn", p) for p in params], "bn", epsilon=1e-5))
    h = g.node("Mul", [g.node("Flatten", [g.node("GlobalAveragePool", [h])]), g.init("down", np.float32(1 / up))])
    out = g.node("Gemm", [h, g.init("fc", weights["fc"]), g.init("fcb", weights["fc_b"])], "fc", transB=1)
    return g.model([("input", ["N", 3, 8, 8], None)], out), {"input": random_inputs(N)}


def wide_bn(after="conv"):
    """A Conv whose output has a standard deviation near 1e4 (a BN variance of about 1e8, as in a PP-OCRv4
    detector), renormalised by a BN, then Relu, GlobalAveragePool and Gemm. ``after="add"`` puts the BN
    after an Add of two such Convs (it cannot be folded), with its variance at 1e5 so that the Add's
    output still fits in float16."""
    g = G(14)
    scale = 1e4 if after == "conv" else 1e2
    w = g.init("w", g.weight((6, 3, 3, 3), 27) * scale)
    h = g.node("Conv", ["input", w, g.init("b", g.rng.normal(0, 0.1, 6) * scale)], "conv", pads=[1] * 4)
    if after == "add":
        other = g.node("Conv", ["input", g.init("w", g.weight((6, 3, 3, 3), 27) * scale)], "conv", pads=[1] * 4)
        h = g.node("Add", [h, other])
    var = g.rng.uniform(0.5, 2.0, 6) * (scale**2 if after == "conv" else 1e5)
    params = [g.rng.uniform(0.5, 1.5, 6), g.rng.normal(0, 0.1, 6), g.rng.normal(0, 0.1, 6) * scale, var]
    h = g.relu(g.node("BatchNormalization", [h] + [g.init("bn", p) for p in params], "bn", epsilon=1e-5))
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 6)), {"input": random_inputs(N)}


# ---------------------------------------------------------------- 13. quantized graphs


def _quantized(values, scale, dtype=np.int8):
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale), info.min, info.max).astype(dtype)


def qdq_conv(opset=13):
    """A QDQ export: every activation through QuantizeLinear/DequantizeLinear (uint8), every Conv and Gemm
    weight an int8 initializer behind a DequantizeLinear, so no layer has a float constant weight.
    An unused initializer is left in, as quantization tools do (onnxruntime warns about it by default)."""
    g = G(20)
    g.init("unused", np.zeros(3))

    def qdq(x, scale):
        s, z = g.init("s", np.float32(scale)), g.init("z", np.uint8(128), np.uint8)
        return g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, s, z]), s, z])

    def weight(shape, fan_in):
        w = g.weight(shape, fan_in)
        scale = np.float32(np.abs(w).max() / 127)
        return g.node("DequantizeLinear", [g.init("wq", _quantized(w, scale), np.int8), g.init("ws", scale),
                                           g.init("wz", np.int8(0), np.int8)])

    h = qdq("input", 0.05)
    h = g.relu(g.node("Conv", [h, weight((6, 3, 3, 3), 27), g.init("b", np.zeros(6))], "conv", pads=[1] * 4))
    h = qdq(g.node("Flatten", [g.node("GlobalAveragePool", [qdq(h, 0.02)])]), 0.02)
    out = g.node("Gemm", [h, weight((5, 6), 6)], "fc", transB=1)
    return g.model([("input", ["N", 3, 8, 8], None)], out, opset=opset), {"input": random_inputs(N)}


def integer_ops(opset=13):
    """A dynamically quantized export: QuantizeLinear, ConvInteger and MatMulInteger with int8 weights
    and uint8 activations, each integer result cast to float and rescaled."""
    g = G(21)
    scale, zero = g.init("xs", np.float32(0.05)), g.init("xz", np.uint8(128), np.uint8)
    conv_w = g.init("w", g.rng.integers(-100, 100, (6, 3, 3, 3)), np.int8)
    h = g.node("ConvInteger", [g.node("QuantizeLinear", ["input", scale, zero]), conv_w, zero], "convi",
               pads=[1] * 4)
    h = g.node("Mul", [g.node("Cast", [h], to=TensorProto.FLOAT), g.init("sc", np.float32(0.05 * 0.01))])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [g.relu(h)])])
    fc_w = g.init("w", g.rng.integers(-100, 100, (6, 5)), np.int8)
    h = g.node("MatMulInteger", [g.node("QuantizeLinear", [h, scale, zero]), fc_w, zero])
    out = g.node("Mul", [g.node("Cast", [h], to=TensorProto.FLOAT), g.init("sc", np.float32(0.05 * 0.01))])
    return g.model([("input", ["N", 3, 8, 8], None)], out, opset=opset), {"input": random_inputs(N)}


def qdq_residual(seed=31):
    """A QDQ model as onnxruntime's static quantizer writes one with ``reduce_range`` (per-channel 7-bit int8
    weights, axis 0, so that x86's AVX2 kernels do not saturate; int32 biases at input scale times weight
    scale; uint8 activations whose zero point 0 is the Relu it removed):

        Q/DQ(input) -> conv1 3x3 3->8 -> Q/DQ (zp 0: relu) -> conv2 3x3 8->8 -> Q/DQ -> Add(conv1's) ->
        Q/DQ (zp 0: relu) -> GlobalAveragePool -> Q/DQ -> Flatten -> Gemm 8->5 -> Q/DQ -> logits

    Initializers are named for the oracle in tests/pipeline/test_quantized.py: ``{layer}.w_q``/``.w_s`` (codes,
    scales), ``{layer}.b_q``/``.b_s``, ``{tensor}.s``/``.z`` of each activation."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    acts = {"x": (0.05, 128), "h1": (0.02, 0), "h2": (0.03, 128), "h3": (0.03, 0), "pool": (0.01, 0),
            "logits": (0.05, 128)}

    def qdq(tensor, name):
        scale, zero = acts[name]
        inits.extend([_init(f"{name}.s", np.float32(scale)), _init(f"{name}.z", np.uint8(zero))])
        nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{name}.s", f"{name}.z"], [f"{name}.q"],
                                      name=f"{name}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"], [f"{name}.dq"],
                                      name=f"{name}_DequantizeLinear"))
        return f"{name}.dq"

    def weights(layer, shape, fan_in, input_scale):
        w = rng.normal(0, (2 / fan_in) ** 0.5, shape)
        scale = (np.abs(w).reshape(shape[0], -1).max(axis=1) / 63).astype(np.float32)
        codes = np.clip(np.round(w / scale.reshape((-1,) + (1,) * (len(shape) - 1))), -63, 63).astype(np.int8)
        bias_scale = (np.float32(input_scale) * scale).astype(np.float32)
        bias = np.round(rng.normal(0, 0.1, shape[0]) / bias_scale).astype(np.int32)
        for part, (q, s) in {"w": (codes, scale), "b": (bias, bias_scale)}.items():
            inits.extend([_init(f"{layer}.{part}_q", q), _init(f"{layer}.{part}_s", s),
                          _init(f"{layer}.{part}_z", np.zeros(shape[0], q.dtype))])
            nodes.append(helper.make_node("DequantizeLinear", [f"{layer}.{part}_q", f"{layer}.{part}_s",
                                                               f"{layer}.{part}_z"], [f"{layer}.{part}"],
                                          name=f"{layer}.{part}_DequantizeLinear", axis=0))
        return [f"{layer}.w", f"{layer}.b"]

    x = qdq("input", "x")
    nodes.append(helper.make_node("Conv", [x] + weights("conv1", (8, 3, 3, 3), 27, acts["x"][0]), ["conv1.out"],
                                  name="conv1", pads=[1] * 4))
    h1 = qdq("conv1.out", "h1")
    nodes.append(helper.make_node("Conv", [h1] + weights("conv2", (8, 8, 3, 3), 72, acts["h1"][0]), ["conv2.out"],
                                  name="conv2", pads=[1] * 4))
    nodes.append(helper.make_node("Add", [qdq("conv2.out", "h2"), h1], ["add.out"], name="add"))
    nodes.append(helper.make_node("GlobalAveragePool", [qdq("add.out", "h3")], ["pool.out"], name="pool"))
    nodes.append(helper.make_node("Flatten", [qdq("pool.out", "pool")], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat"] + weights("fc", (5, 8), 8, acts["pool"][0]), ["fc.out"],
                                  name="fc", transB=1))
    out = qdq("fc.out", "logits")
    nodes.append(helper.make_node("Identity", [out], ["logits"], name="output"))
    model = make_model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], opset=13)
    return model, {"input": random_inputs(N)}


def amplified_channel(seed=33, factor=1e3):
    """A float model whose one channel is tiny where it is quantized and amplified by the next layer, as a float
    repair leaves a near-dead channel it scaled back up (MobileNetV2's depthwise convs after pruning):

        conv1 3x3 3->8 -> Relu -> conv2 3x3 8->8 -> Relu -> GlobalAveragePool -> Flatten -> Gemm 8->5

    conv1's channel 0 (weights and bias) is divided by ``factor`` and conv2's input channel 0 multiplied by it:
    by Relu's positive homogeneity the model computes what the unscaled one does (its oracle,
    tests/quantize/test_int8.py), while a per-tensor quantization of conv1's output loses that channel."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, (2 / 27) ** 0.5, (8, 3, 3, 3)), rng.normal(0, 0.1, 8)
    w2, b2 = rng.normal(0, (2 / 72) ** 0.5, (8, 8, 3, 3)), rng.normal(0, 0.1, 8)
    wf = rng.normal(0, (1 / 8) ** 0.5, (5, 8))
    w1[0], b1[0], w2[:, 0] = w1[0] / factor, b1[0] / factor, w2[:, 0] * factor
    inits = [_init(name, np.asarray(v, np.float32)) for name, v in
             (("conv1.w", w1), ("conv1.b", b1), ("conv2.w", w2), ("conv2.b", b2), ("fc.w", wf), ("fc.b", np.zeros(5)))]
    nodes = [helper.make_node("Conv", ["input", "conv1.w", "conv1.b"], ["h1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["h2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    model = make_model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])])
    return model, {"input": random_inputs(48, seed=3)}


QUANTIZED = {"qdq_conv": qdq_conv, "integer_ops": integer_ops, "qdq_residual": qdq_residual}
QDQ = ("qdq_conv", "qdq_residual")  # the quantized graphs whose weights are integers behind a DequantizeLinear


# ---------------------------------------------------------------- 14. Paddle MobileNetV3

FIXTURES = Path(__file__).parent / "fixtures"


def se_mobilenetv3(n=N):
    """A trained Paddle-style MobileNetV3 (tests/fixtures/se_mobilenetv3.onnx, made by
    tests/fixtures/make_se_mobilenetv3.py), fed calibration images from another distribution than its
    training images (see :func:`mobilenetv3_images`)."""
    model = onnx.load(FIXTURES / "se_mobilenetv3.onnx")
    return model, {"input": mobilenetv3_images(n, seed=2, shifted=True)[0]}


def mobilenetv3_images(count: int, seed: int, shifted: bool = False):
    """Synthetic 5-class 3x16x16 images: a class template plus noise; (images, labels).

    ``shifted``: the other distribution, as natural photos are for a model trained on other photos:
    fainter templates, more noise and an uneven illumination (a ramp across the image), which no
    per-channel affine change of the input undoes.
    """
    templates = np.random.default_rng(0).normal(0, 1, (5, 3, 16, 16))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, count)
    if not shifted:
        return (0.25 * templates[labels] + rng.normal(0, 1, (count, 3, 16, 16))).astype(np.float32), labels
    ramp = np.linspace(-1, 2, 16)[None, None, None, :]
    images = 0.2 * templates[labels] + rng.normal(0, 1.3, (count, 3, 16, 16)) + ramp
    return images.astype(np.float32), labels


def mobilenetv3_graph(weights: list):
    """The MobileNetV3 graph around ``weights`` (in PyTorch's parameter order): BN nodes, HardSwish,
    depthwise convs, SE blocks whose 1x1 convs (no BN) on pooled features gate the trunk through
    HardSigmoid and Mul, a residual, and a BN-free 1x1 "last conv" on the pooled features before the
    classifier. BN running statistics are zeros and ones (see :func:`set_running_statistics`)."""
    g = G()
    params = iter(weights)

    def conv(x, k=1, depthwise=False, stride=1, bias=False):
        weight = next(params)
        ins = [x, g.init("w", weight)] + ([g.init("b", next(params))] if bias else [])
        return g.node("Conv", ins, "conv", group=len(weight) if depthwise else 1, pads=[k // 2] * 4,
                      strides=[stride, stride])

    def conv_bn(x, k=1, depthwise=False, stride=1, act=True):
        h = conv(x, k, depthwise, stride)
        affine = [g.init("bn", next(params)), g.init("bn", next(params))]
        channels = next(t for t in g.inits if t.name == affine[0]).dims[0]
        stats = [g.init("bn", np.zeros(channels)), g.init("bn", np.ones(channels))]
        h = g.node("BatchNormalization", [h] + affine + stats, "bn", epsilon=1e-5)
        return g.node("HardSwish", [h]) if act else h

    def se(x):
        squeeze = g.relu(conv(g.node("GlobalAveragePool", [x]), bias=True))
        return g.node("Mul", [x, g.node("HardSigmoid", [conv(squeeze, bias=True)], alpha=1 / 6, beta=0.5)])

    h = conv_bn("input", k=3, stride=2)  # 8 x 8
    h = g.node("Add", [h, conv_bn(se(conv_bn(conv_bn(h), k=3, depthwise=True)), act=False)])
    h = conv_bn(se(conv_bn(conv_bn(h), k=3, depthwise=True, stride=2)), act=False)  # 4 x 4
    h = conv_bn(h)
    h = g.node("HardSwish", [conv(g.node("GlobalAveragePool", [h]), bias=True)])  # the BN-free last conv
    out = g.node("Gemm", [g.node("Flatten", [h]), g.init("fc", next(params)), g.init("fcb", next(params))], "fc",
                 transB=1)
    return g.model([("input", ["N", 3, 16, 16], None)], out)


def set_running_statistics(model, train):
    """Gives every BN, in graph order, the mean and unbiased variance of its input on ``train``."""
    import onnxruntime as ort

    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        x = session.run([node.input[0]], {"input": train})[0].astype(np.float64)
        moved = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        for name, values in ((node.input[3], moved.mean(0)), (node.input[4], moved.var(0, ddof=1))):
            model.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    return model

# ---------------------------------------------------------------- 15. one prunable layer (least-squares refit oracles)


def one_layer(kind: str):
    """input -> Relu -> one prunable layer -> output, for checking a refit against a numpy solve.

    kinds: "conv" (2 groups, stride 2, dilation 2, padding 2, bias), "depthwise", "conv_valid" (1x1, stride 2,
    no padding), "conv_shifted" (stride 1, 2 groups, dilation (2, 1), uneven padding: XᵀX summed by shifts),
    "conv5" (5x3 kernel, stride 1, padding 2 and 0), "gemm" (transB, alpha 0.5, beta 2), "gemm_t0" (transB 0),
    "matmul" (a 3-D input), "conv21" (a 21x21 kernel, stride 1, padding 10, on 24x24 inputs, 8 samples: summed
    by shifts it would need 29,261 segment products).
    """
    g = G(12)
    x = g.relu("input")
    if kind == "conv21":
        out = g.conv(x, 4, 4, k=21)
        return g.model([("input", ["N", 4, 24, 24], None)], out), {"input": _feed((4, 24, 24), n=8)}
    if kind in ("conv", "depthwise", "conv_valid", "conv_shifted", "conv5"):
        if kind == "conv":
            out = g.conv(x, 4, 6, group=2, strides=[2, 2], dilations=[2, 2], pads=[2, 2, 2, 2])
        elif kind == "conv_shifted":
            out = g.conv(x, 4, 6, group=2, dilations=[2, 1], pads=[1, 0, 3, 2])
        elif kind == "conv5":
            out = g.conv(x, 4, 6, shape=(6, 4, 5, 3), pads=[2, 0, 2, 0])
        elif kind == "depthwise":
            out = g.conv(x, 4, 4, group=4, bias=False)
        else:
            out = g.conv(x, 4, 6, k=1, strides=[2, 2], pads=[0, 0, 0, 0])
        return g.model([("input", ["N", 4, 8, 8], None)], out), {"input": _feed((4, 8, 8), n=40)}
    if kind == "matmul":
        out = g.node("MatMul", [x, g.init("mm", g.weight((12, 5), 12))])
        return g.model([("input", ["N", 3, 12], None)], out), {"input": _feed((3, 12), n=40)}
    trans_b = int(kind == "gemm")
    w = g.weight((5, 12) if trans_b else (12, 5), 12)
    out = g.node("Gemm", [x, g.init("fc", w), g.init("b", g.rng.normal(0, .1, 5))], "fc", transB=trans_b,
                 alpha=0.5, beta=2.0)
    return g.model([("input", ["N", 12], None)], out), {"input": _feed((12,), n=40)}


ONE_LAYER = ("conv", "depthwise", "conv_valid", "conv_shifted", "conv5", "gemm", "gemm_t0", "matmul")


def endless_loop(trips=10**12):
    """A Loop of ``trips`` iterations, each a MatMul of the 64x64 input by the identity: the input comes out
    (the oracle) once it ends, which at 10^12 iterations it never does. For stopping a run halfway."""
    x_in, x_out = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in ("x_in", "x_out"))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "eye"], ["x_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), x_in],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), x_out], [_init("eye", np.eye(64, dtype=np.float32))])
    loop = helper.make_node("Loop", ["trips", "go", "input"], ["output"], body=body)
    return make_model([loop], [_init("trips", np.array(trips, np.int64)), _init("go", np.array(True))],
                      [helper.make_tensor_value_info("input", TensorProto.FLOAT, [64, 64])],
                      [helper.make_tensor_value_info("output", TensorProto.FLOAT, [64, 64])])


def big_kernel_net(n=32, stride=1):
    """input -> Relu -> Conv 3x3 -> Relu -> Conv 21x21 (padding 10): two depth levels, so that a refit keeps the
    first level's output (its frontier, on disk) while it runs the second. ``stride=1``: 4 channels of 24x24,
    the second Conv's Gram products about 1.8e9 multiply-adds per sample; ``stride=2``: 8 channels of 48x48
    and a stride of 2, 7.2e9 per sample, which by im2col is one product of 2.3e11 for a batch of 32. The Gram
    sums of such a kernel are checked against PyTorch's unfold on ``one_layer("conv21")``."""
    g = G(13)
    channels, size = (4, 24) if stride == 1 else (8, 48)
    h = g.relu(g.conv(g.relu("input"), channels, channels))
    out = g.conv(h, channels, channels, k=21, strides=[stride, stride])
    return g.model([("input", ["N", channels, size, size], None)], out), {"input": _feed((channels, size, size), n=n)}


# ---------------------------------------------------------------- 15. output layouts (issue 17)


def time_first_recogniser(batch="N", steps=8, classes=6):
    """A CTC-style recogniser: 1x1 Convs over a (N, 3, 1, T) strip, then time first (T, N, classes) through
    a MatMul and a LogSoftmax over the classes, as a CRNN exporter writes it. ``batch``: "N" or 1."""
    g = G(21)
    h = g.relu(g.conv("input", 3, 8, k=1, pads=[0, 0, 0, 0]))
    seq = g.node("Transpose", [g.node("Squeeze", [h, g.init("axis", [2], np.int64)])], perm=[2, 0, 1])
    logits = g.node("MatMul", [seq, g.init("fc", g.weight((8, classes), 8))])
    out = g.node("LogSoftmax", [logits], axis=-1)
    model = g.model([("input", [batch, 3, 1, steps], None)], out, out_shape=["T", batch, classes])
    return model, {"input": _feed((3, 1, steps), seed=21)}


def time_first_oracle(model, x):
    """numpy's forward pass of :func:`time_first_recogniser`: (T, N, classes) log-probabilities."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    conv_w, conv_b, fc = (next(v for n, v in w.items() if n.startswith(hint)) for hint in ("w", "b", "fc"))
    h = np.maximum(np.einsum("oc,nct->not", conv_w[:, :, 0, 0], x[:, :, 0, :]) + conv_b[None, :, None], 0)
    logits = np.einsum("nct,ck->tnk", h, fc)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def attention_block(tokens=6, width=8):
    """One single-head self-attention block on (N, T, C) tokens, as torch.onnx writes a ViT's: Q, K and V
    projections (MatMul with constant weights), Q·Kᵀ/√C (a MatMul of two activations), Softmax, the product with
    V (another), and an output projection."""
    g = G(41)
    q, k, v = (g.node("MatMul", ["input", g.init(hint, g.weight((width, width), width))]) for hint in "qkv")
    scores = g.node("Div", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])]),
                            g.init("scale", np.float32(np.sqrt(width)))])
    mixed = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
    out = g.node("MatMul", [mixed, g.init("o", g.weight((width, width), width))])
    return g.model([("input", ["N", tokens, width], None)], out), {"input": _feed((tokens, width), seed=41)}


def attention_oracle(model, x):
    """numpy's forward pass of :func:`attention_block`."""
    w = {t.name.rstrip("0123456789"): numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    q, k, v = (x.astype(np.float64) @ w[name] for name in "qkv")
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(x.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v @ w["o"]


def convnext_like(widths=(8, 16), size=16):
    """A ConvNeXt-style net as torch.onnx writes one: a 2x2 stride-2 patchify stem, then per stage blocks of a 7x7
    depthwise conv, a Transpose to channel-last, LayerNormalization, a Linear (MatMul) to 4x the width, Erf-GELU,
    a Linear back, a Transpose to NCHW and the residual Add; a 2x2 stride-2 conv between the stages."""
    g = G(51)

    def block(x, c):
        h = g.node("Transpose", [g.conv(x, c, c, k=7, group=c)], perm=[0, 2, 3, 1])
        h = g.node("LayerNormalization", [h, g.init("lnw", g.rng.uniform(0.5, 1.5, c)),
                                          g.init("lnb", g.rng.normal(0, 0.1, c))], axis=-1, epsilon=1e-6)
        h = g.node("MatMul", [h, g.init("fc1", g.weight((c, 4 * c), c))])
        erf = g.node("Erf", [g.node("Div", [h, g.init("sqrt2", np.float32(np.sqrt(2)))])])
        h = g.node("Mul", [g.node("Mul", [h, g.node("Add", [erf, g.init("one", np.float32(1))])]),
                           g.init("half", np.float32(0.5))])
        h = g.node("MatMul", [h, g.init("fc2", g.weight((4 * c, c), 4 * c))])
        return g.node("Add", [x, g.node("Transpose", [h], perm=[0, 3, 1, 2])])

    x, cin = "input", 3
    for c in widths:
        x = block(block(g.conv(x, cin, c, k=2, strides=[2, 2], pads=[0, 0, 0, 0]), c), c)
        cin = c
    return g.model([("input", ["N", 3, size, size], None)], x), {"input": _feed((3, size, size), n=8, seed=51)}


def convnext_oracle(model, x):
    """numpy's forward pass of :func:`convnext_like`, node by node (the graph's own order, every op by hand)."""
    import math

    from numpy.lib.stride_tricks import sliding_window_view

    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    values["input"] = x.astype(np.float64)
    attr = {n.output[0]: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node}
    erf = np.vectorize(math.erf)
    for node in model.graph.node:
        a, out, at = [values[i] for i in node.input], node.output[0], attr[node.output[0]]
        if node.op_type == "Conv":
            (w, b), stride, pad, group = a[1:], at.get("strides", [1])[0], at["pads"][0], at["group"]
            padded = np.pad(a[0], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            win = sliding_window_view(padded, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
            if group == 1:
                values[out] = np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]
            else:  # depthwise
                values[out] = np.einsum("nchwij,cij->nchw", win, w[:, 0]) + b[None, :, None, None]
        elif node.op_type == "Transpose":
            values[out] = a[0].transpose(at["perm"])
        elif node.op_type == "LayerNormalization":
            mean, var = a[0].mean(-1, keepdims=True), a[0].var(-1, keepdims=True)
            values[out] = (a[0] - mean) / np.sqrt(var + at["epsilon"]) * a[1] + a[2]
        elif node.op_type == "Erf":
            values[out] = erf(a[0])
        else:
            values[out] = {"MatMul": np.matmul, "Div": np.divide, "Mul": np.multiply, "Add": np.add}[node.op_type](*a)
    return values[model.graph.output[0].name]


def detector_head(channels=22, size=8):
    """A detector-like output: a 1x1 Conv head reshaped to (N, channels, H*W), boxes and scores mixed."""
    g = G(22)
    h = g.relu(g.conv(g.bn(g.conv("input", 3, 8), 8), 8, 8))
    head = g.conv(h, 8, channels, k=1, pads=[0, 0, 0, 0])
    out = g.node("Reshape", [head, g.init("shape", [0, channels, -1], np.int64)])
    model = g.model([("input", ["N", 3, size, size], None)], out, out_shape=["N", channels, size * size])
    return model, {"input": random_inputs(N)}



def dynamic_hw_detector(classes=3):
    """A YOLO export with ``dynamic=True``: input (batch, 3, height, width), a strided 3x3 Conv with SiLU
    (x * Sigmoid(x)), a 1x1 head split into 4 box and ``classes`` score channels, Sigmoid on the scores,
    concatenated and reshaped to (batch, 4 + classes, anchors) with anchors = ceil(H/2) * ceil(W/2)."""
    g = G(29)
    h = g.conv("images", 3, 8, strides=[2, 2])
    h = g.node("Mul", [h, g.node("Sigmoid", [h])], "silu")
    head = g.conv(h, 8, 4 + classes, k=1, pads=[0, 0, 0, 0])
    boxes, scores = g.name("boxes"), g.name("scores")
    g.nodes.append(helper.make_node("Split", [head, g.init("split", [4, classes], np.int64)], [boxes, scores],
                                    name=g.name("split"), axis=1))
    joined = g.node("Concat", [boxes, g.node("Sigmoid", [scores])], axis=1)
    out = g.node("Reshape", [joined, g.init("shape", [0, 4 + classes, -1], np.int64)])
    model = g.model([("images", ["batch", 3, "height", "width"], None)], out,
                    out_shape=["batch", 4 + classes, "anchors"])
    return model, {"images": _feed((3, 12, 10), seed=29)}


def dynamic_hw_detector_oracle(model, x):
    """numpy's forward pass of :func:`dynamic_hw_detector` on (N, 3, H, W) ``x``: (N, 4 + classes, anchors)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    (w1, b1), (w2, b2) = ((w[n.input[1]], w[n.input[2]]) for n in model.graph.node if n.op_type == "Conv")
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out_h, out_w = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    patches = np.stack([padded[:, :, i:i + 2 * out_h:2, j:j + 2 * out_w:2] for i in range(3) for j in range(3)], 2)
    h = np.einsum("ncphw,ocp->nohw", patches, w1.reshape(*w1.shape[:2], 9)) + b1[:, None, None]
    h = h / (1 + np.exp(-h))  # SiLU
    head = np.einsum("nchw,oc->nohw", h, w2[:, :, 0, 0]) + b2[:, None, None]
    head[:, 4:] = 1 / (1 + np.exp(-head[:, 4:]))
    return head.reshape(len(x), head.shape[1], -1)


def bn_with_statistics(stale: bool, n=96, seed=23, shift=2.0, scale=9.0):
    """Two Conv+BN+Relu blocks and a head, whose BN running statistics are the dense model's own on its
    calibration samples (``stale=False``), or, for the first BN, far from them (``stale=True``: variance x
    ``scale``, default 9, mean shifted by ``shift`` standard deviations, default 2), as after training on other
    data. Restoring a stale BN's running statistics moves the repaired model away from the dense one."""
    g = G(seed)
    first = g.conv("input", 3, 8)
    a = g.relu(g.bn(first, 8))
    second = g.conv(a, 8, 8)
    out = g.head(g.relu(g.bn(second, 8)), 8)
    model = g.model([("input", ["N", 3, 8, 8], None)], out)
    x = random_inputs(n, seed=seed)
    for conv in (first, second):  # measured in order: the second BN's input depends on the first's statistics
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_tensor_value_info(conv, TensorProto.FLOAT, None))
        pre = onnxruntime.InferenceSession(probe.SerializeToString()).run([conv], {"input": x})[0].astype(np.float64)
        mean, var = pre.mean((0, 2, 3)), pre.var((0, 2, 3))
        if stale and conv == first:
            mean, var = mean + shift * np.sqrt(var), scale * var
        bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization" and node.input[0] == conv)
        inits = {t.name: t for t in model.graph.initializer}
        inits[bn.input[3]].CopyFrom(numpy_helper.from_array(mean.astype(np.float32), bn.input[3]))
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(var.astype(np.float32), bn.input[4]))
    return model, {"input": x}


# ---------------------------------------------------------------- 16. channel dependency groups (issue 16)


def _channel_model(g, h, c, classes=5):
    return g.model([("input", ["N", 3, 8, 8], None)], g.head(h, c, classes)), {"input": _feed((3, 8, 8))}


def channels_residual():
    """conv-BN-ReLU, conv-BN, a residual Add, then a 1x1 unpadded conv with bias and the head."""
    g = G(31)
    a = g.relu(g.bn(g.conv("input", 3, 8, bias=False), 8))
    b = g.bn(g.conv(a, 8, 8, bias=False), 8)
    h = g.relu(g.node("Add", [b, a]))
    return _channel_model(g, g.relu(g.conv(h, 8, 6, k=1)), 6)


def channels_depthwise():
    """MobileNetV2-style: 1x1 expand, BN, Clip(0, 6), depthwise 3x3, BN, ReLU, 1x1 project."""
    g = G(32)
    h = g.bn(g.conv("input", 3, 8, k=1, bias=False), 8)
    h = g.node("Clip", [h, g.init("lo", np.array(0.0)), g.init("hi", np.array(6.0))])
    h = g.relu(g.bn(g.conv(h, 8, 8, group=8, bias=False), 8))
    return _channel_model(g, g.conv(h, 8, 6, k=1), 6)


def channels_grouped():
    """A grouped (not depthwise) conv between two convs: its input and output groups stay whole."""
    g = G(33)
    h = g.relu(g.conv("input", 3, 8))
    h = g.relu(g.conv(h, 8, 8, group=2))
    return _channel_model(g, g.relu(g.conv(h, 8, 6)), 6)


def channels_concat():
    """Two branches of 4 and 6 channels concatenated on axis 1, read by a 3x3 conv."""
    g = G(34)
    a = g.relu(g.conv("input", 3, 4))
    b = g.relu(g.bn(g.conv("input", 3, 6, k=1, bias=False), 6))
    h = g.node("Concat", [a, b], axis=1)
    return _channel_model(g, g.relu(g.conv(h, 10, 8)), 8)


def channels_se_gate():
    """An SE block: GlobalAveragePool, 1x1 reduce, ReLU, 1x1 expand, Sigmoid, Mul into the trunk."""
    g = G(35)
    x = g.relu(g.bn(g.conv("input", 3, 8, bias=False), 8))
    s = g.relu(g.conv(g.node("GlobalAveragePool", [x]), 8, 4, k=1))
    gate = g.node("Sigmoid", [g.conv(s, 4, 8, k=1)])
    h = g.node("Mul", [x, gate])
    return _channel_model(g, g.relu(g.conv(h, 8, 6, k=1)), 6)


def channels_flatten_gemm(reshape=True):
    """conv, ReLU, MaxPool to 4x4, then Reshape (an explicit (-1, 128) target) or Flatten into a Gemm,
    ReLU, and a second Gemm: each channel is 16 columns of the first Gemm."""
    g = G(36)
    h = g.node("MaxPool", [g.relu(g.conv("input", 3, 8))], kernel_shape=[2, 2], strides=[2, 2])
    if reshape:
        flat = g.node("Reshape", [h, g.init("target", np.array([-1, 128]), np.int64)])
    else:
        flat = g.node("Flatten", [h])
    hidden = g.relu(g.node("Gemm", [flat, g.init("fc", g.weight((16, 128), 128)),
                                    g.init("fcb", g.rng.normal(0, .1, 16))], transB=1))
    out = g.node("Gemm", [hidden, g.init("fc", g.weight((16, 5), 16)), g.init("fcb", np.zeros(5))], transB=0)
    return g.model([("input", ["N", 3, 8, 8], None)], out), {"input": _feed((3, 8, 8))}


def channels_affine():
    """A decomposed BN (Mul by a (1, C, 1, 1) constant, Add of a (C, 1, 1) one) after a conv."""
    g = G(37)
    h = g.node("Mul", [g.conv("input", 3, 8), g.init("scale", g.rng.uniform(0.5, 1.5, (1, 8, 1, 1)))])
    h = g.relu(g.node("Add", [h, g.init("shift", g.rng.normal(0, 0.3, (8, 1, 1)))]))
    return _channel_model(g, g.relu(g.conv(h, 8, 6)), 6)


def channels_unsafe():
    """Channels that no group may lose: a tensor that is also a graph output, a Softmax over channels,
    and an Add with the graph input."""
    g = G(38)
    a = g.relu(g.conv("input", 3, 8))  # also a graph output
    b = g.node("Softmax", [g.conv(a, 8, 8)], axis=1)
    c = g.relu(g.node("Add", [g.conv(b, 8, 3), "input"]))
    model = g.model([("input", ["N", 3, 8, 8], None)], g.head(g.relu(g.conv(c, 3, 6)), 6))
    model.graph.output.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, ["N", 8, 8, 8]))
    return model, {"input": _feed((3, 8, 8))}


def channels_zero(bn=False):
    """A conv whose channels 1, 4 and 6 are exactly zero (zero filters, no bias), then ReLU and a padded 3x3
    conv, BN and the head. With ``bn``, a BN follows the first conv, mapping those channels to a constant
    that ReLU passes, read by a 1x1 conv and by the head's Gemm (both fold it exactly)."""
    g = G(39)
    h = g.conv("input", 3, 8, bias=False)
    w = numpy_helper.to_array(g.inits[-1]).copy()
    w[[1, 4, 6]] = 0
    g.inits[-1] = numpy_helper.from_array(w, g.inits[-1].name)
    if bn:
        h = g.relu(g.bn(h, 8))
        return _channel_model(g, g.relu(g.conv(h, 8, 8, k=1)), 8)
    h = g.relu(h)
    return _channel_model(g, g.relu(g.bn(g.conv(h, 8, 8, bias=False), 8)), 8)


# ---------------------------------------------------------------- a tf2onnx byte classifier (Magika)


def byte_classifier_weights(seed=23, length=16, tokens=257, width=8, classes=5):
    """Weights of a Magika-like byte classifier: 257 tokens (256 byte values and a padding token)."""
    rng = np.random.default_rng(seed)
    return {"embed": rng.normal(0, 0.3, (tokens, width)), "embed_b": rng.normal(0, 0.1, width),
            "conv": rng.normal(0, (2 / (3 * width)) ** 0.5, (width, width, 3)), "conv_b": rng.normal(0, 0.1, width),
            "fc": rng.normal(0, 0.3, (width, classes)), "fc_b": rng.normal(0, 0.1, classes), "length": length}


def byte_classifier_oracle(weights, tokens):
    """The numpy forward pass of :func:`byte_classifier` on int ``tokens`` (N, L), in float64."""
    h = np.maximum(weights["embed"][tokens] + weights["embed_b"], 0)  # one-hot @ embed == a row lookup
    h = np.pad(h, ((0, 0), (1, 1), (0, 0)))
    h = sum(np.einsum("nlc,oc->nlo", h[:, k:k + tokens.shape[1]], weights["conv"][:, :, k]) for k in range(3))
    return np.maximum(h + weights["conv_b"], 0).max(axis=1) @ weights["fc"] + weights["fc_b"]


def byte_tokens(n, length=16, seed=1):
    """``n`` int32 token rows: bytes 0..255, each row's tail padded with token 256."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, length)).astype(np.int32)
    tokens[np.arange(length) >= rng.integers(length // 2, length + 1, (n, 1))] = 256
    return tokens


def byte_classifier(seed=23):
    """An int32 (N, L) byte input as tf2onnx writes Magika's: one-hot by Equal against the token range and a
    Cast, a Dense MatMul + Add, Transpose to (N, C, L), a 1-D Conv, GlobalMaxPool, Squeeze, MatMul + Add."""
    weights, g = byte_classifier_weights(seed), G(seed)
    length = weights["length"]
    tokens = g.init("tokens", np.arange(257), np.int32)
    hot = g.node("Cast", [g.node("Equal", [g.node("Unsqueeze", ["bytes", g.init("axes", [2], np.int64)]), tokens])],
                 to=TensorProto.FLOAT)
    h = g.relu(g.node("Add", [g.node("MatMul", [hot, g.init("embed", weights["embed"])], "dense"),
                              g.init("embed_b", weights["embed_b"])]))
    h = g.node("Transpose", [h], perm=[0, 2, 1])
    h = g.relu(g.node("Conv", [h, g.init("w", weights["conv"]), g.init("b", weights["conv_b"])], "conv",
                      pads=[1, 1]))
    h = g.node("Squeeze", [g.node("GlobalMaxPool", [h]), g.init("axes", [2], np.int64)])
    out = g.node("Add", [g.node("MatMul", [h, g.init("fc", weights["fc"])], "fc"), g.init("fc_b", weights["fc_b"])])
    return g.model([("bytes", ["N", length], TensorProto.INT32)], out), {"bytes": byte_tokens(N, length)}


CHANNEL_CLASSES = {"residual": channels_residual, "depthwise": channels_depthwise, "grouped": channels_grouped,
                   "concat": channels_concat, "se-gate": channels_se_gate, "flatten-gemm": channels_flatten_gemm,
                   "flatten": lambda: channels_flatten_gemm(False), "affine": channels_affine}


CLASSES = {
    "bn_kept": bn_kept, "bn_folded": bn_folded, "bn_kept_opset9": lambda: bn_kept(9),
    "decomposed_sub_mul_add": decomposed_bn, "decomposed_mul_add": lambda: decomposed_bn(("Mul", "Add")),
    "nhwc": nhwc, "keras_shared_output": keras_shared_output, "constant_weights_opset9": lambda: constant_weights(9),
    "constant_weights_opset12": lambda: constant_weights(12), "odd_convs": odd_convs, "conv1d": conv1d,
    "fc_heads": fc_heads, "shared_branched": shared_branched, "fixed_batch_1": fixed_batch_1,
    "fixed_batch_1_bn": fixed_batch_1_bn, "input_bn_batch_1": input_bn_batch_1,
    "reshape_batch_1": reshape_batch, "shape_reshape_batch_1": shape_reshape_batch, "two_inputs": two_inputs, "fp16_bn": half_bn,
    "fp16_folded": half_folded, "fp16_inside": half_inside, "custom_domain": custom_domain,
    "inits_as_inputs": inits_as_inputs, "huge_activations": huge_activations,
    "huge_activations_bn": lambda: huge_activations(bn=True),
    "se_mobilenetv3": se_mobilenetv3, "keras_resnet_tf2onnx": keras_resnet,
    "keras_resnet_torch": lambda: keras_resnet("keras_torch"), "byte_classifier": byte_classifier,
}


class DictSet:
    """A calibration set over in-memory arrays keyed by input name (several inputs allowed)."""

    labels = None

    def __init__(self, feeds: dict):
        self.feeds = feeds

    def __len__(self):
        return len(next(iter(self.feeds.values())))

    def batches(self, batch_size):
        for i in range(0, len(self), batch_size):
            yield {name: x[i : i + batch_size] for name, x in self.feeds.items()}

    def folds(self, k, seed=0):
        """k (fit, held-out) pairs, as CalibSet.folds makes them, each part in the set's own order."""
        parts = np.array_split(np.random.default_rng(seed).permutation(len(self)), k)

        def subset(indices):
            return DictSet({name: x[np.sort(indices)] for name, x in self.feeds.items()})

        return [(subset(np.concatenate(parts[:i] + parts[i + 1:])), subset(part)) for i, part in enumerate(parts)]


# ---------------------------------------------------------------- 17. channel surgery hazards (issue 25)
# Graphs on which channel pruning once wrote a wrong model or raised: each is pruned exactly (the shrunk model
# computes what the masked one does) or keeps the groups in question whole, with the reason.
# tests/test_channels.py's PyTorch interpreter is the oracle of every output.


def _outputs(model, extra):
    """``model`` with more graph outputs: (name, elem type, shape) each."""
    model.graph.output.extend(helper.make_tensor_value_info(n, t, s) for n, t, s in extra)
    onnx.checker.check_model(model)
    return model


def _input(g, out, extra=(), opset=17):
    model = g.model([("input", ["N", 3, 8, 8], None)], out, opset=opset)
    return _outputs(model, extra) if extra else model, {"input": _feed((3, 8, 8))}


def channels_maxpool_indices():
    """conv, ReLU, a MaxPool whose Indices output is a graph output (flat N*C*H*W positions: they count the
    channels), a 1x1 conv and the head."""
    g = G(41)
    h = g.relu(g.conv("input", 3, 8))
    g.nodes.append(helper.make_node("MaxPool", [h], ["pooled", "indices"], name="pool", kernel_shape=[2, 2],
                                    strides=[2, 2]))
    out = g.head(g.relu(g.conv("pooled", 8, 6, k=1)), 6)
    return _input(g, out, [("indices", TensorProto.INT64, ["N", 8, 4, 4])])


def channels_dropout_mask():
    """conv, ReLU, an inference Dropout whose mask is a graph output, a conv and the head; a second conv's
    Dropout mask is read by nobody (it may go with its channels)."""
    g = G(42)
    h = g.relu(g.conv("input", 3, 8))
    g.nodes.append(helper.make_node("Dropout", [h], ["dropped", "mask"], name="drop"))
    h = g.relu(g.conv("dropped", 8, 6))
    g.nodes.append(helper.make_node("Dropout", [h], ["dropped2", "unused_mask"], name="drop2"))
    out = g.head(g.relu(g.conv("dropped2", 6, 6, k=1)), 6)
    return _input(g, out, [("mask", TensorProto.BOOL, ["N", 8, 8, 8])])


def channels_initializer_output():
    """A conv whose weight initializer is also a graph output, then a prunable conv and the head."""
    g = G(43)
    h = g.relu(g.conv("input", 3, 8))
    weight = g.nodes[-2].input[1]
    h = g.relu(g.conv(h, 8, 6))
    return _input(g, g.head(h, 6), [(weight, TensorProto.FLOAT, [8, 3, 3, 3])])


def channels_tensor_output():
    """An intermediate activation (after the first conv's GlobalAveragePool) that is also a graph output."""
    g = G(44)
    h = g.relu(g.conv("input", 3, 8))
    pooled = g.node("GlobalAveragePool", [h])
    h = g.relu(g.conv(h, 8, 6))
    return _input(g, g.head(g.relu(g.conv(h, 6, 6, k=1)), 6), [(pooled, TensorProto.FLOAT, ["N", 8, 1, 1])])


def channels_reciprocal():
    """conv, Sigmoid, 1/x (Div of a scalar by the channels), a conv and the head."""
    g = G(45)
    h = g.node("Sigmoid", [g.conv("input", 3, 8)])
    h = g.node("Div", [g.init("one", np.array(1.0)), h])
    return _input(g, g.head(g.relu(g.conv(h, 8, 6)), 6))


def channels_computed_bias():
    """A conv whose bias is computed from the input (a constant plus the input's mean), then a prunable conv."""
    g = G(46)
    mean = g.node("ReduceMean", ["input"], keepdims=0)
    bias = g.node("Add", [g.init("b", g.rng.normal(0, 0.1, 8)), mean])
    h = g.relu(g.node("Conv", ["input", g.init("w", g.weight((8, 3, 3, 3), 27)), bias], "conv", pads=[1] * 4))
    return _input(g, g.head(g.relu(g.conv(h, 8, 6)), 6))


def channels_flatten_matmul():
    """conv, ReLU, MaxPool to 4x4, Flatten into a bias-less MatMul (128 x 5) that is the graph output: each
    channel is 16 rows of the MatMul's weight (the head correction gives the MatMul a bias of its own)."""
    g = G(47)
    h = g.node("MaxPool", [g.relu(g.conv("input", 3, 8))], kernel_shape=[2, 2], strides=[2, 2])
    return _input(g, g.node("MatMul", [g.node("Flatten", [h]), g.init("fc", g.weight((128, 5), 128))]))


def channels_gemm_beta0():
    """conv, GlobalAveragePool, a Gemm with a bias and ReLU (its removed channels are a known constant), then a
    Gemm with beta 0, whose C (ones) is ignored: nothing to fold that constant into."""
    g = G(48)
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [g.relu(g.conv("input", 3, 8))])])
    hidden = g.relu(g.node("Gemm", [flat, g.init("fc", g.weight((16, 8), 8)), g.init("fcb", np.ones(16))],
                           transB=1))
    return _input(g, g.node("Gemm", [hidden, g.init("fc", g.weight((5, 16), 16)), g.init("fcb", np.ones(5))],
                            transB=1, beta=0.0))


def channels_variadic_max(inputs=3):
    """``inputs`` conv-ReLU branches joined by one Max (1 input: the identity), a conv and the head."""
    g = G(49)
    h = g.node("Max", [g.relu(g.conv("input", 3, 8)) for _ in range(inputs)])
    return _input(g, g.head(g.relu(g.conv(h, 8, 6)), 6))


def channels_rank0():
    """Rank-0 tensors as a YOLOv8 export has them: a conv scaled by a rank-0 initializer, and a head whose
    Reshape target is computed from the pooled tensor's batch (Shape, Gather of a rank-0 index: a rank-0
    tensor, Unsqueeze, Concat), as ``x.view(x.shape[0], -1)`` exports."""
    g = G(50)
    h = g.node("Mul", [g.relu(g.conv("input", 3, 8)), g.init("scale", np.array(0.5))])
    pooled = g.node("GlobalAveragePool", [g.relu(g.conv(h, 8, 6))])
    batch = g.node("Gather", [g.node("Shape", [pooled]), g.init("zero", np.array(0), np.int64)], axis=0)
    target = g.node("Concat", [g.node("Unsqueeze", [batch, g.init("axes", [0], np.int64)]),
                               g.init("rest", [-1], np.int64)], axis=0)
    flat = g.node("Reshape", [pooled, target])
    return _input(g, g.node("Gemm", [flat, g.init("fc", g.weight((5, 6), 6)), g.init("fcb", np.zeros(5))],
                            transB=1))


def channels_se_bias():
    """PP-LCNet's SE block as Paddle exports it: conv (no bias), BN, HardSwish, then GlobalAveragePool, 1x1
    convs without bias each followed by an Add of a (1, C, 1, 1) bias, ReLU and HardSigmoid, the gate's Mul,
    a 1x1 conv, BN, HardSwish and the head. The repair gives the bias-less convs a bias of their own."""
    g = G(51)
    x = g.node("HardSwish", [g.bn(g.conv("input", 3, 16, bias=False), 16)])
    s = g.conv(g.node("GlobalAveragePool", [x]), 16, 4, k=1, bias=False)
    s = g.relu(g.node("Add", [s, g.init("b", g.rng.normal(0, 0.1, (1, 4, 1, 1)))]))
    s = g.node("Add", [g.conv(s, 4, 16, k=1, bias=False), g.init("b", g.rng.normal(0, 0.1, (1, 16, 1, 1)))])
    h = g.node("Mul", [x, g.node("HardSigmoid", [s], alpha=1 / 6, beta=0.5)])
    h = g.node("HardSwish", [g.bn(g.conv(h, 16, 8, k=1, bias=False), 8)])
    return _input(g, g.head(h, 8))


def channels_silu():
    """YOLOv8's conv block: conv, BN, SiLU as x * Sigmoid(x) (a Mul of a tensor with itself, no join), twice, then
    the head."""
    g = G(52)
    h = g.bn(g.conv("input", 3, 8, bias=False), 8)
    h = g.node("Mul", [h, g.node("Sigmoid", [h])])
    h = g.bn(g.conv(h, 8, 6, k=1, bias=False), 6)
    return _input(g, g.head(g.node("Mul", [h, g.node("Sigmoid", [h])]), 6))


CHANNEL_HAZARDS = {
    "maxpool_indices": channels_maxpool_indices, "dropout_mask": channels_dropout_mask,
    "initializer_output": channels_initializer_output, "tensor_output": channels_tensor_output,
    "reciprocal": channels_reciprocal, "computed_bias": channels_computed_bias,
    "flatten_matmul": channels_flatten_matmul, "gemm_beta0": channels_gemm_beta0,
    "max_1": lambda: channels_variadic_max(1), "max_3": channels_variadic_max, "rank0": channels_rank0,
    "se_bias": channels_se_bias,
}


# ---------------------------------------------------------------- 18. detection heads (issue 29)
# Two small detectors over a 16x16 image seen as a 320x320 one (an 8x8 anchor grid of stride 40), so that, as
# in a real export, boxes are in pixels (0-320) and class scores in [0, 1]. Each branch's nodes are named
# box_*, cls_* or obj_* (an --exclude regex can pick a branch). tests/verify/test_detection.py decodes, suppresses
# and matches their outputs with a brute-force numpy oracle.

DETECTOR_STRIDE, DETECTOR_ANCHOR = 40.0, 60.0


def _detector_trunk(g, hint):
    """Conv-BN-Relu 3 -> 8, then stride 2 to 16 channels: an (N, 16, 8, 8) grid."""
    a = g.relu(g.bn(g.conv("input", 3, 8), 8))
    return g.relu(g.bn(g.conv(a, 8, 16, strides=[2, 2]), 16))


def _detector_branch(g, x, hint, out, bias, gain=1.0):
    """A named Conv-BN-Relu 3x3 then a 1x1 Conv to ``out`` channels with bias ``bias``, weights x ``gain``."""
    w = g.init(f"{hint}_w", g.weight((16, 16, 3, 3), 16 * 9))
    h = g.node("Conv", [x, w, g.init(f"{hint}_b", g.rng.normal(0, 0.1, 16))], f"{hint}_conv", pads=[1] * 4)
    h = g.relu(g.bn(h, 16))
    head_w = g.init(f"{hint}_head_w", gain * g.weight((out, 16, 1, 1), 16))
    return g.node("Conv", [h, head_w, g.init(f"{hint}_head_b", np.full(out, bias))], f"{hint}_head", pads=[0] * 4)


def _detector_centres(g, t):
    """Boxes from a (N, 4, 8, 8) raw map, YOLOv5's way: centre (grid + 2 sigmoid - 0.5) * stride, size
    (2 sigmoid)^2 * anchor, both in pixels: (cx, cy) and (w, h) maps (N, 2, 8, 8)."""
    ys, xs = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    grid = g.init("grid", np.stack([xs, ys])[None].astype(np.float64))
    xy_raw, wh_raw = g.node("Split", [t, g.init("split", [2, 2], np.int64)], "box_split", axis=1), None
    g.nodes[-1].output[:] = [xy_raw, xy_raw + ".wh"]
    wh_raw = xy_raw + ".wh"
    two = g.init("two", np.array(2.0))
    xy = g.node("Mul", [g.node("Add", [g.node("Sub", [g.node("Mul", [g.node("Sigmoid", [xy_raw]), two]),
                                                      g.init("half", np.array(0.5))]), grid]),
                        g.init("stride", np.array(DETECTOR_STRIDE))])
    wh2 = g.node("Mul", [g.node("Sigmoid", [wh_raw]), two])
    wh = g.node("Mul", [g.node("Mul", [wh2, wh2]), g.init("anchor", np.array(DETECTOR_ANCHOR))])
    return xy, wh


def _detector_model(g, outputs):
    """The graph with ``outputs``: (name, declared shape) pairs."""
    ins = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs]
    graph = helper.make_graph(g.nodes, "zoo", ins, outs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="zoo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _biased(model, feeds, head, quantile, logit):
    """``model`` with the bias of the 1x1 Conv ``head`` set so that, per output channel, the ``quantile`` of its
    output over ``feeds`` lands on ``logit``: each class passes a score threshold on a set share of anchors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    node = next(n for n in probe.graph.node if n.name == head)
    probe.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    raw = onnxruntime.InferenceSession(probe.SerializeToString()).run([node.output[0]], feeds)[0].astype(np.float64)
    bias = next(t for t in model.graph.initializer if t.name == node.input[2])
    old = numpy_helper.to_array(bias).astype(np.float64)
    shift = logit - np.quantile(np.moveaxis(raw, 1, 0).reshape(len(old), -1), quantile, axis=1)
    bias.CopyFrom(numpy_helper.from_array((old + shift).astype(np.float32), bias.name))
    return model


def yolo_detector(channels_first=True, classes=3, seed=31, n=48):
    """A YOLO-style detector, one output. ``channels_first``: (N, 4+C, 64) with no objectness, as Ultralytics
    YOLOv8 exports; else (N, 64, 5+C) with an objectness column, as YOLOv5 exports. Boxes cx, cy, w, h in
    pixels; scores sigmoids of logits spread over several units, biased so that each class scores >= 0.73 on
    about 5% of the anchors (a few confident detections per image). Returns (model, feeds)."""
    g = G(seed)
    trunk = _detector_trunk(g, "trunk")
    xy, wh = _detector_centres(g, _detector_branch(g, trunk, "box", 4, 0.0))
    parts = [xy, wh]
    if not channels_first:
        parts.append(g.node("Sigmoid", [_detector_branch(g, trunk, "obj", 1, 1.0)], "obj_sigmoid"))
    # confident class scores, as a trained detector's: logits spread over several units
    parts.append(g.node("Sigmoid", [_detector_branch(g, trunk, "cls", classes, -2.5, gain=4.0)], "cls_sigmoid"))
    features = 4 + classes + (not channels_first)
    joined = g.node("Concat", parts, "concat", axis=1)
    out = g.node("Reshape", [joined, g.init("shape", [0, features, 64], np.int64)], "output")
    shape = ["N", features, 64]
    if not channels_first:
        out, shape = g.node("Transpose", [out], "output", perm=[0, 2, 1]), ["N", 64, features]
    g.nodes[-1].output[0] = "output"
    feeds = {"input": _feed((3, 16, 16), n=n, seed=seed)}
    model = _detector_model(g, [("output", shape)])
    if not channels_first:  # objectness above 0.5 on a fifth of the anchors, each class above 0.6 on 5%
        _biased(model, feeds, next(n.name for n in model.graph.node if n.name.startswith("obj_head")), 0.8, 0.0)
        return _biased(model, feeds, next(n.name for n in model.graph.node if n.name.startswith("cls_head")),
                       0.95, 0.4), feeds
    return _biased(model, feeds, next(n.name for n in model.graph.node if n.name.startswith("cls_head")),
                   0.95, 1.0), feeds


def ssd_detector(classes=3, seed=32, n=48):
    """An SSD-style detector, two outputs: boxes (N, 64, 4) as x1, y1, x2, y2 in pixels, and scores
    (N, 64, 1+C) from a Softmax whose class 0 is the background (biased up, so that most anchors are
    background). Returns (model, feeds)."""
    g = G(seed)
    trunk = _detector_trunk(g, "trunk")
    xy, wh = _detector_centres(g, _detector_branch(g, trunk, "box", 4, 0.0))
    half = g.node("Mul", [wh, g.init("halve", np.array(0.5))])
    corners = g.node("Concat", [g.node("Sub", [xy, half]), g.node("Add", [xy, half])], "box_concat", axis=1)
    flat = g.node("Reshape", [corners, g.init("shape", [0, 4, 64], np.int64)])
    g.node("Transpose", [flat], "boxes", perm=[0, 2, 1])
    g.nodes[-1].output[0] = "boxes"
    bias = np.concatenate([[2.0], np.zeros(classes)])  # the background wins most anchors
    logits = _detector_branch(g, trunk, "cls", 1 + classes, 0.0)
    g.inits[-1].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), g.inits[-1].name))
    flat = g.node("Reshape", [logits, g.init("cls_shape", [0, 1 + classes, 64], np.int64)])
    g.node("Softmax", [g.node("Transpose", [flat], perm=[0, 2, 1])], "scores", axis=-1)
    g.nodes[-1].output[0] = "scores"
    return (_detector_model(g, [("boxes", ["N", 64, 4]), ("scores", ["N", 64, 1 + classes])]),
            {"input": _feed((3, 16, 16), n=n, seed=seed)})


def detector_with_statistics(stale=("cls_",), shift=2.0, scale=9.0, n=96, seed=31):
    """:func:`yolo_detector` (channels first) whose BN running statistics are the dense model's own on its
    calibration samples, except, for the BNs after a Conv named with a prefix in ``stale``, far from them
    (variance x ``scale``, mean shifted by ``shift`` standard deviations), as after training on other data.
    Restoring the running statistics (``reference="running"``) then repairs the rest and moves that branch
    away from the dense model. Returns (model, feeds)."""
    model, feeds = yolo_detector(seed=seed, n=n)
    bns = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    producers = {out: node for node in model.graph.node for out in node.output}
    for bn in bns:  # in graph order: each BN's input depends on the statistics set before it
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_tensor_value_info(bn.input[0], TensorProto.FLOAT, None))
        pre = onnxruntime.InferenceSession(probe.SerializeToString()).run([bn.input[0]], feeds)[0].astype(np.float64)
        mean, var = pre.mean((0, 2, 3)), pre.var((0, 2, 3))
        if producers[bn.input[0]].name.startswith(tuple(stale)):
            mean, var = mean + shift * np.sqrt(var), scale * var
        inits = {t.name: t for t in model.graph.initializer}
        inits[bn.input[3]].CopyFrom(numpy_helper.from_array(mean.astype(np.float32), bn.input[3]))
        inits[bn.input[4]].CopyFrom(numpy_helper.from_array(var.astype(np.float32), bn.input[4]))
    return model, feeds


def _oracle_conv(x, w, b, stride=1):
    """numpy's Conv (cross-correlation, zero padding k // 2) of (N, C, H, W) ``x`` in float64."""
    k = w.shape[2]
    padded = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    out_h, out_w = (x.shape[2] + 2 * (k // 2) - k) // stride + 1, (x.shape[3] + 2 * (k // 2) - k) // stride + 1
    out = np.zeros((len(x), w.shape[0], out_h, out_w))
    for i in range(k):
        for j in range(k):
            patch = padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def _oracle_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _detector_oracle_parts(model, x):
    """numpy's forward pass of a zoo detector's trunk and branches on ``x``: {"box": (N, 4, 8, 8) raw box map,
    "xy", "wh" (pixels), "cls", "obj" (raw 1x1 Conv outputs)}, every weight read from ``model`` in float64."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    bns = {n.input[0]: n for n in model.graph.node if n.op_type == "BatchNormalization"}

    def conv(node, h):
        stride = next((a.ints[0] for a in node.attribute if a.name == "strides"), 1)
        return _oracle_conv(h, values[node.input[1]], values[node.input[2]], stride)

    def bn_relu(node, h):
        bn = bns[node.output[0]]
        scale, bias, mean, var = (values[name][None, :, None, None] for name in bn.input[1:])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        return np.maximum(scale * (h - mean) / np.sqrt(var + eps) + bias, 0)

    h = x.astype(np.float64)
    for node in [n for n in convs if n.name.startswith("conv")][:2]:  # the trunk
        h = bn_relu(node, conv(node, h))
    parts = {}
    for hint in ("box", "cls", "obj"):
        found = [n for n in convs if n.name.startswith(f"{hint}_conv")]
        if found:
            head = next(n for n in convs if n.name.startswith(f"{hint}_head"))
            parts[hint] = conv(head, bn_relu(found[0], conv(found[0], h)))
    ys, xs = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    box = parts["box"]
    parts["xy"] = (2 * _oracle_sigmoid(box[:, :2]) - 0.5 + np.stack([xs, ys])[None]) * DETECTOR_STRIDE
    parts["wh"] = (2 * _oracle_sigmoid(box[:, 2:])) ** 2 * DETECTOR_ANCHOR
    return parts


def yolo_detector_oracle(model, x, channels_first=True):
    """numpy's forward pass of :func:`yolo_detector` (and :func:`detector_with_statistics`): (N, 4+C, 64), or
    (N, 64, 5+C) with the objectness column when not ``channels_first``."""
    p = _detector_oracle_parts(model, x)
    maps = [p["xy"], p["wh"]] + ([] if channels_first else [_oracle_sigmoid(p["obj"])]) + [_oracle_sigmoid(p["cls"])]
    joined = np.concatenate(maps, axis=1)
    out = joined.reshape(len(x), joined.shape[1], 64)
    return out if channels_first else out.transpose(0, 2, 1)


def ssd_detector_oracle(model, x):
    """numpy's forward pass of :func:`ssd_detector`: (boxes (N, 64, 4) as x1 y1 x2 y2, scores (N, 64, 1+C) from
    a Softmax over the classes, the background first)."""
    p = _detector_oracle_parts(model, x)
    corners = np.concatenate([p["xy"] - p["wh"] / 2, p["xy"] + p["wh"] / 2], axis=1)
    logits = p["cls"].reshape(len(x), p["cls"].shape[1], 64).transpose(0, 2, 1)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return corners.reshape(len(x), 4, 64).transpose(0, 2, 1), exp / exp.sum(-1, keepdims=True)


# ---------------------------------------------------------------- transformer graphs exported by torch.onnx (issue 30)
# Four blocks written as torch.nn.Modules with seeded, non-trivial weights (random LayerNorm gains and shifts,
# nonzero biases), exported by torch.onnx with sample_models/train.py's settings (the TorchScript exporter, opset
# 17, constant folding: each Linear becomes a MatMul by a constant (C_in, C_out) weight and an Add of its bias;
# Reshape targets stay Constant nodes, as the exporter writes them). The PyTorch module, run in float64, is each
# graph's oracle (transformer_oracle). torch is a test-only dependency: it is imported when a graph is first built,
# and a test that builds one is skipped without it. A builder's ``seed`` draws the weights (the oracle takes the
# same one) and the calibration tokens. TRANSFORMERS lists them.

TRANSFORMER_OPSET = 17


@lru_cache(maxsize=None)
def _torch_blocks() -> dict:
    """name -> (module factory, input shape without the batch), the modules defined once torch is imported."""
    import importlib.util

    torch = pytest.importorskip("torch")
    nn = torch.nn
    path = Path(__file__).resolve().parents[1] / "sample_models" / "train.py"
    spec = importlib.util.spec_from_file_location("sample_models_train", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # its TransformerBlock and ConvNeXtBlock, as the sample models use them

    class LinearLayerNorm(nn.Module):
        """Tokens -> Linear -> LayerNorm (last axis) -> GELU -> Linear."""

        def __init__(self, dim=8, hidden=16):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))

    class WindowBlock(nn.Module):
        """A Swin block without the shift: LN, window partition, multi-head attention in each window with a
        relative-position bias (a learned table gathered by a constant index, as Swin's), window reverse,
        proj, residual; then LN, MLP, residual. Tokens (N, grid², C) in row-major order."""

        def __init__(self, dim=16, heads=2, window=4, grid=8, mlp_ratio=2):
            super().__init__()
            self.dim, self.heads, self.window, self.grid = dim, heads, window, grid
            self.scale = (dim // heads) ** -0.5
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
            coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
            self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
            self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

        def bias(self):
            """(heads, window², window²): the table gathered by the relative-position index."""
            n = self.window**2
            return self.table[self.index.reshape(-1)].reshape(n, n, self.heads).permute(2, 0, 1)

        def forward(self, x):
            w, g, c, n = self.window, self.grid, self.dim, self.window**2
            h = self.norm1(x).reshape(-1, g // w, w, g // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
            qkv = self.qkv(h).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
            attn = torch.softmax(q @ k.transpose(-2, -1) + self.bias(), dim=-1)
            h = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))
            h = h.reshape(-1, g // w, g // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, g * g, c)
            x = x + h
            return x + self.mlp(self.norm2(x))

    return {"ln_after_linear": (LinearLayerNorm, (6, 8)),
            "mha_heads": (lambda: train.TransformerBlock(16, 4, 6, 2), (6, 16)),
            "convnext_block": (lambda: train.ConvNeXtBlock(8), (8, 8, 8)),
            "window_attention": (WindowBlock, (64, 16))}


def transformer_module(name: str, seed: int = 0):
    """The eval-mode float32 torch module of the transformer graph ``name``, its weights drawn from ``seed``
    (PyTorch's default init, then every LayerNorm's gain in [0.5, 1.5] and shift N(0, 0.1)); the global torch
    RNG is left as it was."""
    import torch

    factory, _ = _torch_blocks()[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = factory()
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.normal_(norm.bias, 0, 0.1)
    return module.eval()


def transformer_oracle(name: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """PyTorch's output of the transformer graph ``name`` (its module in float64) on ``x``."""
    import torch

    with torch.no_grad():
        return transformer_module(name, seed).double()(torch.from_numpy(np.asarray(x, np.float64))).numpy()


@lru_cache(maxsize=None)
def _exported(name: str, seed: int, fold: bool = True) -> bytes:
    """The serialised ONNX export of ``transformer_module(name, seed)``, once per process; ``fold``: the
    exporter's constant folding."""
    import io
    import warnings

    import torch

    module, (_, shape) = transformer_module(name, seed), _torch_blocks()[name]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (torch.zeros(2, *shape),), buffer, dynamo=False, opset_version=TRANSFORMER_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, do_constant_folding=fold,
                          export_params=True, keep_initializers_as_inputs=False)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    return buffer.getvalue()


def _transformer(name: str, seed: int, n: int, fold: bool = True):
    model = onnx.load_from_string(_exported(name, seed, fold))  # a fresh copy: callers may change it
    return model, {"input": _feed(_torch_blocks()[name][1], n=n, seed=seed + 1)}


def ln_after_linear(seed=0, n=N):
    """(N, 6, 8) tokens -> Linear to 16 (MatMul, Add) -> LayerNormalization (axis -1) -> GELU (Div √2, Erf, Add 1,
    Mul, Mul 0.5) -> Linear to 8. Oracle: ``transformer_oracle("ln_after_linear", x)``."""
    return _transformer("ln_after_linear", seed, n)


def mha_heads(seed=0, n=N):
    """sample_models/train.py's pre-norm ViT TransformerBlock (C=16, 4 heads of 4, T=6, MLP ratio 2) on (N, 6, 16)
    tokens: LayerNormalization; q, k and v Linears, each Reshape to the constant (-1, 6, 4, 4) and Transpose
    (0, 2, 1, 3), k's (0, 2, 3, 1) instead; MatMul q·kᵀ, Mul by the scale 0.5 after it, Softmax, MatMul with v,
    Transpose (0, 2, 1, 3), Reshape (-1, 6, 16); proj, residual Add; LayerNormalization, fc1, Erf-GELU, fc2,
    residual Add. Oracle: ``transformer_oracle("mha_heads", x)``."""
    return _transformer("mha_heads", seed, n)


def convnext_block(seed=0, n=N):
    """sample_models/train.py's ConvNeXtBlock (C=8) on (N, 8, 8, 8) NCHW: 7x7 depthwise Conv (group 8, pads 3,
    bias), Transpose (0, 2, 3, 1), LayerNormalization (axis -1), Linear to 32, Erf-GELU, Linear to 8, Transpose
    (0, 3, 1, 2), residual Add. Oracle: ``transformer_oracle("convnext_block", x)``."""
    return _transformer("convnext_block", seed, n)


def window_attention(seed=0, n=N, fold=True):
    """A Swin block (no shift) on (N, 64, 16) tokens of an 8x8 grid: LayerNormalization; window partition as
    Reshape (-1, 2, 4, 2, 4, 16), Transpose (0, 1, 3, 2, 4, 5), Reshape (-1, 16, 16) (4x4 windows); one qkv
    Linear to 48, Reshape (-1, 16, 3, 2, 8), Transpose (2, 0, 3, 1, 4), Gather 0/1/2 on axis 0; q Mul by the scale
    8^-0.5 before the MatMul with kᵀ (Transpose (0, 1, 3, 2)); Add of the relative-position bias, a (2, 16, 16)
    constant (constant folding gathers the table by its index at export); Softmax, MatMul with v, Transpose
    (0, 2, 1, 3), Reshape (-1, 16, 16), proj; window reverse as Reshape (-1, 2, 2, 4, 4, 16), Transpose
    (0, 1, 3, 2, 4, 5), Reshape (-1, 64, 16); residual Add; LayerNormalization, MLP, residual Add.
    Oracle: ``transformer_oracle("window_attention", x)``.

    ``fold=False``: exported without constant folding, as Swin's table is then kept: the bias is
    Gather(table (49, 2), Reshape(index (16, 16) int64, [-1])), Reshape (16, 16, 2), Transpose (2, 0, 1), and each
    Linear a MatMul by Transpose(weight (C_out, C_in), perm (1, 0))."""
    return _transformer("window_attention", seed, n, fold)


TRANSFORMERS = {"ln_after_linear": ln_after_linear, "mha_heads": mha_heads, "convnext_block": convnext_block,
                "window_attention": window_attention}


# ---------------------------------------------------------------- LayerNorm sites (issue 30)


def linear_layernorm(tokens=5, width=8, axis=-1, bias=True, computed_scale=False, seed=61):
    """Linear (MatMul + Add) -> LayerNormalization over ``axis`` -> Linear on (N, T, C) tokens, as torch.onnx
    writes a pre-norm block's first steps. ``bias``: LayerNorm's β is given (else the optional input is absent);
    ``computed_scale``: its γ is computed at run time (a constant times 1), so it is no site. Shapes are inferred,
    so that the LayerNorm's input rank is known."""
    g = G(seed)
    h = g.node("Add", [g.node("MatMul", ["input", g.init("w_in", g.weight((width, width), width))]),
                       g.init("b_in", g.rng.normal(0, 0.5, width))])
    scale = g.init("lnw", g.rng.uniform(0.5, 1.5, width))
    if computed_scale:
        scale = g.node("Mul", [scale, g.init("one", np.float32(1))])
    ln_inputs = [h, scale] + ([g.init("lnb", g.rng.normal(0, 0.2, width))] if bias else [])
    normed = g.node("LayerNormalization", ln_inputs, "ln", axis=axis, epsilon=1e-5)
    out = g.node("MatMul", [normed, g.init("w_out", g.weight((width, 3), width))])
    model = onnx.shape_inference.infer_shapes(g.model([("input", ["N", tokens, width], None)], out))
    return model, {"input": _feed((tokens, width), n=48, seed=seed)}


def linear_layernorm_oracle(model, x):
    """numpy's forward pass of :func:`linear_layernorm` (a last-axis LayerNorm): (LayerNorm output, output)."""
    w = {t.name.rstrip("0123456789"): numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x.astype(np.float64) @ w["w_in"] + w["b_in"]
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * w["lnw"] + w.get("lnb", 0.0)
    return normed, normed @ w["w_out"]
