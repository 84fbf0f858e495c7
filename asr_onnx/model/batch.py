"""A symbolic batch for the statistics graphs of a model that fixes a small batch (the output keeps it).

A model exported with a batch of 1 can only be measured one sample per run, too few for batch
statistics, so it would be measured level by level. :func:`free_batch` proves with ONNX shape inference
that the graph computes each sample on its own, and gives a plan that makes the batch symbolic: the
inputs take any batch and every Reshape target that names the batch (a constant, or shape arithmetic
that folds to one at the fixed batch) gets 0 there (copy the input's batch). The proof: once the
inputs' first dimension is symbolic, every tensor computed from an input keeps that symbol as its first
dimension (Shape and Size excepted, which read it; a Resize by a scale of 1 on axis 0 keeps it), and no
node mixes samples along axis 0 while keeping the shape (Softmax or CumSum over axis 0, a control-flow
body, say).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from asr_onnx.errors import AsrError

BATCH = "asr_batch"
#: ops that read the batch without carrying it.
READS_BATCH = {"Shape", "Size"}
#: ops that combine values along their ``axis`` while keeping the shape, and their default axis.
AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LpNormalization": -1, "LayerNormalization": -1,
            "CumSum": None, "Concat": None}


@dataclass
class BatchPlan:
    """How to make a model's batch symbolic: the Reshape targets to rewrite, by the Reshape's output.

    Attributes:
        batch: the model's fixed batch size.
        targets: a Reshape's output name -> its new target shape (int64).
        output_dims: graph output name -> its dims once the batch is symbolic.
    """

    batch: int
    targets: dict
    output_dims: dict

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` (the one planned for, or one with the same nodes) with a symbolic batch."""
        freed = onnx.ModelProto()
        freed.CopyFrom(model)
        graph = freed.graph
        inits = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.name not in inits:
                value.type.tensor_type.shape.dim[0].dim_param = BATCH
        for node in graph.node:  # the old target may stay, unread: the statistics graph drops it
            if node.op_type == "Reshape" and node.output[0] in self.targets:
                name = f"{node.output[0]}.{BATCH}.shape"
                graph.initializer.append(numpy_helper.from_array(self.targets[node.output[0]], name))
                node.input[1] = name
        for value in graph.output:
            _set_dims(value, self.output_dims.get(value.name))
        del graph.value_info[:]  # inferred with the fixed batch
        return freed


def free_batch(model: onnx.ModelProto, fixed: int) -> BatchPlan | None:
    """A plan that makes the batch symbolic, or None where shape inference cannot prove it safe.

    Args:
        model: the model (not modified; its large weights are not copied).
        fixed: the batch that every input fixes.
    """
    light = _light(model)
    targets = {}
    for _ in range(sum(n.op_type in ("Reshape", "Resize", "Upsample") for n in light.graph.node) + 1):
        shapes, types = _infer(light)
        found = _batch_targets(light, shapes, fixed)
        resized = _batch_resizes(light, shapes)
        if not shapes or not (found or resized):
            break
        for name in resized:  # onnx cannot tell that a symbolic dim times 1 is itself
            rank = len(shapes[name])
            light.graph.value_info.append(onnx.helper.make_tensor_value_info(name, types[name],
                                                                             [BATCH] + [None] * (rank - 1)))
        for index, shape in found.items():
            node = light.graph.node[index]
            name = f"{node.output[0]}.{BATCH}.shape"
            light.graph.initializer.append(numpy_helper.from_array(shape, name))
            node.input[1] = name
            targets[node.output[0]] = shape
    else:  # every pass changed something, so the last shapes are stale (cannot happen: each fixes a node)
        return None
    if not shapes or not _separable(light, shapes):
        return None
    outputs = {o.name: shapes.get(o.name) for o in light.graph.output}
    if any(dims is None or not dims or dims[0] != BATCH for dims in outputs.values()):
        return None
    return BatchPlan(fixed, targets, outputs)


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with a symbolic batch at its inputs, no declared output shapes, no value_info and only
    the small initializers (Reshape targets): enough for shape inference, without copying weights.

    Shape arithmetic is folded first at the fixed batch, so that a target computed from ``Shape``
    (``x.view(x.size(0), -1)``) becomes the constant that names the batch, and is rewritten like one.
    """
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    graph = light.graph
    inits = {t.name for t in model.graph.initializer}
    graph.node.extend(model.graph.node)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= 64 and init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    graph.input.extend(value for value in model.graph.input if value.name not in inits)
    graph.output.extend(model.graph.output)
    light = _shapes_folded(light)
    for value in light.graph.input:
        if value.name not in inits:
            value.type.tensor_type.shape.dim[0].dim_param = BATCH
    del light.graph.output[:], light.graph.value_info[:]
    light.graph.output.extend(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None)
                              for v in model.graph.output)
    return light


def _shapes_folded(light: onnx.ModelProto) -> onnx.ModelProto:
    """``light`` with its shape arithmetic folded into constants (onnx-graphsurgeon), or as it was."""
    import onnx_graphsurgeon as gs

    try:
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(light))
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
        folded = gs.export_onnx(graph, do_type_check=False, opset_imports=list(light.opset_import))
    except Exception:  # noqa: BLE001 - folding only widens what can be proved
        return light
    folded.ir_version = light.ir_version
    return folded


def _infer(light) -> tuple[dict, dict]:
    """Tensor name -> dims (int, str or None each) and -> element type, from shape inference ({} if it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)  # through Shape arithmetic too
    except Exception:  # noqa: BLE001 - without shapes nothing is proved
        return {}, {}
    shapes, types = {}, {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = value.type.tensor_type
        types[value.name] = tensor.elem_type
        if tensor.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                       for d in tensor.shape.dim)
    return shapes, types


def _batch_resizes(light, shapes: dict) -> list[str]:
    """Outputs of Resizes whose input carries the batch and whose constant scales keep axis 0 (scale 1),
    where shape inference lost the batch's name."""
    found = []
    for node in light.graph.node:
        if node.op_type not in ("Resize", "Upsample") or not _carries(shapes.get(node.input[0])):
            continue
        if _carries(shapes.get(node.output[0])) or not shapes.get(node.output[0]):
            continue
        at = 2 if node.op_type == "Resize" and len(node.input) > 2 else 1
        scales = _constant(light.graph, node.input[at]) if len(node.input) > at else None
        if scales is not None and scales.ndim == 1 and scales.size and float(scales[0]) == 1.0:
            found.append(node.output[0])
    return found


def _constant(graph, name: str):
    """The value of an initializer or Constant node output, or None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), None)
    return None


def _batch_targets(light, shapes: dict, fixed: int) -> dict:
    """Reshapes whose input carries the batch and whose constant target names it: index -> new target."""
    found = {}
    for index, node in enumerate(light.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or not _carries(shapes.get(node.input[0])):
            continue
        if _carries(shapes.get(node.output[0])):
            continue
        target = _constant(light.graph, node.input[1])
        allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if target is None or target.ndim != 1 or not target.size or int(target[0]) != fixed or allow_zero:
            continue
        shape = target.astype(np.int64).copy()
        shape[0] = 0  # copy the input's first dimension, which is the batch
        found[index] = shape
    return found


def _carries(dims) -> bool:
    return bool(dims) and dims[0] == BATCH


def _separable(light, shapes: dict) -> bool:
    """Whether every node that reads a batch-carrying tensor keeps the batch on axis 0 and does not mix samples."""
    for node in light.graph.node:
        read = [name for name in node.input if name and _carries(shapes.get(name))]
        if not read or node.op_type in READS_BATCH:
            continue
        if any(not _carries(shapes.get(name)) for name in node.output if name):
            return False
        if node.op_type == "Concat" and not all(_carries(shapes.get(n)) for n in node.input if n):
            return False  # a constant joined to a batch of one
        if _mixes_batch(node, len(shapes.get(node.output[0]) or ())):
            return False
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            return False
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False  # a body (Loop, Scan, If) is not checked node by node
    return True


def _mixes_batch(node, rank: int) -> bool:
    """Whether an op that keeps the shape combines values along axis 0."""
    if node.op_type == "MeanVarianceNormalization":  # over axes (0, 2, 3) unless told otherwise
        return 0 in next((list(a.ints) for a in node.attribute if a.name == "axes"), [0])
    if node.op_type not in AXIS_OPS:
        return False
    if node.op_type == "CumSum":
        return True  # its axis is an input: assume the worst
    axis = next((a.i for a in node.attribute if a.name == "axis"), AXIS_OPS[node.op_type])
    return axis is not None and axis % max(rank, 1) == 0


def _set_dims(value, dims) -> None:
    """Replaces a ValueInfo's dims (int, str or None each); None drops the shape."""
    tensor = value.type.tensor_type
    tensor.ClearField("shape")
    if dims is None:
        return
    for d in dims:
        dim = tensor.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif d:
            dim.dim_param = d


DEFAULT_BATCH = 64  # calibration samples per session run, unless the model fixes its batch or the set is smaller


@dataclass
class BatchPolicy:
    """How many calibration samples each session run of one repair takes.

    A model that fixes its batch is run with that batch; otherwise ``requested`` samples, and a default (no
    batch size given) adapts to a calibration set smaller than it. A model that fixes a batch under
    ``small`` is measured with a symbolic batch where :func:`free_batch` proves that safe (``plan``).

    Attributes:
        requested: the batch size asked for, or DEFAULT_BATCH.
        size: samples per run of the model as it is (its fixed batch, or ``requested``).
        adapt: whether ``size`` may shrink to a smaller calibration set.
        plan: the symbolic-batch plan of the dense model, or None.
    """

    requested: int
    size: int
    adapt: bool
    plan: BatchPlan | None

    @classmethod
    def of(cls, model, fixed: int | None, batch_size: int | None, small: int) -> "BatchPolicy":
        """The policy for ``model`` (whose fixed batch is ``fixed``) and a requested ``batch_size`` (None: default).

        Raises:
            AsrError: a batch size under 1.
        """
        requested = int(DEFAULT_BATCH if batch_size is None else batch_size)
        size = fixed or requested
        if size < 1 or requested < 1:
            raise AsrError(f"batch size must be >= 1, got {batch_size}")
        plan = free_batch(model, fixed) if fixed and fixed < small else None
        return cls(requested, size, not fixed and batch_size is None, plan)

    def fit(self, samples: int) -> int | None:
        """Adapts a default size to ``samples``; returns the size when ``samples`` are fewer, else None."""
        if self.adapt and samples >= 1:
            self.size = min(DEFAULT_BATCH, samples)
        return self.size if samples < self.size else None

    def check(self, samples: int) -> None:
        """Refuses a calibration set of fewer ``samples`` than a batch (a default size first adapts to it)."""
        if self.fit(samples) is not None:
            raise AsrError(f"the calibration set has {samples} samples, fewer than the batch size {self.size}")

    def stats_size(self, samples: int) -> int:
        """Samples per statistics run: the model's own batch, or with a symbolic batch as many as asked and held."""
        return min(self.requested, samples) if self.plan else self.size

    def for_stats(self, model, dense):
        """The model the statistics graphs are built from: with a symbolic batch where planned, else None
        (its batch cannot be freed). The pruned model gets its own plan: importing it may have folded a
        Shape-computed Reshape target into a constant that names the batch."""
        if self.plan is None:
            return model
        plan = self.plan if model is dense else free_batch(model, self.plan.batch)
        return plan.apply(model) if plan else None
