"""Graph surgery for removed channels: a masked model of the dense shapes, and the shrunk model.

The masked model is what the repair stages work on: the removed channels' filters are zero, and so are the
consumer weights that read them, except where a removed channel is a known constant (its producer's bias,
then BN, activations and pooling) and the consumer sees it everywhere (a 1x1 or unpadded Conv, a Gemm):
there the constant's contribution is kept, and :func:`shrink` folds it into the consumer's bias. Shrinking
the masked model (initializers sliced, Reshape targets and depthwise groups updated) therefore computes
exactly what the masked model computes.
"""

from __future__ import annotations

import numpy as np

from asr_onnx.prune.channels.groups import Groups

ACTIVATIONS = {
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, float(n.attrs.get("alpha", 0.01)) * v),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "HardSigmoid": lambda v, n: np.clip(float(n.attrs.get("alpha", 0.2)) * v + float(n.attrs.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda v, n: v * np.clip(v / 6.0 + 0.5, 0, 1),
    "Tanh": lambda v, n: np.tanh(v),
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
}
PASS = ("Identity", "Dropout", "Cast", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
        "ReduceMin", "Squeeze", "Unsqueeze")
BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
          "Min": np.minimum}


def positions(layout, keep: dict, sizes) -> np.ndarray:
    """The positions of a layout that survive, given the kept channels of each group (absent: all kept)."""
    parts, offset = [np.zeros(0, np.int64)], 0
    for g, repeat in layout:
        kept = keep.get(g)
        kept = np.arange(sizes[g]) if kept is None else np.asarray(kept, np.int64)
        parts.append(offset + (kept[:, None] * repeat + np.arange(repeat)).ravel())
        offset += sizes[g] * repeat
    return np.concatenate(parts)


def removed_positions(layout, keep: dict, sizes) -> np.ndarray:
    span = sum(sizes[g] * r for g, r in layout)
    return np.setdiff1d(np.arange(span), positions(layout, keep, sizes))


def exact_fold(node) -> bool:
    """Whether a consumer sees a constant input channel as one constant at every output (no zero padding)."""
    if node.op == "Gemm":
        return True
    if node.op != "Conv":
        return False
    kernel = node.inputs[1].shape[2:]
    unpadded = not any(node.attrs.get("pads", [0])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    return unpadded or all(k == 1 for k in kernel)


def constants(graph, groups: Groups) -> dict[str, np.ndarray]:
    """Tensor name -> per position, the value a channel takes when its producer's filter is zero (NaN: not
    one constant), for every tracked tensor."""
    import onnx_graphsurgeon as gs

    values: dict[str, np.ndarray] = {}
    axes = {(e.node, e.index): e.axis for e in groups.edits}
    for node in graph.nodes:
        out = node.outputs[0].name if node.outputs else None
        if out not in groups.layouts or not groups.layouts[out]:
            continue
        span = sum(groups.sizes[g] * r for g, r in groups.layouts[out])
        ins = [values.get(t.name) if not isinstance(t, gs.Constant) else None for t in node.inputs]
        with np.errstate(all="ignore"):
            value = _constant(node, ins, span, out in groups.depthwise, axes)
        values[out] = np.broadcast_to(np.asarray(value, np.float64), (span,)).copy()
    return values


def _constant(node, ins, span, depthwise, axes):
    import onnx_graphsurgeon as gs

    op, x = node.op, ins[0]
    nan = np.full(span, np.nan)
    if op == "Conv":
        bias = node.inputs[2].values.astype(np.float64) if len(node.inputs) > 2 else np.zeros(span)
        if depthwise:
            if x is None or not exact_fold(node):
                return nan
            return node.inputs[1].values.reshape(span, -1).astype(np.float64).sum(1) * x + bias
        return bias
    if op == "Gemm":
        if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
            return np.zeros(span)
        return float(node.attrs.get("beta", 1.0)) * np.ravel(node.inputs[2].values).astype(np.float64)
    if op == "MatMul":
        return np.zeros(span)
    if x is None and op not in BINARY:
        return nan
    if op == "BatchNormalization":
        scale, bias, mean, var = (t.values.astype(np.float64) for t in node.inputs[1:5])
        return scale * (x - mean) / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5))) + bias
    if op in ACTIVATIONS:
        return ACTIVATIONS[op](x, node)
    if op == "Clip":
        low, high = _clip_bounds(node)
        return np.clip(x, low, high)
    if op == "AveragePool":
        padded = any(node.attrs.get("pads", [0])) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        return nan if padded and int(node.attrs.get("count_include_pad", 0)) else x
    if op in PASS:
        return x
    if op in BINARY:
        out = node.outputs[0].name
        operands = [v if v is not None else _per_position(t, span, axes.get((out, i)))
                    for i, (v, t) in enumerate(zip(ins, node.inputs))]
        return BINARY[op](*operands)
    if op == "Concat":
        return np.concatenate(ins)
    if op in ("Flatten", "Reshape"):
        return np.repeat(x, span // len(x))
    return nan


def _clip_bounds(node):
    import onnx_graphsurgeon as gs

    if "min" in node.attrs or "max" in node.attrs:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        t = node.inputs[i] if len(node.inputs) > i else None
        bounds.append(float(t.values) if isinstance(t, gs.Constant) and t.values.size == 1 else
                      default if t is None or t.name == "" else np.nan)
    return bounds


def _per_position(t, span, axis):
    """A constant operand as one value per position of axis 1 (``axis``: its own axis that runs along it,
    None when it is constant along it), or NaN where it varies along other axes."""
    import onnx_graphsurgeon as gs

    if not isinstance(t, gs.Constant):
        return np.full(span, np.nan)
    values = np.asarray(t.values, np.float64)
    rows = values.reshape(1, -1) if axis is None else np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    if not np.all(rows == rows[:, :1]):
        return np.full(span, np.nan)
    return np.broadcast_to(rows[:, 0], (span,))


def _nodes(graph) -> dict:
    return {n.outputs[0].name: n for n in graph.nodes if n.outputs}


def _take(values: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.take(values, index, axis=axis))


def _zero(values: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    values = np.array(values, copy=True)
    view = np.moveaxis(values, axis, 0)
    view[index] = 0
    return values


def mask(model, groups: Groups, keep: dict):
    """The dense-shaped model with the removed channels' filters zeroed, and the consumer weights that read
    them zeroed where their constant cannot be folded into the consumer's bias. ``keep``: group -> kept channels.
    """
    from asr_onnx.model.graph import to_graph, to_model

    if not keep:
        return model
    graph = to_graph(model)
    nodes = _nodes(graph)
    for edit in groups.edits:
        if edit.role == "producer":
            removed = removed_positions(edit.layout, keep, groups.sizes)
            const = nodes[edit.node].inputs[edit.index]
            const.values = _zero(const.values, edit.axis, removed)
    values = constants(graph, groups)
    for edit in groups.edits:
        if edit.role != "consumer":
            continue
        node = nodes[edit.node]
        removed = removed_positions(edit.layout, keep, groups.sizes)
        known = np.isfinite(values.get(node.inputs[0].name, np.full(1, np.nan))[removed]) if removed.size else []
        if removed.size and not (exact_fold(node) and np.all(known)):
            node.inputs[edit.index].values = _zero(node.inputs[edit.index].values, edit.axis, removed)
    return to_model(graph, model)


def shrink(model, groups: Groups, keep: dict):
    """The model with every removed channel sliced away; computes what :func:`mask`'s model computes.

    Returns the input model itself when nothing is removed.
    """
    import onnx_graphsurgeon as gs

    from asr_onnx.model.graph import to_graph, to_model

    if not keep:
        return model
    graph = to_graph(model)
    nodes = _nodes(graph)
    values = constants(graph, groups)
    for edit in groups.edits:
        if edit.role == "consumer":
            _fold(nodes[edit.node], edit, values, keep, groups)
    for edit in groups.edits:
        const = nodes[edit.node].inputs[edit.index]
        const.values = _take(const.values, edit.axis, positions(edit.layout, keep, groups.sizes))
    for name, layout in groups.depthwise.items():
        nodes[name].attrs["group"] = int(len(positions(layout, keep, groups.sizes)))
    for name, layout in groups.reshapes.items():
        node = nodes[name]
        target = np.array(node.inputs[1].values, np.int64)
        if target[1] != -1:
            target[1] = len(positions(layout, keep, groups.sizes))
            node.inputs[1] = gs.Constant(f"{name}_target", target)
    keep_shapes = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep_shapes:
            tensor.shape = None
    graph.cleanup().toposort()
    return to_model(graph, model)


def _fold(node, edit, values, keep, groups) -> None:
    """Adds what a removed constant channel contributed to a consumer's bias, where that is exact."""
    import onnx_graphsurgeon as gs

    removed = removed_positions(edit.layout, keep, groups.sizes)
    const = values.get(node.inputs[0].name)
    if not removed.size or const is None or not exact_fold(node) or not np.all(np.isfinite(const[removed])):
        return
    weight = node.inputs[1].values
    columns = np.moveaxis(np.take(weight.astype(np.float64), removed, axis=edit.axis), edit.axis, -1)
    if node.op == "Conv":  # (out, removed, kernel...) summed over the kernel
        contribution = columns.reshape(weight.shape[0], -1, removed.size).sum(1) @ const[removed]
        scale = 1.0
    else:  # Y = alpha A B + beta C: C takes alpha / beta of it
        contribution = columns @ const[removed]
        scale = float(node.attrs.get("alpha", 1.0)) / float(node.attrs.get("beta", 1.0))
    if not np.any(contribution):
        return
    bias = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    old = np.zeros(contribution.size) if bias is None else bias.values.astype(np.float64)
    if bias is not None and old.size == contribution.size:  # sliced later with the producer's edits
        bias.values = (old + scale * contribution.reshape(old.shape)).astype(bias.values.dtype)
        return
    full = old.ravel()[0] + scale * contribution  # a new per-output bias (none, or a scalar one), sliced here
    kept = positions(groups.layouts[node.outputs[0].name], keep, groups.sizes)
    new = gs.Constant(f"{node.outputs[0].name}_channels_bias", full[kept].astype(weight.dtype))
    if bias is None and len(node.inputs) < 3:
        node.inputs.append(new)
    else:
        node.inputs[2] = new
