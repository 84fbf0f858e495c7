"""Per layer of a quantized model: where its float weight went, the pre-write check on the integer codes, and
each layer's output error against the float model before and after the correction."""

from __future__ import annotations

import numpy as np
import onnx

from asr_onnx.errors import AsrError


def layer_rows(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto) -> list[dict]:
    """One row per prunable layer of the float model: where its weight went in the QDQ model.

    Each row: name, op, weight (the QDQ tensor the layer reads), quantized (False where the quantizer left
    the layer in float), zeros (of the float weight), zeros_kept (every one is the zero point's code),
    scale (min/max of the weight scales), nm_24 ("yes"/"no"/"n.a." on the integer codes, along the axis
    TensorRT checks), float_nm_24 (the same on the float weight).
    """
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.model.qdq import quantized_tensors
    from asr_onnx.prune.sparsecore import reduction_axis

    tensors = quantized_tensors(qdq_model)
    nodes = {node.name: node for node in qdq_model.graph.node if node.name}
    rows = []
    for layer in find_layers(to_graph(float_model)):
        values = np.asarray(layer.weight.values)
        node = nodes.get(layer.name)
        tensor = tensors.get(node.input[1]) if node is not None and node.op_type == layer.op else None
        axis = reduction_axis(layer)
        row = {"name": layer.name, "op": layer.op, "weight": node.input[1] if node is not None else layer.weight.name,
               "quantized": tensor is not None, "zeros": int(values.size - np.count_nonzero(values)),
               "float_nm_24": _pattern(values, axis)}
        if tensor is None:
            row.update(zeros_kept=True, scale=None, nm_24=row["float_nm_24"])
        else:
            signed = tensor.signed()
            scale = np.asarray(tensor.scale, np.float64)
            row.update(zeros_kept=bool(signed.shape == values.shape and np.all(signed[values == 0] == 0)),
                       scale={"min": float(f"{scale.min():.6g}"), "max": float(f"{scale.max():.6g}")},
                       nm_24=_pattern(signed, axis))
        rows.append(row)
    return rows


def _pattern(weight: np.ndarray, axis: int | None) -> str:
    """"yes"/"no" for 2:4 along ``axis``; "n.a." without one or when its length is not a multiple of 4."""
    from asr_onnx.prune.sparsecore import conforms_nm

    if axis is None or weight.shape[axis] % 4:
        return "n.a."
    return "yes" if conforms_nm(weight, 2, 4, axis) else "no"


def check_rows(rows: list[dict]) -> None:
    """The pre-write check: every zero of the float weights is the zero point's code, and every layer whose
    float weight follows 2:4 still does in its integer codes.

    Raises:
        AsrError: a zero or the 2:4 pattern was lost (naming the first layer).
    """
    for row in rows:
        if not row["zeros_kept"]:
            raise AsrError(f"int8: a zero weight of {row['name']} is not code 0 in the quantized model; "
                           "nothing was written")
        if row["float_nm_24"] == "yes" and row["nm_24"] != "yes":
            raise AsrError(f"int8: the 2:4 pattern of {row['name']} is lost in its int8 weights; nothing was written")


def layer_errors(reference, models: list, keys: list[str], data, *, device: str = "cpu",
                 batch_size: int = 64) -> list[dict]:
    """Relative L2 error of each model's tensors ``keys`` against the reference's same-named ones on ``data``.

    Every model is run with those tensors added as outputs (onnxruntime then computes their layers in
    float, from the dequantized weights, as :func:`asr_onnx.quantize.correct.correct_quantization`
    measures them).

    Returns:
        per model, key -> relative L2 error (rounded to 4 significant digits).
    """
    from contextlib import ExitStack

    from onnx import TensorProto, helper

    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.session import Runner, batches

    def exposed(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        have = {o.name for o in copy.graph.output}
        copy.graph.output.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in keys
                                 if k not in have)
        return copy

    fixed = fixed_batch(input_specs(reference))
    err2 = [dict.fromkeys(keys, 0.0) for _ in models]
    ref2 = dict.fromkeys(keys, 0.0)
    with ExitStack() as stack:
        sessions = [stack.enter_context(Runner(exposed(m), device=device, on="a calibration batch"))
                    for m in [reference] + list(models)]
        for _, feed in batches(data, fixed or batch_size, fixed=fixed):
            outs = [s.run(keys, feed) for s in sessions]
            for key in keys:
                want = outs[0][key].astype(np.float64)
                ref2[key] += float(np.sum(want**2))
                for i, got in enumerate(outs[1:]):
                    err2[i][key] += float(np.sum((got[key].astype(np.float64) - want) ** 2))
    return [{k: float(f"{np.sqrt(e[k] / max(ref2[k], 1e-300)):.4g}") for k in keys} for e in err2]


def layer_error_rows(base, plain, corrected, data, *, device: str, batch_size: int) -> dict:
    """Layer name -> {"rel_l2_ptq", "rel_l2_corrected"}: each quantized layer's output error against the float
    model's, for plain PTQ and the corrected model."""
    from asr_onnx.model.qdq import dequantize_weights, float_twin

    fakes = [dequantize_weights(m)[0] for m in (plain, corrected)]
    twin, matched = float_twin(base, fakes[0])
    layer_of = {node.output[0]: node.name for node in fakes[0].graph.node}
    keys = {key: layer_of[key] for key in matched if key in layer_of}  # output tensor -> layer name
    if not keys:
        return {}
    names = sorted(keys)
    ptq, fixed = layer_errors(twin, fakes, names, data, device=device, batch_size=batch_size)
    return {keys[k]: {"rel_l2_ptq": ptq[k], "rel_l2_corrected": fixed[k]} for k in names}
