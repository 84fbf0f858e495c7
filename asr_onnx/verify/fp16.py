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
precisions are stored twice instead. With ``keep_io`` the graph's float inputs and outputs stay
float32 behind a ``Cast``.

Nothing is clipped to the float16 range (a clipped BN variance makes the output unrelated to the
model's): a BatchNormalization with a parameter outside it is folded into the Conv before it first,
and any constant still outside it stays float32, with the nodes that read it. :func:`check_fp16`
then compares the result with the float32 model on calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from asr_onnx.errors import AsrError, first_line
from asr_onnx.model.qdq import unique_name

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-5, the smallest normal float16
FIXED_LIMIT = 16  # samples compared one run each, when the batch is fixed
FP16_TOLERANCE = 1e-2  # relative L2 of an output: float16 rounds each op to about 5e-4
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
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise AsrError(f"fp16: node {node.name or node.op_type} has a subgraph ({node.op_type}); "
                           "control flow is not supported")
    model = fold_wide_bns(model)
    graph = model.graph
    types = _elem_types(model)
    opset = {o.domain or "": o.version for o in model.opset_import}
    constants = _constants(graph)
    shape_derived = _shape_derived(graph, constants)
    wide = {name for name, tensor in constants.items() if _outside_half(numpy_helper.to_array(tensor))}

    # what precision each node wants at each float input, and gives at each float output
    wants, gives = [], []
    for index, node in enumerate(graph.node):
        runs_half = (index not in shape_derived and not wide.intersection(node.input) and not _wide_fill(node)
                     and _can_run_half(node, types, opset))
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
        home[name] = FLOAT if name in wide else HALF if HALF in wanted or not wanted else FLOAT

    # constants: convert in place, or keep float32
    for name, holder in constants.items():
        if home[name] == HALF:
            _to_half(holder)

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
                alias = unique_name(f"{name}_{_SUFFIX[target]}", taken)
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
            inner = unique_name(f"{value.name}_{_SUFFIX[home.get(value.name, FLOAT)]}", taken)
            _cast_output(graph, value.name, inner, io_precision)
        value.type.tensor_type.elem_type = io_precision
    for value in graph.value_info:
        if value.name in home and value.type.tensor_type.elem_type == FLOAT:
            value.type.tensor_type.elem_type = home[value.name]

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise AsrError(f"fp16: the converted model fails onnx.checker: {first_line(e)}") from None
    return model


def fold_wide_bns(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every BatchNormalization with a parameter outside the float16 range that
    directly follows its Conv (or Gemm, ConvTranspose) is folded into it, so that no float16 tensor
    holds a variance of 1e8, or activations of its size."""
    from asr_onnx.correct.recal import fold_bn
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model

    graph = to_graph(model)
    folded = 0
    for site in find_sites(graph, find_layers(graph)):
        if site.bn is not None and site.layer is not None and \
                any(_outside_half(np.asarray(t.values)) for t in site.bn.inputs[1:5]):
            fold_bn(graph, site)
            folded += 1
    if not folded:
        return onnx.ModelProto.FromString(model.SerializeToString())
    graph.cleanup().toposort()
    return to_model(graph, model)


def _wide_fill(node) -> bool:
    """Whether a ConstantOfShape fills with a value that float16 cannot hold."""
    return node.op_type == "ConstantOfShape" and any(
        a.name == "value" and _outside_half(numpy_helper.to_array(a.t)) for a in node.attribute)


def _outside_half(values: np.ndarray) -> bool:
    """Whether a float array has a finite value that float16 cannot hold."""
    values = np.asarray(values, np.float64)
    return bool(np.any(np.abs(values[np.isfinite(values)]) > FP16_MAX))


def check_fp16(reference, half, calib, *, device: str = "auto", limit: int = 64, tolerance: float = FP16_TOLERANCE):
    """Compares a float16 model's outputs with its float32 model's on up to ``limit`` calibration samples.

    Args:
        reference, half: the float32 model and its float16 copy (onnx.ModelProto).
        calib: a calibration set (``batches(batch_size)``).
        device: see :func:`asr_onnx.model.session.providers`. Defaults to "auto".
        limit: samples to compare. Defaults to 64 (FIXED_LIMIT, 16, when the model fixes its batch and
            :func:`asr_onnx.model.batch.free_batch` cannot free it, so that each runs alone).
        tolerance: the largest relative L2 error allowed on any output. Defaults to FP16_TOLERANCE (1e-2).

    Returns:
        output name -> relative L2 error of the float16 output (the float32 output's RMS floored at
        FP16_TINY, 6.1e-5: float16 cannot tell smaller values apart).

    Raises:
        AsrError: an output is not finite, or is further than ``tolerance`` from the float32 one.
    """
    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.batch import free_batch
    from asr_onnx.model.session import Runner, batches

    fixed = fixed_batch(input_specs(reference))
    plans = [free_batch(m, fixed) for m in (reference, half)] if fixed else []
    if plans and all(plans):  # compare batched, as the statistics are measured
        reference, half, fixed = plans[0].apply(reference), plans[1].apply(half), None
    elif fixed:
        limit = min(limit, FIXED_LIMIT)  # one run per sample
    with Runner(reference, device=device) as single, Runner(half, device=device) as double:
        names = single.output_names
        err2, ref2, size = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        halves = {i.name: np.float16 for i in double.inputs if i.type == "tensor(float16)"}
        seen = 0
        for _, feed in batches(calib, fixed or limit, fixed=fixed):
            want_out = single.run(names, feed)
            got_out = double.run(names, {k: v.astype(halves[k]) if k in halves else v for k, v in feed.items()})
            for name in names:
                want, got = np.asarray(want_out[name], np.float64), np.asarray(got_out[name], np.float64)
                if not np.isfinite(got).all():
                    raise AsrError(f"fp16: output {name!r} is not finite in float16 on calibration data (activations "
                                   "outside the float16 range); keep the model in float32")
                err2[name] += float(np.sum((got - want) ** 2))
                ref2[name] += float(np.sum(want**2))
                size[name] += want.size
            seen += len(next(iter(feed.values())))
            if seen >= limit:
                break
    # an output whose RMS is below float16's smallest normal (a probability map near 0) is measured
    # against that: float16 cannot tell such values apart, and they are not what the output says
    errors = {name: float(np.sqrt(err2[name] / max(ref2[name], size[name] * FP16_TINY**2))) for name in names}
    worst = max(errors, key=errors.get)
    if errors[worst] > tolerance:
        raise AsrError(f"fp16: output {worst!r} differs from float32 by relative L2 {errors[worst]:.3g} on {seen} "
                       f"calibration samples (over {tolerance:g}); keep the model in float32")
    return errors


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


def _to_half(tensor) -> None:
    """Converts a float32 TensorProto (every finite value within the float16 range) to float16 in place."""
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))


def _constant_as(tensor, name, precision):
    values = numpy_helper.to_array(tensor)
    values = values.astype(np.float16 if precision == HALF else np.float32)
    return numpy_helper.from_array(values, name)




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


def half_precision(model: onnx.ModelProto, keep_io: bool = True, calib=None, device: str = "auto") -> tuple:
    """The model in float16 (:func:`to_fp16`) and, with ``calib``, its error against float32 on up to 64 of
    its samples (:func:`check_fp16`; None without). A quantized (QDQ) model is refused."""
    from asr_onnx.model.qdq import quantized_tensors

    if quantized_tensors(model):
        raise AsrError("fp16: the output is quantized (QDQ); it cannot be cast to float16 as well")
    half = to_fp16(model, keep_io=keep_io)
    return half, (check_fp16(model, half, calib, device=device) if calib is not None else None)
