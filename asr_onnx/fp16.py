"""Casting a model's float32 weights and arithmetic to float16 for deployment.

:func:`to_fp16` decides, node by node, whether the node can run in float16:

- its op schema must allow ``tensor(float16)`` for every type variable bound to a float tensor
  (``Range``, for one, does not), it is in the default domain, and it has no ``dtype``-like attribute
  (RandomNormal and friends keep producing float32);
- it is not shape arithmetic: a node whose only non-constant inputs derive from ``Shape``/``Size``
  stays float32, so that computed sizes are not rounded to 11 significant bits;
- inputs whose schema fixes ``tensor(float)`` (``Resize`` scales, for one) stay float32.

Every float tensor then gets one precision (its producer's; for a constant, that of its consumers),
and a ``Cast`` is inserted wherever a consumer wants the other one; constants wanted in both
precisions are stored twice instead. Float initializers are clipped to the float16 range.
With ``keep_io`` the graph's float inputs and outputs stay float32 behind a ``Cast``.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import AsrError

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
#: ops that make float32 from an attribute, so their outputs stay float32.
FP32_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
            "Bernoulli"}
SHAPE_OPS = {"Shape", "Size"}
_SUFFIX = {HALF: "fp16", FLOAT: "fp32"}


def to_fp16(model: onnx.ModelProto, keep_io: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with float32 weights and arithmetic in float16.

    Args:
        model: the model; it is not modified.
        keep_io: keep float32 graph inputs and outputs (a Cast after each input and before each
            output). Defaults to True; False makes them float16.

    Raises:
        AsrError: the model has control flow (subgraphs), or the result fails onnx.checker.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise AsrError(f"fp16: node {node.name or node.op_type} has a subgraph ({node.op_type}); "
                           "control flow is not supported")
    types = _elem_types(model)
    opset = {o.domain or "": o.version for o in model.opset_import}
    constants = _constants(graph)
    shape_derived = _shape_derived(graph, constants)

    # what precision each node wants at each float input, and gives at each float output
    wants, gives = [], []
    for index, node in enumerate(graph.node):
        runs_half = index not in shape_derived and _can_run_half(node, types, opset)
        want, give = _precisions(node, types, opset, runs_half)
        wants.append(want)
        gives.append(give)

    home = {name: precision for give in gives for name, precision in give.items()}
    inits = {t.name: t for t in graph.initializer}
    io_precision = FLOAT if keep_io else HALF
    for value in graph.input:
        if types.get(value.name) == FLOAT and value.name not in inits:
            home[value.name] = io_precision
    for name in constants:
        wanted = {want[name] for want in wants if name in want}
        wanted |= {io_precision for out in graph.output if out.name == name}
        home[name] = HALF if HALF in wanted or not wanted else FLOAT

    # constants: convert in place, or keep float32
    clipped = 0
    for name, holder in constants.items():
        if home[name] == HALF:
            clipped += _to_half(holder)
    if clipped:
        warnings.warn(f"fp16: {clipped} weight value(s) outside the float16 range were clipped to ±{FP16_MAX:g}")

    # rewire consumers that want the other precision
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)} | set(inits)
    taken |= {v.name for v in list(graph.input) + list(graph.output)}
    new_nodes, casts, extra_inits = [], {}, {}
    for node, want in zip(graph.node, wants):
        for i, name in enumerate(node.input):
            if name not in want or home.get(name) is None or want[name] == home[name]:
                continue
            target = want[name]
            key = (name, target)
            if key not in casts:
                alias = _unique(f"{name}_{_SUFFIX[target]}", taken)
                if name in constants:
                    extra_inits[alias] = _constant_as(constants[name], alias, target)
                else:
                    new_nodes.append(helper.make_node("Cast", [name], [alias], name=f"{alias}_cast", to=target))
                casts[key] = alias
            node.input[i] = casts[key]
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        new_nodes.append(kept)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.initializer.extend(extra_inits.values())

    # graph inputs and outputs
    for value in graph.input:
        if value.name in home and value.name not in inits:
            value.type.tensor_type.elem_type = home[value.name]
        elif value.name in inits:
            value.type.tensor_type.elem_type = inits[value.name].data_type
    for value in graph.output:
        if types.get(value.name) != FLOAT:
            continue
        if home.get(value.name, FLOAT) != io_precision:
            inner = _unique(f"{value.name}_{_SUFFIX[home.get(value.name, FLOAT)]}", taken)
            _cast_output(graph, value.name, inner, io_precision)
        value.type.tensor_type.elem_type = io_precision
    for value in graph.value_info:
        if value.name in home and value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = home[value.name]

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise AsrError(f"fp16: the converted model fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
    return model


def _elem_types(model) -> dict[str, int]:
    """Every tensor's element type, from shape inference (0 when unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for value in list(g.input) + list(g.output) + list(g.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _constants(graph) -> dict:
    """Float32 constant tensors by name: initializers, and the ``value`` of Constant nodes."""
    found = {t.name: t for t in graph.initializer if t.data_type == FLOAT}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    found[node.output[0]] = a.t
    return found


def _shape_derived(graph, constants) -> set[int]:
    """Indices of nodes that compute on shapes only: their non-constant inputs all come from Shape/Size."""
    derived, nodes = set(), set()
    inits = {t.name for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type in SHAPE_OPS:
            derived.update(node.output)
            continue
        inputs = [name for name in node.input if name and name not in inits and name not in constants]
        if node.op_type != "Constant" and inputs and all(name in derived for name in inputs):
            derived.update(node.output)
            nodes.add(index)
    return nodes


def _schema(node, opset):
    try:
        return onnx.defs.get_schema(node.op_type, opset.get(node.domain or "", 1), node.domain or "")
    except Exception:
        return None


def _param(params, index):
    """The formal parameter of input/output ``index``, allowing for a variadic last one."""
    if not params:
        return None
    if index < len(params):
        return params[index]
    last = params[-1]
    return last if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None


def _allows_half(schema, type_str) -> bool | None:
    """True/False when ``type_str`` is a type variable that does/does not allow float16, None when it is a fixed type."""
    for constraint in schema.type_constraints:
        if constraint.type_param_str == type_str:
            return "tensor(float16)" in constraint.allowed_type_strs
    return None


def _can_run_half(node, types, opset) -> bool:
    if (node.domain or "") not in ("", "ai.onnx") or node.op_type in FP32_OPS:
        return False
    schema = _schema(node, opset)
    if schema is None:
        return False
    floats = [(schema.inputs, i, n) for i, n in enumerate(node.input) if n and types.get(n) == FLOAT]
    floats += [(schema.outputs, i, n) for i, n in enumerate(node.output) if n and types.get(n) == FLOAT]
    if not floats:
        return False
    for params, i, _ in floats:
        param = _param(params, i)
        if param is None or _allows_half(schema, param.type_str) is False:
            return False
    return True


def _precisions(node, types, opset, runs_half) -> tuple[dict, dict]:
    """({float input: wanted precision}, {float output: produced precision}) of one node."""
    want, give = {}, {}
    schema = _schema(node, opset) if runs_half else None
    cast_to_float = node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT for a in node.attribute)
    for i, name in enumerate(node.input):
        if name and types.get(name) == FLOAT:
            param = _param(schema.inputs, i) if schema else None
            want[name] = HALF if param is not None and _allows_half(schema, param.type_str) else FLOAT
    for i, name in enumerate(node.output):
        if name and types.get(name) == FLOAT:
            param = _param(schema.outputs, i) if schema else None
            half = param is not None and _allows_half(schema, param.type_str)
            if node.op_type == "Cast":
                half = runs_half and cast_to_float
            give[name] = HALF if half else FLOAT
    if runs_half and cast_to_float:
        for a in node.attribute:
            if a.name == "to":
                a.i = HALF
    if runs_half and node.op_type == "ConstantOfShape":
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == FLOAT:
                _to_half(a.t)
    return want, give


def _to_half(tensor) -> int:
    """Converts a float32 TensorProto to float16 in place; returns how many values were clipped."""
    values = numpy_helper.to_array(tensor).astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(values[np.isfinite(values)]) > FP16_MAX))
    half = np.where(np.isfinite(values), np.clip(values, -FP16_MAX, FP16_MAX), values).astype(np.float16)
    tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    return clipped


def _constant_as(tensor, name, precision):
    values = numpy_helper.to_array(tensor)
    values = values.astype(np.float16 if precision == HALF else np.float32)
    return numpy_helper.from_array(values, name)


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _cast_output(graph, name, inner, want) -> None:
    """Renames the producer's output to ``inner`` and casts it back to ``name`` in precision ``want``."""
    for node in graph.node:
        for i, n in enumerate(node.output):
            if n == name:
                node.output[i] = inner
        for i, n in enumerate(node.input):
            if n == name:
                node.input[i] = inner
    kept = [value for value in graph.value_info if value.name != name]
    if len(kept) != len(graph.value_info):
        copies = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in kept]
        graph.ClearField("value_info")
        graph.value_info.extend(copies)
    graph.node.append(helper.make_node("Cast", [inner], [name], name=f"{name}_cast_out", to=want))
