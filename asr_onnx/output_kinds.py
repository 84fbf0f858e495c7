"""What a model's outputs hold: which axis is the batch, whether top-1 agreement means anything, and how each
output is scored.

A classifier returns (N, classes); a sequence recogniser may return (N, T, classes) or, time first,
(T, N, classes); a detector returns boxes and scores mixed in one tensor ((N, 22, 2100)), where an argmax
means nothing. The batch axis is read from the declared dims (the output dim named like the input's batch
dim) or else from the calibration batch (the one axis whose size is the number of samples fed).

Each output has one of :data:`KINDS` (:func:`plan_scoring`): ``classes`` (top-1 agreement, on the first
output), ``detection`` (a head recognised by :mod:`asr_onnx.detection`: scored by detection F1), ``map``
(channels on the axis after the batch, as NCHW) or ``regression`` (channels on the last axis). The user can
name any output's kind (``--output-kind NAME:KIND``). Every float output is also compared channel by
channel, each channel standardised by the dense model's spread (see :mod:`asr_onnx.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import AsrError

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
        AsrError: no colon, an empty name, a kind not in KINDS, or one name given twice.
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


@dataclass
class Scoring:
    """How a model's outputs are scored, decided on the reference's first batch (:func:`plan_scoring`).

    Attributes:
        kinds: per output, one of KINDS, or None for an output that is not scored (not float, or a scalar).
        agreement: the output whose top-1 agreement is scored, or None.
        how: PER_SAMPLE or PER_STEP for that output, or None.
        why: why there is no agreement, or what it is.
        heads: the detection heads (:class:`asr_onnx.detection.Head`).
        channel_axes: per output, the axis whose entries are standardised separately (None: the output is one
            channel, or not scored).
    """

    kinds: list
    agreement: int | None
    how: str | None
    why: str
    heads: list
    channel_axes: list

    def named(self, kinds: list[OutputKind]) -> dict[str, str | None]:
        """{output name: its kind}, for the report."""
        return {k.name: kind for k, kind in zip(kinds, self.kinds)}


def plan_scoring(kinds: list[OutputKind], arrays: list, axes: list[int], given: dict[str, str] | None = None) -> Scoring:
    """Each output's kind, the agreement output and the detection heads, from one run of the reference.

    Args:
        kinds: the model's declared output layouts.
        arrays: one run's outputs (the reference's: the dense model's values decide what a head is).
        axes: each output's batch axis.
        given: {output name: kind} the user named (``--output-kind``); the rest are recognised. Defaults to None.

    Raises:
        AsrError: an output named ``classes`` that is not (N, classes) or (N, T, classes), or one named
            ``detection`` that no head layout fits.
    """
    from .detection import find_heads

    given = given or {}
    named = {i: given[k.name] for i, k in enumerate(kinds) if k.name in given}
    softmax = {i for i, k in enumerate(kinds) if k.class_scores}
    heads = find_heads(arrays, axes, named={i for i, kind in named.items() if kind == "detection"}, softmax=softmax,
                       excluded={i for i, kind in named.items() if kind != "detection"})
    in_head = {i: head for head in heads for i in head.outputs}
    lost = [i for i, kind in named.items() if kind == "detection" and i not in in_head]
    if lost:
        raise AsrError(f"--output-kind {kinds[lost[0]].name}:detection: its shape {list(np.shape(arrays[lost[0]]))} "
                       "is neither a YOLO head (N, 4+C, A) or (N, A, 4+C) nor half of an SSD pair "
                       "(N, A, 4) + (N, A, C)")
    chosen = [i for i, kind in named.items() if kind == "classes"]
    if chosen:
        first = min(chosen)
        rank = np.ndim(arrays[first])
        if rank not in (2, 3):
            raise AsrError(f"--output-kind {kinds[first].name}:classes: the output {list(np.shape(arrays[first]))} is "
                           "neither (N, classes) nor per-step (N, T, classes)")
        agreement, how = first, PER_SAMPLE if rank == 2 else PER_STEP
        why = "the output was named classes"
    elif 0 in in_head:
        agreement, how, why = None, None, "a detection head: scored by detection F1 against the dense model"
    elif 0 in named:
        agreement, how, why = None, None, f"the output was named {named[0]}"
    else:
        how, why = agreement_kind(kinds[0], np.shape(arrays[0]), axes[0])
        agreement = 0 if how else None
    labels: list[str | None] = []
    channel_axes: list[int | None] = []
    for i, (kind, array) in enumerate(zip(kinds, arrays)):
        shape = np.shape(array)
        label: str | None = "detection" if i in in_head else named.get(i) or _recognised(kind, shape, axes[i], i == agreement)
        if not np.issubdtype(np.asarray(array).dtype, np.floating) or not shape:
            label = None
        labels.append(label)
        channel_axes.append(_channel_axis(label, shape, axes[i], in_head.get(i), i))
    return Scoring(labels, agreement, how, why, heads, channel_axes)


def _recognised(kind: OutputKind, shape: tuple, axis: int, scored: bool) -> str:
    if scored or (len(shape) == 2 and shape[1 - axis] > 1) or (len(shape) == 3 and kind.class_scores):
        return "classes"
    return "map" if len(shape) >= 3 else "regression"


def _channel_axis(label: str | None, shape: tuple, axis: int, head, index: int) -> int | None:
    """The axis of an output's channels: a head's features, a class or regression output's last axis, a map's
    first axis after the batch; None for a single channel."""
    if label is None or len(shape) < 2:
        return None
    if head is not None:
        return 1 if head.channels_first and head.scores is None else 2
    if label in ("classes", "regression"):
        return len(shape) - 1 if axis != len(shape) - 1 else None
    return next(i for i in range(len(shape)) if i != axis)
