"""The Gram graph: the pruned and the dense model side by side, whose only outputs are, per chosen layer,
XᵀX of the pruned layer's input patches, XᵀY with the dense layer's output, and ΣY² per output channel.

Patches are made in-graph (im2col as a depthwise Conv with one-hot kernels, or a reshape for a 1x1 Conv,
Gemm and MatMul) and reduced by a batched MatMul, so that only per-layer matrices leave the session.
"""

from __future__ import annotations

import numpy as np

from .augment import _Builder
from .errors import AsrError
from .stats import GramStats

DENSE_PREFIX = "asr_dense/"


def patch_size(layer) -> tuple[int, int, int]:
    """(groups, patch length per group, output channels per group) of a Conv, Gemm or MatMul layer."""
    shape = layer.weight.shape
    if layer.op == "Conv":
        return layer.groups, int(np.prod(shape[1:])), shape[0] // layer.groups
    return 1, shape[layer.in_axis], shape[layer.out_axis]


def weight_rows(layer, values: np.ndarray) -> np.ndarray:
    """The weight as (output channels, patch length per group): the row each output channel dots with its patch."""
    if layer.op == "Conv":
        return values.reshape(values.shape[0], -1)
    return values if layer.out_axis == 0 else values.T


def from_rows(layer, rows: np.ndarray) -> np.ndarray:
    """The inverse of :func:`weight_rows`."""
    shape = layer.weight.shape
    if layer.op == "Conv":
        return rows.reshape(shape)
    return rows if layer.out_axis == 0 else rows.T


def one_hot_kernels(channels: int, kernel: tuple) -> np.ndarray:
    """Depthwise im2col weights (channels * k, 1, *kernel): output c * k + j copies input c at kernel offset j,
    the order in which a Conv weight (out, in, *kernel) flattens its input axis and kernel."""
    k = int(np.prod(kernel))
    eye = np.eye(k, dtype=np.float32).reshape(k, 1, *kernel)
    return np.tile(eye, (channels,) + (1,) * (len(kernel) + 1))


def _patches(b: _Builder, layer, x):
    """The layer's input as (groups, patch length, rows)."""
    groups, length, _ = patch_size(layer)
    if layer.op != "Conv":
        flat = b.op("Reshape", [x, b.const(np.array([1, -1, length], np.int64), "shape")])
        return b.op("Transpose", [flat], {"perm": [0, 2, 1]})
    node, kernel = layer.node, tuple(layer.weight.shape[2:])
    channels = layer.weight.shape[1] * groups
    trivial = (all(k == 1 for k in kernel) and all(s == 1 for s in node.attrs.get("strides", [1]))
               and not any(node.attrs.get("pads", [0])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
    if not trivial:
        attrs = {key: node.attrs[key] for key in ("strides", "pads", "dilations", "auto_pad") if key in node.attrs}
        attrs.update(group=channels, kernel_shape=list(kernel))
        x = b.op("Conv", [x, b.const(one_hot_kernels(channels, kernel), "im2col")], attrs)
    view = b.op("Reshape", [x, b.const(np.array([0, groups, length, -1], np.int64), "shape")])
    moved = b.op("Transpose", [view], {"perm": [1, 2, 0, 3]})  # (groups, length, N, positions)
    return b.op("Reshape", [moved, b.const(np.array([0, length, -1], np.int64), "shape")])


def _target(b: _Builder, layer, x, weight):
    """The dense layer's output without bias, as (groups, channels per group, rows)."""
    groups, _, per_group = patch_size(layer)
    if layer.op == "Conv":
        attrs = {key: layer.node.attrs[key] for key in ("strides", "pads", "dilations", "auto_pad", "group")
                 if key in layer.node.attrs}
        y = b.op("Conv", [x, weight], attrs)
        view = b.op("Reshape", [y, b.const(np.array([0, groups, per_group, -1], np.int64), "shape")])
        moved = b.op("Transpose", [view], {"perm": [1, 2, 0, 3]})
        return b.op("Reshape", [moved, b.const(np.array([0, per_group, -1], np.int64), "shape")])
    if layer.out_axis == 0:  # Gemm with transB: the weight is (out, in)
        weight = b.op("Transpose", [weight], {"perm": [1, 0]})
    y = b.op("MatMul", [x, weight])
    flat = b.op("Reshape", [y, b.const(np.array([1, -1, per_group], np.int64), "shape")])
    return b.op("Transpose", [flat], {"perm": [0, 2, 1]})


def _fixed(model) -> int | None:
    from .calib.specs import fixed_batch, input_specs

    return fixed_batch(input_specs(model))


def prefixed(model):
    """A copy of ``model`` whose names, except the graph inputs', start with :data:`DENSE_PREFIX`."""
    from onnx.compose import add_prefix

    return add_prefix(model, DENSE_PREFIX, rename_inputs=False)


def gram_model(dense, pruned, indices: list[int]):
    """Both models on the same inputs, with the Gram outputs of the layers ``indices`` (find_layers order).

    Returns:
        (onnx.ModelProto, the output names of each layer: (xtx, xty, yy, rows)).
    """
    from .graph import find_layers, opset, to_graph, to_model

    graph, dense_graph = to_graph(pruned), to_graph(prefixed(dense))
    layers, dense_layers = find_layers(graph), find_layers(dense_graph)
    inputs = {t.name: t for t in graph.inputs}
    for node in dense_graph.nodes:  # the dense copy reads the same graph inputs
        for i, t in enumerate(node.inputs):
            if t.name in inputs:
                node.inputs[i] = inputs[t.name]
    graph.nodes.extend(dense_graph.nodes)
    b = _Builder(graph, opset(pruned))
    outputs, names = [], []
    for index in indices:
        layer, dense_layer = layers[index], dense_layers[index]
        patches = _patches(b, layer, layer.node.inputs[0])
        target = _target(b, layer, dense_layer.node.inputs[0], dense_layer.weight)
        xtx = b.op("MatMul", [patches, b.op("Transpose", [patches], {"perm": [0, 2, 1]})])
        xty = b.op("MatMul", [patches, b.op("Transpose", [target], {"perm": [0, 2, 1]})])
        yy = b.reduce("ReduceSumSquare", target, [2])
        rows = b.op("Shape", [target], dtype=np.int64)
        outputs += [xtx, xty, yy, rows]
        names.append(tuple(t.name for t in (xtx, xty, yy, rows)))
    graph.outputs = outputs
    graph.cleanup().toposort()
    return to_model(graph, pruned), names


def accumulate(dense, pruned, indices: list[int], calib, *, batch_size: int, device: str = "auto",
               threads: int = 0, progress: bool = False, desc: str = "gram") -> tuple[list[GramStats], str]:
    """Runs the Gram graph over the calibration set; per-batch float32 sums are added up in float64.

    Returns:
        (one GramStats per index, the provider used).

    Raises:
        AsrError: onnxruntime fails. A sum that is not finite (activations too large to square in
            float32) is returned as it is, for the caller to skip.
    """
    from .errors import first_line
    from .progress import bar
    from .runtime import make_session, provider_of, release_memory

    model, names = gram_model(dense, pruned, indices)
    fixed = _fixed(model)
    try:
        session = make_session(model, device, threads, mem_pattern=False)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: an unknown op, a bad graph
        raise AsrError(f"onnxruntime cannot load the Gram graph: {first_line(e)}") from None
    del model
    wanted = [name for group in names for name in group]
    totals: list[GramStats | None] = [None] * len(indices)
    for feed in bar(calib.batches(batch_size), total=-(-len(calib) // batch_size), desc=desc, enabled=progress):
        if fixed and len(next(iter(feed.values()))) != fixed:
            continue  # a model with a fixed batch cannot take the last partial batch
        try:
            values = dict(zip(wanted, session.run(wanted, feed)))
        except Exception as e:  # noqa: BLE001
            raise AsrError(f"onnxruntime failed on a calibration batch: {first_line(e)}") from None
        for i, (xtx, xty, yy, rows) in enumerate(names):
            batch = GramStats(float(values[rows][-1]), values[xtx].astype(np.float64), values[xty].astype(np.float64),
                              values[yy].astype(np.float64).ravel())
            totals[i] = batch if totals[i] is None else totals[i].merge(batch)
    provider = provider_of(session)
    del session
    release_memory()
    if totals and totals[0] is None:
        raise AsrError(f"the calibration set has no full batch of {fixed} samples, the model's fixed batch size")
    return totals, provider


def input_norms(model, calib, *, batch_size: int, device: str = "auto", threads: int = 0) -> dict[int, np.ndarray]:
    """Layer index -> the L2 norm of each input channel of the layer's input over ``calib`` (Wanda's ||x||).

    One pass; in-graph ReduceSumSquare, so only per-channel vectors leave the session.
    """
    from .errors import first_line
    from .graph import find_layers, opset, to_graph, to_model
    from .runtime import make_session, release_memory

    graph = to_graph(model)
    layers = find_layers(graph)
    b = _Builder(graph, opset(model))
    outputs = []
    for layer in layers:
        x = layer.node.inputs[0]
        if layer.op in ("Conv", "ConvTranspose"):  # (N, C, ...): reduce all but axis 1
            moved = b.op("Reshape", [x, b.const(np.array([0, 0, -1], np.int64), "shape")])
            axes = [0, 2]
        else:  # (..., K): reduce all but the last axis
            moved = b.op("Reshape", [x, b.const(np.array([-1, layer.weight.shape[layer.in_axis]], np.int64), "shape")])
            axes = [0]
        outputs.append(b.reduce("ReduceSumSquare", moved, axes))
    graph.outputs = outputs
    graph.cleanup().toposort()
    try:
        session = make_session(to_model(graph, model), device, threads, mem_pattern=False)
    except Exception as e:  # noqa: BLE001
        raise AsrError(f"onnxruntime cannot load the input-norm graph: {first_line(e)}") from None
    names, fixed = [t.name for t in outputs], _fixed(model)
    sums = [0.0] * len(names)
    for feed in calib.batches(batch_size):
        if fixed and len(next(iter(feed.values()))) != fixed:
            continue
        for i, value in enumerate(session.run(names, feed)):
            sums[i] = sums[i] + value.astype(np.float64).ravel()
    del session
    release_memory()
    return {i: np.sqrt(total) for i, total in enumerate(sums)}
