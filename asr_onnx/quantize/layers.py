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
    found = tensor_errors(reference, keys, models, [keys] * len(models), data, device=device, batch_size=batch_size)
    return [{k: float(f"{e:.4g}") for k, e in zip(keys, errors)} for errors in found]


def tensor_errors(reference, reference_keys: list[str], models: list, model_keys: list, data, *,
                  device: str = "cpu", batch_size: int = 64) -> list[list[float]]:
    """Relative L2 error of each model's tensors ``model_keys[m][i]`` against the reference's
    ``reference_keys[i]`` on ``data``, every model run once with those tensors added as outputs.

    Returns:
        per model, per key, the relative L2 error.
    """
    from contextlib import ExitStack

    from onnx import TensorProto, helper

    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.session import Runner, batches

    def exposed(model, keys):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        have = {o.name for o in copy.graph.output}
        copy.graph.output.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, None)
                                 for k in dict.fromkeys(keys) if k not in have)
        return copy

    fixed = fixed_batch(input_specs(reference))
    all_keys = [list(reference_keys)] + [list(k) for k in model_keys]
    err2 = np.zeros((len(models), len(reference_keys)))
    ref2 = np.zeros(len(reference_keys))
    with ExitStack() as stack:
        sessions = [stack.enter_context(Runner(exposed(m, k), device=device, on="a calibration batch"))
                    for m, k in zip([reference] + list(models), all_keys)]
        for _, feed in batches(data, fixed or batch_size, fixed=fixed):
            outs = [s.run(list(dict.fromkeys(k)), feed) for s, k in zip(sessions, all_keys)]
            for i, key in enumerate(reference_keys):
                want = outs[0][key].astype(np.float64)
                ref2[i] += float(np.sum(want**2))
                for m, keys in enumerate(all_keys[1:]):
                    err2[m, i] += float(np.sum((outs[m + 1][keys[i]].astype(np.float64) - want) ** 2))
    return [list(np.sqrt(e / np.maximum(ref2, 1e-300))) for e in err2]


def added_errors(base, qdq_model, data, *, device: str = "cpu", batch_size: int = 64) -> dict[str, float]:
    """Layer name -> how much relative output error each quantized layer adds to the error of its input: the
    relative L2 error of its output against the float model's, less that of its input, on ``data``.

    A layer whose input is quantized per tensor while its weights amplify some of its channels far more than
    others (a near-dead channel that a float repair scaled back up, say) adds far more than the rest.
    """
    from asr_onnx.model.qdq import dequantize_weights, float_twin

    fake, tensors = dequantize_weights(qdq_model)
    twin, _ = float_twin(base, fake)
    quantized = {reader for t in tensors.values() for reader, index in t.readers if index == 1}
    fake_nodes = {n.name: n for n in fake.graph.node if n.name in quantized}
    pairs = [(node.name, twin_node, fake_nodes[node.name]) for node, twin_node in zip(base.graph.node, twin.graph.node)
             if node.name in fake_nodes]
    if not pairs:
        return {}
    reference_keys = [k for _, t, _ in pairs for k in (t.input[0], t.output[0])]
    model_keys = [k for _, _, f in pairs for k in (f.input[0], f.output[0])]
    (errors,) = tensor_errors(twin, reference_keys, [fake], [model_keys], data, device=device, batch_size=batch_size)
    return {name: float(errors[2 * i + 1] - errors[2 * i]) for i, (name, _, _) in enumerate(pairs)}


def float_nodes_for(model: onnx.ModelProto, layer: str) -> list[str]:
    """The nodes to leave in float so that ``layer`` runs in float on an input that is not quantized: the layer,
    and, where its input is a Relu or Clip of another layer's output, that activation and that layer (onnxruntime
    quantizes a tensor that a quantized node reads or writes)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    node = next(n for n in model.graph.node if n.name == layer)
    chain = [node.name]
    activation = producer.get(node.input[0])
    if activation is not None and activation.op_type in ("Relu", "Clip"):
        source = producer.get(activation.input[0])
        if source is not None and source.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            chain += [activation.name, source.name]
    return chain


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
