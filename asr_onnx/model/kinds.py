"""What a model's outputs hold: which axis is the batch, whether top-1 agreement means anything, and the
kinds a user may name (``--output-kind NAME:KIND``; how each kind is scored: :mod:`asr_onnx.verify.scoring`).

A classifier returns (N, classes); a sequence recogniser may return (N, T, classes) or, time first,
(T, N, classes); a detector returns boxes and scores mixed in one tensor ((N, 22, 2100)), where an argmax
means nothing. The batch axis is read from the declared dims (the output dim named like the input's batch
dim) or else from the calibration batch (the one axis whose size is the number of samples fed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from asr_onnx.errors import AsrError

PER_SAMPLE = "per sample"  # (N, classes)
PER_STEP = "per step"  # (N, T, classes) or (T, N, classes), class scores from a Softmax
KINDS = ("classes", "detection", "map", "regression")


@dataclass
class OutputKind:
    """One graph output's layout.

    Attributes:
        name: the output's name.
        dims: the declared dims (int, str for a symbolic dim, None when unknown); None without a shape.
        batch_dim: the declared dim's index named like the input's batch dim, or None.
        class_scores: the output comes from a Softmax or LogSoftmax over its last axis.
    """

    name: str
    dims: tuple | None
    batch_dim: int | None
    class_scores: bool


def output_kinds(model: onnx.ModelProto) -> list[OutputKind]:
    """Every graph output's declared layout, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    batch_names = {d.dim_param for v in inputs for d in v.type.tensor_type.shape.dim[:1] if d.dim_param}
    producers = {out: node for node in model.graph.node for out in node.output}
    kinds = []
    for value in model.graph.output:
        shape = value.type.tensor_type.shape if value.type.tensor_type.HasField("shape") else None
        dims = None if shape is None else tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)
        named = [i for i, d in enumerate(dims or ()) if isinstance(d, str) and d in batch_names]
        kinds.append(OutputKind(value.name, dims, named[0] if len(named) == 1 else None,
                                _from_softmax(value.name, producers, len(dims) if dims else None)))
    return kinds


def _from_softmax(name: str, producers: dict, rank: int | None) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return False
    axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
    return axis == -1 or (rank is not None and axis == rank - 1)


def batch_axis(kind: OutputKind, shape: tuple, fed: int) -> int:
    """The batch axis of one output array: the declared batch dim, else the one axis of size ``fed``.

    Args:
        kind: the output's declared layout.
        shape: the array's shape, from a run fed ``fed`` samples.
        fed: how many samples that run was fed.

    Raises:
        AsrError: no axis, or several that cannot be told apart, has the batch's size.
    """
    if kind.batch_dim is not None and kind.batch_dim < len(shape) and shape[kind.batch_dim] == fed:
        return kind.batch_dim
    sized = [i for i, n in enumerate(shape) if n == fed]
    if len(sized) > 1 and kind.dims is not None and len(kind.dims) == len(shape):
        # an axis declared with a fixed size other than the batch's, or named otherwise, is not the batch
        sized = [i for i in sized if kind.dims[i] in (None, fed)] or sized
    if not sized:
        raise AsrError(f"output {kind.name!r} {list(shape)} has no axis of the batch's size {fed}")
    return sized[0]


def agreement_kind(kind: OutputKind, shape: tuple, axis: int) -> tuple[str | None, str]:
    """Where top-1 agreement means something: ``(PER_SAMPLE | PER_STEP | None, why)``."""
    if len(shape) == 2 and shape[1 - axis] > 1:
        return PER_SAMPLE, "the output is (N, classes)"
    if len(shape) == 3 and axis in (0, 1) and shape[2] > 1 and kind.class_scores:
        return PER_STEP, "the output is per-step class scores (a Softmax over its last axis)"
    return None, (f"the output {list(shape)} is neither (N, classes) nor per-step class scores (N, T, classes): "
                  "an argmax over it means nothing, so only the relative error is reported")


def per_sample(array: np.ndarray, axis: int) -> np.ndarray:
    """The array as float64 (N, everything else), batch axis first."""
    moved = np.moveaxis(np.asarray(array, np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1)


def top1_matches(candidate: np.ndarray, reference: np.ndarray, axis: int, how: str) -> np.ndarray:
    """Per sample, the fraction of top-1 decisions (one per sample, or one per step) that agree."""
    a, b = np.moveaxis(candidate, axis, 0), np.moveaxis(reference, axis, 0)
    same = a.argmax(-1) == b.argmax(-1)
    return same.astype(np.float64) if how == PER_SAMPLE else same.reshape(len(same), -1).mean(1)


def parse_output_kinds(values) -> dict[str, str]:
    """``NAME:KIND`` strings (``--output-kind``) as {output name: kind}; the last colon splits, as output names
    may hold colons.

    Raises:
        AsrError: no colon, an empty name, a kind not in KINDS, or one name given twice as two kinds.
    """
    given: dict[str, str] = {}
    for text in values or ():
        name, colon, kind = str(text).rpartition(":")
        kind = kind.strip().lower()
        if not colon or not name:
            raise AsrError(f"--output-kind {text!r}: expected NAME:KIND, KIND one of {'|'.join(KINDS)}")
        if kind not in KINDS:
            raise AsrError(f"--output-kind {text!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        if name in given and given[name] != kind:
            raise AsrError(f"--output-kind names {name!r} twice, as {given[name]} and {kind}")
        given[name] = kind
    return given


def check_output_kinds(model: onnx.ModelProto, given: dict[str, str]) -> None:
    """Refuses a ``--output-kind`` name that is not one of the model's outputs.

    Raises:
        AsrError: an unknown output name (the model's are listed).
    """
    names = [v.name for v in model.graph.output]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise AsrError(f"--output-kind names {', '.join(map(repr, unknown))}, not an output of the model; its "
                       f"outputs are {', '.join(map(repr, names))}")
