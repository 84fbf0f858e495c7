"""Prunable layers and what normalises each one; onnx-graphsurgeon import and export; shape inference."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def to_graph(model: onnx.ModelProto):
    """Imports a model into onnx-graphsurgeon, folding Constant-made weights into initializers."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    # PyTorch routes some BN parameters through Identity: fold those too, or the BN looks non-constant
    if any(n.op in ("Constant", "ConstantOfShape") or (n.op == "Identity" and isinstance(n.inputs[0], gs.Constant))
           for n in graph.nodes):
        with _printed_to_log():
            graph.fold_constants(error_ok=True).cleanup()
    return graph


@contextmanager
def _printed_to_log():
    """onnx-graphsurgeon prints its notes (a subgraph it could not fold, hints) on stdout: they go to the
    ``asr_onnx`` logger at INFO instead, since a fold that fails only leaves those nodes as they are."""
    import contextlib
    import io
    import logging

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            logging.getLogger("asr_onnx").info("onnx-graphsurgeon: %s", line)


def to_model(graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Exports a graph, keeping the opset imports, IR version and metadata of ``like``."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph, do_type_check=False, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(like, name))
    model.graph.name = like.graph.name
    if like.ir_version < 4:  # IR 3 requires every initializer to be a graph input too
        listed = {v.name for v in model.graph.input}
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name not in listed)
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def static_shapes(model: onnx.ModelProto, keep: int = 64, dims: dict | None = None) -> dict[str, tuple]:
    """Tensor name -> dims (int, or a str for a symbolic one) from ONNX shape inference, {} if it fails.

    Inference runs on a copy whose large initializers carry no data (their dims are all it needs),
    so a big model is not copied.

    Args:
        keep: initializers up to this many elements keep their data (Reshape targets and the like).
            Defaults to 64.
        dims: graph input name -> the dims to infer from instead of the declared ones (such as the
            calibration data's). Defaults to None.
    """
    stripped = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    graph = stripped.graph
    graph.input.extend(model.graph.input)
    for value in graph.input:
        if dims and value.name in dims and value.type.HasField("tensor_type"):
            value.type.tensor_type.shape.Clear()
            for d in dims[value.name]:
                entry = value.type.tensor_type.shape.dim.add()
                if isinstance(d, int):
                    entry.dim_value = d
                elif d:
                    entry.dim_param = d
    graph.output.extend(model.graph.output)
    graph.node.extend(model.graph.node)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= keep and init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:  # a graph input of the same type and dims stands in for the weight
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped)
    except Exception:  # noqa: BLE001 - shapes are an optimisation; without them the count is measured
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                       for d in value.type.tensor_type.shape.dim)
    return shapes


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


@dataclass
class Layer:
    """A Conv, ConvTranspose, Gemm or MatMul node whose weight is a constant.

    Attributes:
        node: the graph node.
        weight: its weight constant (gs.Constant).
        out_axis: the weight axis that indexes output channels (ConvTranspose: see ``groups``).
        in_axis: the weight axis that is reduced over (the N:M axis).
        groups: Conv/ConvTranspose groups, else 1.
    """

    node: object
    weight: object
    out_axis: int
    in_axis: int
    groups: int = 1

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def output(self):
        return self.node.outputs[0]

    @property
    def channels(self) -> int:
        shape = self.weight.shape
        if self.op == "ConvTranspose":
            return shape[1] * self.groups
        return shape[self.out_axis]

    @property
    def channel_last(self) -> bool:
        """Whether the output's channel axis is the last one (Gemm, MatMul) rather than axis 1."""
        return self.op in ("Gemm", "MatMul")

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.weight.shape[1] == 1


def find_layers(graph) -> list[Layer]:
    """Every prunable layer, in topological order."""
    import onnx_graphsurgeon as gs

    graph.toposort()
    layers = []
    for node in graph.nodes:
        if node.op not in PRUNABLE_OPS or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or weight.values.dtype.kind != "f":
            continue
        rank = len(weight.shape)
        groups = int(node.attrs.get("group", 1))
        if node.op == "Conv" and rank >= 3:
            layers.append(Layer(node, weight, out_axis=0, in_axis=1, groups=groups))
        elif node.op == "ConvTranspose" and rank >= 3:
            layers.append(Layer(node, weight, out_axis=1, in_axis=0, groups=groups))
        elif node.op == "Gemm" and rank == 2 and not node.attrs.get("transA", 0):
            trans_b = int(node.attrs.get("transB", 0))
            layers.append(Layer(node, weight, out_axis=0 if trans_b else 1, in_axis=1 if trans_b else 0))
        elif node.op == "MatMul" and rank >= 2:
            layers.append(Layer(node, weight, out_axis=rank - 1, in_axis=rank - 2))
    return layers


@dataclass
class Site:
    """A point whose per-channel statistics are measured and corrected.

    Either a BatchNormalization node (``bn``), whose input is recalibrated; or the output of a
    layer with no BN after it, which gets a *virtual* BN folded into the layer's weight and bias; or the
    output of a LayerNormalization over the last axis (``ln``), which gets a virtual BN folded into its
    γ and β (LayerNorm normalises each token; what the next layer sees per channel is its output).

    Attributes:
        tensor: the measured tensor (the BN's input, the layer's output, or the LayerNorm's output).
        layer: the layer that produces ``tensor``, or None.
        bn: the BatchNormalization node, or None for a virtual site.
        after: what follows a virtual site's layer, for the report: "none" or "affine" (Mul/Add chain).
        head: a virtual site whose output reaches a graph output (a classifier head).
        ln: the LayerNormalization node of a LayerNorm site (see :func:`layernorm_site`), else None.
    """

    tensor: object
    layer: Layer | None
    bn: object | None
    after: str = "none"
    head: bool = False
    ln: object | None = None
    key: str = field(init=False)

    def __post_init__(self):
        self.key = self.tensor.name

    @property
    def channel_last(self) -> bool:
        return self.ln is not None or (self.bn is None and self.layer.channel_last)

    @property
    def eps(self) -> float:
        """The BN's own epsilon; 0 for a virtual site, whose floor comes from the data (a LayerNorm's own
        epsilon acts inside each token, before the output that is corrected)."""
        return float(self.bn.attrs.get("epsilon", 1e-5)) if self.bn is not None else 0.0

    @property
    def channels(self) -> int:
        if self.ln is not None:
            return int(self.ln.inputs[1].values.size)
        return int(self.bn.inputs[1].values.size) if self.bn is not None else self.layer.channels

    @property
    def dtype(self) -> np.dtype:
        if self.ln is not None:
            return self.ln.inputs[1].values.dtype
        if self.bn is not None:
            return self.bn.inputs[1].values.dtype
        return self.layer.weight.values.dtype

    @property
    def kind(self) -> str:
        if self.ln is not None:
            return "layernorm"
        if self.bn is not None:
            return "bn"
        return "folded-affine" if self.after == "affine" else "folded"


def _bn_after(layer: Layer):
    """The BatchNormalization that alone consumes ``layer``'s output on its channel axis, or None."""
    import onnx_graphsurgeon as gs

    consumers = layer.output.outputs
    if len(consumers) != 1 or layer.op == "MatMul":
        return None
    node = consumers[0]
    if node.op != "BatchNormalization" or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
        return None
    return node


def _is_affine(node, layer: Layer) -> bool:
    """Whether ``node`` is a Mul, Add, Sub or Div by a constant that is one value per channel of ``layer``."""
    import onnx_graphsurgeon as gs

    if node is None or node.op not in ("Mul", "Add", "Sub", "Div"):
        return False
    const = [t for t in node.inputs if isinstance(t, gs.Constant)]
    return len(const) == 1 and _per_channel(tuple(const[0].shape), layer)


def _per_channel(shape: tuple, layer: Layer) -> bool:
    """Whether a constant of ``shape`` broadcasts over the layer's output as a scalar or along its channel axis."""
    if int(np.prod(shape)) == 1:
        return True
    rank = len(layer.weight.shape) if layer.op in ("Conv", "ConvTranspose") else len(shape)
    if len(shape) > rank:
        return False
    full = (1,) * (rank - len(shape)) + shape  # numpy broadcasting aligns the trailing axes
    axis = rank - 1 if layer.channel_last else 1
    return full[axis] == layer.channels and int(np.prod(full)) == layer.channels


def layernorm_site(node) -> bool:
    """Whether a LayerNormalization can be a site: it normalises the last axis only (``axis`` -1, or the
    input's rank - 1 where that is known), over an input of rank 2 or more, with a constant 1-D float γ and
    a constant β of the same shape or none. Then each channel of its output is an affine function of the
    normalised token, γ_c x̂_c + β_c, and a per-channel correction folds into γ and β."""
    import onnx_graphsurgeon as gs

    if node.op != "LayerNormalization" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    scale, shape = node.inputs[1], node.inputs[0].shape
    if not isinstance(scale, gs.Constant) or scale.values.ndim != 1 or scale.values.dtype.kind != "f":
        return False
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant) or bias.values.shape != scale.values.shape:
            return False
    axis, rank = int(node.attrs.get("axis", -1)), len(shape) if shape is not None else None
    if rank is not None and (rank < 2 or axis not in (-1, rank - 1)
                             or (isinstance(shape[-1], int) and shape[-1] != scale.values.size)):
        return False
    return axis == -1 or rank is not None


def find_sites(graph, layers: list[Layer]) -> list[Site]:
    """Every BatchNormalization, every layer output that no BN normalises, and every LayerNormalization's
    output that :func:`layernorm_site` accepts, in graph order."""
    import onnx_graphsurgeon as gs

    by_node = {id(layer.node): layer for layer in layers}
    bn_layer = {id(bn): layer for layer in layers if (bn := _bn_after(layer)) is not None}
    sites = []
    for node in graph.nodes:
        if node.op == "BatchNormalization" and all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            sites.append(Site(node.inputs[0], bn_layer.get(id(node)), node))
        if layernorm_site(node):
            sites.append(Site(node.outputs[0], None, None, ln=node))
        layer = by_node.get(id(node))
        if layer is not None and _bn_after(layer) is None:
            consumers = layer.output.outputs
            after = "affine" if len(consumers) == 1 and _is_affine(consumers[0], layer) else "none"
            sites.append(Site(layer.output, layer, None, after, _reaches_output(layer.output, graph)))
    bn_inputs = {s.key for s in sites if s.bn is not None}  # a BN that reads a LayerNorm recalibrates it itself
    return [s for s in sites if s.ln is None or s.key not in bn_inputs]


HEAD_PASS_THROUGH = ("Identity", "Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze", "Cast", "Add", "Mul")


def _reaches_output(tensor, graph) -> bool:
    """Whether a tensor becomes a graph output through a chain of single readers that only reshape,
    add a constant bias or apply a softmax: the mark of a classifier head."""
    import onnx_graphsurgeon as gs

    outputs = {t.name for t in graph.outputs}
    while tensor.name not in outputs:
        readers = tensor.outputs
        if len(readers) != 1 or readers[0].op not in HEAD_PASS_THROUGH:
            return False
        if readers[0].op in ("Add", "Mul") and not any(isinstance(t, gs.Constant) for t in readers[0].inputs):
            return False
        tensor = readers[0].outputs[0]
    return True
