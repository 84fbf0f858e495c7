"""A QDQ model's quantized weights, read and seen in float.

A QDQ model keeps each layer weight (and bias) as integer codes behind a DequantizeLinear:
``w = (q - zero) * scale``, one scale per output channel or one per tensor. :func:`dequantize_weights`
replaces those nodes by the float tensors they compute (exactly: float32, as onnxruntime computes them),
so that every stage of a repair (pruning, measurement, correction, refit) works on the model as it runs,
its activations still quantized; :mod:`asr_onnx.model.requantize` puts integer codes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

#: layer op -> the inputs a quantized weight (1) and bias (2) are read at.
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


@dataclass
class QuantizedTensor:
    """One DequantizeLinear of a constant that a layer reads as its weight or bias.

    Attributes:
        output: the DequantizeLinear's output (the name the layer reads).
        node: the DequantizeLinear node (a copy).
        codes: the integer codes, in their own dtype.
        scale: the float32 scale(s), as stored.
        zero: the zero point(s), as stored (zeros of the codes' dtype when absent).
        axis: the axis the scales run along, or None for one scale.
        readers: (layer node name, input index) of every input it feeds.
    """

    output: str
    node: onnx.NodeProto
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    axis: int | None
    readers: list = field(default_factory=list)

    def along(self, values: np.ndarray) -> np.ndarray:
        """A per-axis array shaped to broadcast over the codes (a scalar stays as it is)."""
        if self.axis is None:
            return values.reshape(())
        view = [1] * self.codes.ndim
        view[self.axis] = values.size
        return values.reshape(view)

    def signed(self) -> np.ndarray:
        """The codes less their zero point, int64."""
        return self.codes.astype(np.int64) - self.along(self.zero.astype(np.int64))

    def values(self) -> np.ndarray:
        """The float32 tensor the DequantizeLinear computes."""
        return self.signed().astype(np.float32) * self.along(self.scale.astype(np.float32))


def _array(inits: dict, name: str):
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _default_domain(node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def quantized_tensors(model: onnx.ModelProto) -> dict[str, QuantizedTensor]:
    """Every DequantizeLinear of an integer constant whose output only layers read as weight or bias.

    Returns:
        DequantizeLinear output name -> :class:`QuantizedTensor`; empty for a float model.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    other: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        places = WEIGHT_INPUTS.get(node.op_type, ()) if _default_domain(node) else ()
        for index, name in enumerate(node.input):
            if index in places and node.name:
                readers.setdefault(name, []).append((node.name, index))
            elif name:
                other.add(name)
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not _default_domain(node):
            continue
        out = node.output[0]
        codes, scale = _array(inits, node.input[0]), _array(inits, node.input[1]) if len(node.input) > 1 else None
        if codes is None or scale is None or codes.dtype.kind not in "iu" or out in other or out not in readers:
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue  # blocked quantization: scales per block, not per channel
        zero = _array(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and zero is None:
            continue
        zero = np.zeros(scale.shape, codes.dtype) if zero is None else zero
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim if scale.size > 1 else None
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        found[out] = QuantizedTensor(out, kept, codes, scale, zero, axis, readers[out])
    return found


def dequantize_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, QuantizedTensor]]:
    """A copy of ``model`` whose quantized layer weights and biases are float32 initializers.

    Each DequantizeLinear of :func:`quantized_tensors` is replaced by the float32 tensor it computes,
    under its output's name; its codes, scales and zero points go where nothing else reads them. The
    activations' QuantizeLinear/DequantizeLinear stay, so the copy computes what the model computes
    (in a session that leaves onnxruntime's WeightBiasQuantization off: :mod:`asr_onnx.model.session`).

    Returns:
        (the copy, :func:`quantized_tensors` of ``model``); the copy is ``model`` itself when it has none.
    """
    tensors = quantized_tensors(model)
    if not tensors:
        return model, tensors
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = [node for node in graph.node if not (node.op_type == "DequantizeLinear" and node.output[0] in tensors)]
    graph.ClearField("node")
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used or t.name in tensors]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.initializer.extend(numpy_helper.from_array(t.values(), name) for name, t in tensors.items())
    return copy, tensors


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two models have the same nodes (in any order) and the same values of every initializer a node reads."""
    def content(model):
        nodes = sorted(node.SerializeToString(deterministic=True) for node in model.graph.node)
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        inits = {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                 for t in model.graph.initializer if t.name in used}
        return nodes, inits, [o.name for o in model.graph.output], [i.name for i in model.graph.input]

    return content(a) == content(b)


def runtime_of(model: onnx.ModelProto) -> str:
    """Which runtimes a QDQ model's form is for: TensorRT takes only int8 activations with zero point 0."""
    inits = {t.name: t for t in model.graph.initializer}
    zeros = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
             if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    if zeros and all(z.dtype == np.int8 and not z.any() for z in zeros):
        return "TensorRT (trtexec --int8) and onnxruntime"
    return "onnxruntime (its uint8 activations have zero points: TensorRT takes int8 ones at zero point 0)"


def unique_name(name: str, taken: set) -> str:
    """``name``, or ``name_1``, ``name_2``... the first not in ``taken``; added to ``taken``."""
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def float_twin(float_model: onnx.ModelProto, fake: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of the float model whose layer outputs carry the names the quantized model's layers write.

    onnxruntime's quantizer removes a Relu after a Conv (the output's zero point clips instead) and gives
    the Conv the Relu's output name, so the same name means different tensors in the two models. Layers
    are matched by node name (and op); a float tensor that already has a target name is renamed away first.

    Args:
        float_model: the float model the quantized one was made from (every node named).
        fake: the quantized model's float-weight form (:func:`dequantize_weights`).

    Returns:
        (the twin, quantized layer output name -> the float layer's output name, for the matched layers).
    """
    fake_out = {n.name: (n.op_type, n.output[0]) for n in fake.graph.node if n.name and n.op_type in WEIGHT_INPUTS}
    pairs = {}
    for node in float_model.graph.node:
        target = fake_out.get(node.name)
        if target and target[0] == node.op_type:
            pairs[node.output[0]] = target[1]
    twin = onnx.ModelProto()
    twin.CopyFrom(float_model)
    names = {n for node in twin.graph.node for n in list(node.input) + list(node.output)}
    names |= {v.name for v in list(twin.graph.input) + list(twin.graph.output)}
    targets = set(pairs.values())
    taken = names | targets
    rename = {name: unique_name(f"{name}.asr_float", taken) for name in names if name in targets and name not in pairs}
    rename.update(pairs)
    for node in twin.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
    for value in list(twin.graph.output) + list(twin.graph.value_info):
        value.name = rename.get(value.name, value.name)
    return twin, {target: source for source, target in pairs.items()}
