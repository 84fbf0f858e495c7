"""Parameters and multiply-accumulates of a model, per sample."""

from __future__ import annotations

import numpy as np
import onnx


def params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point initializer and Constant node value (old exporters write weights as
    Constant nodes, which the shrunk graph stores as initializers)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in floats))


def layer_macs(model: onnx.ModelProto, shapes: dict | None = None) -> dict[str, int]:
    """Node (first output name) -> multiply-accumulates per sample of each Conv, ConvTranspose, Gemm and MatMul
    with a constant weight, from ONNX shape inference (a node whose shapes it cannot find counts 0).

    Args:
        shapes: the model's :func:`asr_onnx.model.graph.static_shapes`, when the caller has them. Defaults to None
            (inferred here).
    """
    from asr_onnx.model.graph import static_shapes

    shapes = static_shapes(model) if shapes is None else shapes
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight, out = weights.get(node.input[1]), shapes.get(node.output[0])
        if weight is None or out is None or not all(isinstance(d, int) for d in out[1:]):
            continue
        if node.op_type == "Conv":  # every output element: (in / group) * kernel products
            macs[node.output[0]] = int(np.prod(out[1:], dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":  # every input element: (out / group) * kernel products
            x = shapes.get(node.input[0])
            if x is not None and all(isinstance(d, int) for d in x[1:]):
                macs[node.output[0]] = int(np.prod(x[1:], dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
        else:  # rows per sample times the weight
            rows = int(np.prod(out[1:-1], dtype=np.int64)) if len(out) > 2 else 1
            macs[node.output[0]] = rows * int(np.prod(weight, dtype=np.int64))
    return macs


def activation_macs(model: onnx.ModelProto, shapes: dict | None = None) -> int:
    """Multiply-accumulates per sample of the MatMuls whose two inputs are both computed (attention's Q·Kᵀ and
    its product with V): the output elements times the reduction length, from ONNX shape inference (a node
    whose shapes it cannot find counts 0)."""
    from asr_onnx.model.graph import static_shapes

    shapes = static_shapes(model) if shapes is None else shapes
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                              for o in n.output}
    total = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(name in constants for name in node.input[:2]):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or out is None or not all(isinstance(d, int) for d in (*out[1:], a[-1])):
            continue
        total += int(np.prod(out[1:], dtype=np.int64)) * int(a[-1])
    return total


def macs(model: onnx.ModelProto, dims: dict | None = None) -> int:
    """Multiply-accumulates per sample of the model's Conv, ConvTranspose, Gemm and MatMul layers, and of the
    MatMuls between two activations (attention).

    Args:
        dims: graph input name -> the dims to infer shapes from (a calibration batch's), where the declared
            ones leave some layers without shapes (a dynamic width, say); those would count 0. Defaults to None.
    """
    from asr_onnx.model.graph import static_shapes

    shapes = static_shapes(model, dims=dims)
    return int(sum(layer_macs(model, shapes).values())) + activation_macs(model, shapes)
