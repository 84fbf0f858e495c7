"""Loading and saving models, and finding prunable layers and what normalises each one."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import AsrError

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LARGE_BYTES = 2**31 - 1  # protobuf's limit on one serialized message
INLINE_BYTES = 1024  # smaller tensors stay inside the model file when writing external data


def load_model(path) -> onnx.ModelProto:
    """Reads and checks an ONNX file, with any external data beside it.

    Raises:
        AsrError: the path is missing, not a file, empty, not ONNX, fails onnx.checker,
            or names external data that is missing.
    """
    path = Path(path)
    if not path.exists():
        raise AsrError(f"model not found: {path}")
    if not path.is_file():
        raise AsrError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AsrError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning and friends
        raise AsrError(f"{path} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    if len(model.graph.node) == 0:
        raise AsrError(f"{path} is not a readable ONNX model (no graph nodes)")
    _load_external(model, path)
    try:
        # a path lets the checker handle models over 2 GB
        onnx.checker.check_model(str(path) if is_large(model) else model)
    except Exception as e:
        raise AsrError(f"{path} fails onnx.checker: {_first_line(e)}") from None
    _check_contents(model, path)
    return model


def _check_contents(model: onnx.ModelProto, path) -> None:
    """What onnx.checker lets through: an initializer holding more data than its dims, two nodes of one name."""
    from collections import Counter

    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        try:  # raw bytes are viewed, not copied: cheap even for a large model
            numpy_helper.to_array(tensor)
        except Exception as e:  # noqa: BLE001 - numpy's reshape error, or an unknown type
            raise AsrError(f"{path}: initializer {tensor.name!r} holds data that does not fit its dims "
                           f"{list(tensor.dims)} ({_first_line(e)})") from None
    names = Counter(node.name for node in model.graph.node if node.name)
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        raise AsrError(f"{path}: {len(repeated)} node name(s) are used by several nodes, e.g. {repeated[0]!r} "
                       f"({names[repeated[0]]} nodes); node names must be unique")


def _external_files(model: onnx.ModelProto) -> set[str]:
    """The relative locations of the model's external data files."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    """Reads the external data beside ``path`` into ``model``, refusing missing files first."""
    from onnx.external_data_helper import load_external_data_for_model

    files = _external_files(model)
    for location in sorted(files):
        target = path.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise AsrError(f"external data of {path} lies outside its folder: {location}")
        if not target.is_file():
            raise AsrError(f"external data of {path} is missing: {target}")
    if files:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise AsrError(f"cannot read the external data of {path}: {_first_line(e)}") from None


def has_external_data(path) -> bool:
    """Whether the model file at ``path`` keeps its weights in external data files (reads no weights)."""
    try:
        return bool(_external_files(onnx.load(str(path), load_external_data=False)))
    except Exception:
        return False


def is_large(model: onnx.ModelProto) -> bool:
    """Whether a model is too big for one protobuf message (2 GB), so it must travel as a path with external data."""
    return serialized_bound(model) > LARGE_BYTES


def serialized_bound(model: onnx.ModelProto) -> int:
    """An upper bound on ``model.ByteSize()``, at most 22 bytes over per initializer.

    ByteSize serialises the whole model (0.19 s on a 100 MB ResNet-50, and it is asked at load, at
    every session and at save), so each initializer's raw bytes are counted, not encoded: 0.02 s.
    """
    def tensor_bound(t) -> int:  # 22: raw_data's tag and length, and the tensor's own, as varints
        return len(t.raw_data) + _without(t, "raw_data").ByteSize() + 22

    rest = _without(model, "graph").ByteSize() + _without(model.graph, "initializer").ByteSize() + 11
    return rest + sum(tensor_bound(t) for t in model.graph.initializer)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def static_shapes(model: onnx.ModelProto, keep: int = 64) -> dict[str, tuple]:
    """Tensor name -> dims (int, or a str for a symbolic one) from ONNX shape inference, {} if it fails.

    Inference runs on a copy whose large initializers carry no data (their dims are all it needs),
    so a big model is not copied.

    Args:
        keep: initializers up to this many elements keep their data (Reshape targets and the like).
            Defaults to 64.
    """
    stripped = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    graph = stripped.graph
    graph.input.extend(model.graph.input)
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

    Either a BatchNormalization node (``bn``), whose input is recalibrated, or the output of a
    layer with no BN after it, which gets a *virtual* BN folded into the layer's weight and bias.

    Attributes:
        tensor: the measured tensor (the BN's input, or the layer's output).
        layer: the layer that produces ``tensor``, or None.
        bn: the BatchNormalization node, or None for a virtual site.
        after: what follows a virtual site's layer, for the report: "none" or "affine" (Mul/Add chain).
        head: a virtual site whose output reaches a graph output (a classifier head).
    """

    tensor: object
    layer: Layer | None
    bn: object | None
    after: str = "none"
    head: bool = False
    key: str = field(init=False)

    def __post_init__(self):
        self.key = self.tensor.name

    @property
    def channel_last(self) -> bool:
        return self.bn is None and self.layer.channel_last

    @property
    def eps(self) -> float:
        """The BN's own epsilon; 0 for a virtual site, whose floor comes from the data."""
        return float(self.bn.attrs.get("epsilon", 1e-5)) if self.bn is not None else 0.0

    @property
    def channels(self) -> int:
        return int(self.bn.inputs[1].values.size) if self.bn is not None else self.layer.channels

    @property
    def dtype(self) -> np.dtype:
        if self.bn is not None:
            return self.bn.inputs[1].values.dtype
        return self.layer.weight.values.dtype

    @property
    def kind(self) -> str:
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


def find_sites(graph, layers: list[Layer]) -> list[Site]:
    """Every BatchNormalization, and every layer output that no BN normalises, in graph order."""
    import onnx_graphsurgeon as gs

    by_node = {id(layer.node): layer for layer in layers}
    bn_layer = {id(bn): layer for layer in layers if (bn := _bn_after(layer)) is not None}
    sites = []
    for node in graph.nodes:
        if node.op == "BatchNormalization" and all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            sites.append(Site(node.inputs[0], bn_layer.get(id(node)), node))
        layer = by_node.get(id(node))
        if layer is not None and _bn_after(layer) is None:
            consumers = layer.output.outputs
            after = "affine" if len(consumers) == 1 and _is_affine(consumers[0], layer) else "none"
            sites.append(Site(layer.output, layer, None, after, _reaches_output(layer.output, graph)))
    return sites


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


def check_destination(path, source=None, overwrite: bool = False) -> Path:
    """Refuses an output path that is the input or its external data (unless ``overwrite``), a folder, or
    whose folder is missing or read-only (see :class:`asr_onnx.outputs.Plan`, which also checks the rest)."""
    from .outputs import Plan

    path = Path(path)
    plan = Plan()
    inputs = plan.read_model(source) if source is not None else []
    plan.write(path, "output", siblings=(f"{path.name}.data",), replaces=inputs if overwrite else ())
    plan.check()
    return path


def save_model(model: onnx.ModelProto, path, *, overwrite: bool = False, source=None, check: bool = True) -> Path:
    """Checks a model and writes it atomically (a staging folder beside ``path``, then renames).

    The weights go to ``<name>.data`` beside the model when the model is over 2 GB or the source model
    kept its weights in external data.

    Args:
        model: the model to write (never modified).
        path: the destination.
        overwrite: allow ``path`` to be the ``source`` model. Defaults to False.
        source: the input model's path, which is never overwritten unless ``overwrite``, and whose
            external data files never are. Defaults to None.
        check: run onnx.checker and load the model in onnxruntime first. Defaults to True.

    Raises:
        AsrError: the destination (or its ``<name>.data``) is an input file, its folder is missing or not
            writable, or the model fails the checks. No file is left behind.
    """
    from .outputs import Plan

    path = Path(path)
    plan = Plan()
    inputs = plan.read_model(source) if source is not None else []
    output = plan.write(path, "output", siblings=(f"{path.name}.data",), replaces=inputs if overwrite else ())
    plan.check()
    external = is_large(model) or (source is not None and has_external_data(source))
    with plan.staged():
        staged = output.staged
        if external:
            write_external(model, staged)
        else:
            staged.write_bytes(model.SerializeToString())
        if check:
            check_output(staged)
    return path


def write_external(model: onnx.ModelProto, path: Path) -> None:
    """Writes ``model`` to ``path`` with its weights in ``<name>.data`` beside it, one tensor at a time.

    The model is not modified, and no second copy of the weights is made in memory.
    """
    from onnx import numpy_helper

    data_name = f"{path.name}.data"
    light, graph = _without(model, "graph"), _without(model.graph, "initializer")
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
            if len(raw) < INLINE_BYTES:
                graph.initializer.add().CopyFrom(tensor)
                continue
            stub = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            for key, value in (("location", data_name), ("offset", data.tell()), ("length", len(raw))):
                stub.external_data.add(key=key, value=str(value))
            stub.data_location = onnx.TensorProto.EXTERNAL
            data.write(raw)
    light.graph.CopyFrom(graph)
    path.write_bytes(light.SerializeToString())


def _without(message, skip: str):
    """A copy of a protobuf message without the field ``skip`` (which is never copied)."""
    out = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(out, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(out, descriptor.name).CopyFrom(value)
        else:
            setattr(out, descriptor.name, value)
    return out


def check_output(model) -> None:
    """Runs onnx.checker and loads the model in onnxruntime (a ModelProto, or a path for large models).

    Raises:
        AsrError: either check fails.
    """
    from .runtime import load_error, make_session

    if isinstance(model, onnx.ModelProto) and is_large(model):
        with tempfile.TemporaryDirectory() as folder:
            write_external(model, Path(folder) / "model.onnx")
            return check_output(Path(folder) / "model.onnx")
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except Exception as e:
        raise AsrError(f"the output model fails onnx.checker: {_first_line(e)}") from None
    try:  # loading is the check; optimising the graph for a run that never happens is not
        make_session(model, device="cpu", optimize=False)
    except Exception as e:
        raise load_error(e, "the output model") from None


def input_specs(model: onnx.ModelProto):
    """The model's real inputs (initializers excluded) as calib.InputSpec."""
    from onnx import helper

    from .calib import InputSpec

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return specs


def fixed_batch(specs) -> int | None:
    """The batch size that every input fixes, or None when the batch axis is dynamic."""
    sizes = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None
