"""Graph surgery for removed channels: a masked model of the dense shapes, and the shrunk model.

The masked model is what the repair stages work on: the removed channels' filters are zero, and so are the
consumer weights that read them, except where a removed channel is a known constant (its producer's bias,
then BN, activations and pooling) and the consumer sees it everywhere (a 1x1 or unpadded Conv, a Gemm):
there the constant's contribution is kept, and :func:`shrink` folds it into the consumer's bias. Shrinking
the masked model (initializers sliced, Reshape targets and depthwise groups updated) therefore computes
exactly what the masked model computes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from asr_onnx.prune.channels.groups import Groups, find_groups

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
PASS = ("Identity", "Dropout", "Cast", "Transpose", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
        "ReduceMax", "ReduceMin", "Squeeze", "Unsqueeze")
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
    """Whether a consumer sees a constant input channel as one constant at every output (no zero padding),
    and has a bias to fold it into (a Gemm with beta 0 ignores its C)."""
    if node.op == "Gemm":
        bias = _const_input(node, 2)
        outputs = node.inputs[1].shape[0 if int(node.attrs.get("transB", 0)) else 1]
        return float(node.attrs.get("beta", 1.0)) != 0.0 and bias is not None and bias.size in (0, 1, outputs)
    if node.op != "Conv" or _const_input(node, 2) is None:
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
        bias = _const_input(node, 2)
        if bias is None:
            return nan  # a computed bias
        bias = bias.astype(np.float64) if bias.size else np.zeros(span)
        if depthwise:
            if x is None or not exact_fold(node):
                return nan
            return node.inputs[1].values.reshape(span, -1).astype(np.float64).sum(1) * x + bias
        return bias
    if op == "Gemm":
        if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
            return np.zeros(span)
        return float(node.attrs.get("beta", 1.0)) * np.ravel(node.inputs[2].values).astype(np.float64)
    if op == "MatMul":  # a Linear's removed output is zero; a product of two activations is not one constant
        return np.zeros(span) if isinstance(node.inputs[1], gs.Constant) else nan
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
        return functools.reduce(BINARY[op], operands)
    if op == "Concat":
        return np.concatenate(ins)
    if op in ("Flatten", "Reshape"):  # each channel fills more positions; a split into heads is not per position
        return np.repeat(x, span // len(x)) if span >= len(x) and span % len(x) == 0 else nan
    return nan


def _known(values: dict, name: str, removed: np.ndarray) -> bool:
    """Whether every removed position of tensor ``name`` is one known constant."""
    value = values.get(name)
    return value is not None and value.size > int(removed.max(initial=-1)) and bool(np.isfinite(value[removed]).all())


def _const_input(node, index: int):
    """The values of an optional constant input: empty when the input is absent, None when it is computed."""
    import onnx_graphsurgeon as gs

    if len(node.inputs) <= index or node.inputs[index].name == "":
        return np.zeros(0)
    t = node.inputs[index]
    return t.values if isinstance(t, gs.Constant) else None


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
        if removed.size and not (exact_fold(node) and _known(values, node.inputs[0].name, removed)):
            node.inputs[edit.index].values = _zero(node.inputs[edit.index].values, edit.axis, removed)
    return to_model(graph, model)


@dataclass
class Shrunk:
    """What :func:`shrink_model` made.

    Attributes:
        model: the shrunk model; the input model itself when nothing could be sliced.
        whole: planned group -> why its channels stay after all (the repaired graph does not let them go).
    """

    model: object
    whole: dict = field(default_factory=dict)


def shrink(model, groups: Groups, keep: dict):
    """The model with every removed channel sliced away; computes what :func:`mask`'s model computes.

    Returns the input model itself when nothing is removed. See :func:`shrink_model`.
    """
    return shrink_model(model, groups, keep).model


def shrink_model(model, groups: Groups, keep: dict, *, feeds: dict | None = None, device: str = "cpu") -> Shrunk:
    """Slices the planned channels out of a masked model, which the repair may have changed since
    :func:`mask` (a correction gives a layer a bias, a BN is folded into its conv, a head is rewritten).

    The groups are found again on ``model`` itself and matched with the planned ones through the tensors
    both walks follow (:func:`carry`); a group whose removed channels the model still uses in a way that
    slicing cannot keep (a nonzero removed filter, a consumer that reads a removed channel that is not one
    constant there) stays whole, with the reason.

    Args:
        model: the masked model, dense-shaped.
        groups: the planned groups (of the dense model).
        keep: planned group -> its kept channels.
        feeds: a few calibration samples; the shrunk model must compute on them what ``model`` computes
            (:func:`asr_onnx.prune.channels.check.check_shrunk`). Defaults to None (not run).
        device: where that check runs. Defaults to "cpu".

    Raises:
        AsrError: with ``feeds``, the shrunk model does not compute what the masked one does.
    """
    import onnx_graphsurgeon as gs

    from asr_onnx.model.graph import static_shapes, to_graph, to_model

    if not keep:
        return Shrunk(model)
    graph = to_graph(model)
    now = find_groups(graph, static_shapes(model))
    nodes = _nodes(graph)
    kept, origin, whole = carry(groups, keep, now)
    values = constants(graph, now)
    for g, why in _unsliceable(nodes, now, kept, values).items():
        kept.pop(g, None)
        for planned in origin[g]:
            if keep.get(planned) is not None:
                whole.setdefault(planned, why)
    while True:  # a planned group is sliced everywhere or nowhere
        partly = [g for g in kept if origin[g] & set(whole)]
        if not partly:
            break
        for g in partly:
            del kept[g]
            why = next(whole[o] for o in origin[g] if o in whole)
            for planned in origin[g]:
                if keep.get(planned) is not None:
                    whole.setdefault(planned, why)
    if not kept:
        return Shrunk(model, whole)
    for edit in now.edits:
        if edit.role == "consumer":
            _fold(nodes[edit.node], edit, values, kept, now)
    for edit in now.edits:
        const = nodes[edit.node].inputs[edit.index]
        const.values = _take(const.values, edit.axis, positions(edit.layout, kept, now.sizes))
    for name, layout in now.depthwise.items():
        nodes[name].attrs["group"] = int(len(positions(layout, kept, now.sizes)))
    for name, (axis, layout) in now.reshapes.items():
        node = nodes[name]
        target = np.array(node.inputs[1].values, np.int64)
        target[axis] = len(positions(layout, kept, now.sizes))
        node.inputs[1] = gs.Constant(f"{name}_target", target)
    keep_shapes = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep_shapes:
            tensor.shape = None
    graph.cleanup().toposort()
    shrunk = to_model(graph, model)
    if feeds is not None:
        from asr_onnx.prune.channels.check import check_shrunk

        check_shrunk(model, shrunk, feeds, device=device)
    return Shrunk(shrunk, whole)


def carry(planned: Groups, keep: dict, now: Groups) -> tuple[dict, dict, dict]:
    """The planned kept channels, carried over to the groups found on the graph being shrunk.

    Two groups match where a tensor that both walks follow has them at the same place of its layout.

    Returns:
        (now group -> its kept channels; now group -> the planned groups it matches; planned group -> why
        it cannot be sliced there: the group is whole now, is laid out or counted differently, is joined with
        a group that keeps other channels, or no tensor carries it).
    """
    origin: dict[int, set] = {}
    moved: set = set()
    for name, layout in now.layouts.items():
        before = planned.layouts.get(name)
        if not before or not layout:
            continue
        if len(before) != len(layout) or any(r != rb for (_, r), (_, rb) in zip(layout, before)):
            moved.update(g for g, _ in layout)
            for g, _ in layout:
                origin.setdefault(g, set()).update(gb for gb, _ in before)
            continue
        for (g, _), (gb, _) in zip(layout, before):
            origin.setdefault(g, set()).add(gb)
    kept: dict = {}
    whole: dict = {}
    for g, olds in origin.items():
        plans = [keep.get(o) for o in olds]
        if all(k is None for k in plans):
            continue
        why = now.whole.get(g)
        if why is None and g in moved:
            why = "the repaired graph lays its channels out differently"
        elif why is None and any(now.sizes[g] != planned.sizes[o] for o in olds):
            why = "the repaired graph has another channel count for it"
        elif why is None and any(k is None or not np.array_equal(k, plans[0]) for k in plans):
            why = "the repaired graph joins it with a group that keeps other channels"
        if why is None:
            kept[g] = np.asarray(plans[0])
        for o in olds:
            if why is not None and keep.get(o) is not None:
                whole.setdefault(o, why)
    matched = set().union(*origin.values()) if origin else set()
    for o in keep:
        if o not in matched:
            whole.setdefault(o, "no tensor of the repaired graph carries it")
    return kept, origin, whole


def _unsliceable(nodes: dict, now: Groups, kept: dict, values: dict) -> dict:
    """Group -> why slicing would change what the masked model computes: a removed filter that is not zero, or
    a consumer that reads a removed channel which is not one constant it can fold into its bias."""
    reasons: dict = {}
    for edit in now.edits:
        if edit.role not in ("producer", "consumer"):
            continue
        node = nodes[edit.node]
        weight = node.inputs[edit.index].values
        for g in {g for g, _ in edit.layout if g in kept and g not in reasons}:
            removed = removed_positions(edit.layout, {g: kept[g]}, now.sizes)
            if not removed.size or not np.take(weight, removed, axis=edit.axis).any():
                continue
            where = f"{node.op} {node.name or edit.node}"
            if edit.role == "producer":
                reasons[g] = f"{where}: the removed channels' filters are not zero in the repaired model"
                continue
            if not exact_fold(node) or not _known(values, node.inputs[0].name, removed):
                reasons[g] = f"{where} reads the removed channels, and they are not one constant it can fold"
    return reasons


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
