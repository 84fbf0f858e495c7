"""Wanda's input norms: the L2 norm of each input channel of every prunable layer over the calibration set."""

from __future__ import annotations

import numpy as np

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.model.builder import GraphBuilder


def input_norms(model, calib, *, batch_size: int, device: str = "auto", threads: int = 0) -> dict[int, np.ndarray]:
    """Layer index -> the L2 norm of each input channel of the layer's input over ``calib`` (Wanda's ||x||).

    One pass; in-graph ReduceSumSquare, so only per-channel vectors leave the session.
    """
    from asr_onnx.model.graph import find_layers, opset, to_graph, to_model
    from asr_onnx.model.session import Runner, batches

    graph = to_graph(model)
    layers = find_layers(graph)
    b = GraphBuilder(graph, opset(model))
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
    names, fixed = [t.name for t in outputs], fixed_batch(input_specs(model))
    sums = [0.0] * len(names)
    with Runner(to_model(graph, model), device=device, threads=threads, mem_pattern=False,
                what="the input-norm graph") as session:
        for _, feed in batches(calib, batch_size, fixed=fixed):
            for i, value in enumerate(session.run(names, feed).values()):
                sums[i] = sums[i] + value.astype(np.float64).ravel()
    return {i: np.sqrt(total) for i, total in enumerate(sums)}
