"""Reading and writing model files: checks on load, external data, size limits, atomic saves."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx

from asr_onnx.errors import AsrError, first_line
from asr_onnx.filekinds import check_input
from asr_onnx.outputs import external_files, external_locations

LARGE_BYTES = 2**31 - 1  # protobuf's limit on one serialized message
INLINE_BYTES = 1024  # smaller tensors stay inside the model file when writing external data


def load_model(path) -> onnx.ModelProto:
    """Reads and checks an ONNX file, with any external data beside it.

    Raises:
        AsrError: the path is missing, not a file (a FIFO or a device is refused before it is opened),
            empty, not ONNX, fails onnx.checker, or names external data that is missing.
    """
    path = Path(path)
    if not path.exists():
        raise AsrError(f"model not found: {path}")
    check_input(path, "model")
    if not path.is_file():
        raise AsrError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise AsrError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning and friends
        raise AsrError(f"{path} is not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    if len(model.graph.node) == 0:
        raise AsrError(f"{path} is not a readable ONNX model (no graph nodes)")
    _load_external(model, path)
    try:
        # a path lets the checker handle models over 2 GB
        onnx.checker.check_model(str(path) if is_large(model) else model)
    except Exception as e:
        raise AsrError(f"{path} fails onnx.checker: {first_line(e)}") from None
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
                           f"{list(tensor.dims)} ({first_line(e)})") from None
    names = Counter(node.name for node in model.graph.node if node.name)
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        raise AsrError(f"{path}: {len(repeated)} node name(s) are used by several nodes, e.g. {repeated[0]!r} "
                       f"({names[repeated[0]]} nodes); node names must be unique")




def _load_external(model: onnx.ModelProto, path: Path) -> None:
    """Reads the external data beside ``path`` into ``model``, refusing missing files first."""
    from onnx.external_data_helper import load_external_data_for_model

    files = external_files(model)
    for location in sorted(files):
        target = path.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise AsrError(f"external data of {path} lies outside its folder: {location}")
        check_input(target, f"the external data of {path}")
        if not target.is_file():
            raise AsrError(f"external data of {path} is missing: {target}")
    if files:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise AsrError(f"cannot read the external data of {path}: {first_line(e)}") from None


def has_external_data(path) -> bool:
    """Whether the model file at ``path`` keeps its weights in external data files (reads no weights)."""
    return bool(external_locations(path))


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




def save_model(model: onnx.ModelProto, path, *, overwrite: bool = False, source=None,
               check: Callable[[Path], None] | None = None) -> Path:
    """Writes a model atomically (a staging folder beside ``path``, then renames), checking it first.

    The weights go to ``<name>.data`` beside the model when the model is over 2 GB or the source model
    kept its weights in external data.

    Args:
        model: the model to write (never modified).
        path: the destination.
        overwrite: allow ``path`` to be the ``source`` model. Defaults to False.
        source: the input model's path, which is never overwritten unless ``overwrite``, and whose
            external data files never are. Defaults to None.
        check: called on the staged file before it is renamed into place, e.g.
            :func:`asr_onnx.model.check.check_output` (onnx.checker and an onnxruntime load, which this
            module cannot import: the runtime reads models through it). Defaults to None (no check).

    Raises:
        AsrError: the destination (or its ``<name>.data``) is an input file, its folder is missing or not
            writable, or the model fails the checks. No file is left behind.
    """
    from asr_onnx.outputs import Plan

    path = Path(path)
    plan = Plan()
    inputs = plan.read_model(source) if source is not None else []
    output = plan.write(path, "output", siblings=(f"{path.name}.data",), replaces=inputs if overwrite else ())
    plan.check()
    external = is_large(model) or len(inputs) > 1  # read_model listed the source's external data files
    with plan.staged():
        staged = output.staged
        if external:
            write_external(model, staged)
        else:
            staged.write_bytes(model.SerializeToString())
        if check is not None:
            check(staged)
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

