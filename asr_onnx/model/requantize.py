"""Integer codes put back behind each DequantizeLinear of a QDQ model whose weights a repair held in float.

Channel by channel (see :mod:`asr_onnx.model.qdq` for the float-weight form):

- a channel whose new weights are the old codes (those still nonzero) times one positive factor, as a
  correction folded into a layer makes them, keeps its codes: the factor goes into its scale;
- otherwise the new weights are rounded with the old scale where they still fit the codes' old range
  (the largest |q - zero| of the tensor: 127, or 63 for onnxruntime's reduced range), else with a new
  scale that maps the largest |w| onto that range.

A weight of exactly 0 is always code ``zero``, so pruned weights stay zero. A bias keeps the relation
``bias scale = input scale * weight scale`` that onnxruntime's integer kernels assume: it is rescaled with
its weight's channels, then rounded to int32.

:class:`HeldInFloat` is a QDQ input as the repair holds it, and gives its repaired float form back in QDQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from asr_onnx.errors import AsrError
from asr_onnx.model.qdq import QuantizedTensor, dequantize_weights, same_model, unique_name

RESCALE_TOLERANCE = 1e-6  # relative: float32 rounds a rescaled weight by 6e-8 of its size
QDQ_CHANNELS = ("channel pruning of a quantized (QDQ) model is not supported: its integer weights and scales would "
                "have to be sliced too; prune its float model, then use --int8")


def requantize(model: onnx.ModelProto, tensors: dict[str, QuantizedTensor], log: list | None = None) -> onnx.ModelProto:
    """Puts integer codes back behind a DequantizeLinear for every layer input that ``tensors`` quantized.

    Args:
        model: a float-weight form (see :func:`asr_onnx.model.qdq.dequantize_weights`), as a repair left it:
            its layer nodes keep their names, their weights and biases are float32 initializers (maybe renamed).
        tensors: :func:`asr_onnx.model.qdq.quantized_tensors` of the QDQ model the form was made from.
        log: a list to append one entry per layer weight to: {"layer", "weight", "channels", and how many
            channels: "kept" (the old codes, pruned ones 0, at the old scale), "rescaled" (those codes, a new
            scale), "rounded" (new codes at the old scale), "new_scale" (new codes, a new scale)}. Defaults
            to None.

    Returns:
        the QDQ model: each DequantizeLinear under its own names (a shared tensor that now differs between
        its readers gets one copy per distinct value), with codes and scales as the module docstring says.
        A float bias (one the repair added to a layer that had none, say) stays float.

    Raises:
        AsrError: a weight changed shape (channel pruning of a quantized model), a layer input is no
            longer a constant, or a bias code would not fit int32.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {node.name: node for node in graph.node if node.name}
    by_reader = {reader: tensor for tensor in tensors.values() for reader in tensor.readers}
    jobs, ratios = [], {}
    for node_name, index in sorted(by_reader, key=lambda r: (r[1], r[0])):  # a bias follows its weight's scales
        tensor, node = by_reader[(node_name, index)], nodes.get(node_name)
        if node is None or index >= len(node.input):
            continue
        name = node.input[index]
        if name not in inits:
            raise AsrError(f"int8: {node_name} input {index} ({name!r}) is no longer a constant; it cannot be "
                           "quantized again")
        values = numpy_helper.to_array(inits[name]).astype(np.float64)
        if values.shape != tensor.codes.shape:
            raise AsrError(f"int8: {node_name} input {index} changed shape from {list(tensor.codes.shape)} to "
                           f"{list(values.shape)}; channel pruning of a quantized model is not supported")
        if index == 1:
            codes, scale, zero, ratios[node_name], counts = _weight_codes(tensor, values)
            if log is not None:
                log.append({"layer": node_name, "weight": tensor.output, **counts})
        else:
            codes, scale, zero = _bias_codes(tensor, values, ratios.get(node_name), node_name)
        jobs.append((node, index, tensor, codes, scale, zero))
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)} | set(inits)
    replaced, emitted, dq_nodes, new_inits = set(), {}, [], []
    for node, index, tensor, codes, scale, zero in jobs:
        replaced.add(node.input[index])
        key = (codes.dtype.str, codes.tobytes(), scale.tobytes(), zero.tobytes())
        copies = emitted.setdefault(tensor.output, {})
        if key not in copies:
            dq, made = _dequantize_node(tensor, codes, scale, zero, node.name if copies else "", taken)
            dq_nodes.append(dq)
            new_inits += made
            copies[key] = dq.output[0]
        node.input[index] = copies[key]
    produced = {dq.output[0] for dq in dq_nodes}
    read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name not in replaced or (t.name in read and t.name not in produced)]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_inits)
    rest = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(dq_nodes + rest)
    return out


def _dequantize_node(tensor: QuantizedTensor, codes, scale, zero, copy_of: str, taken: set):
    """The DequantizeLinear of new codes and its initializers: the original names, or for a further copy
    (``copy_of``: the reader it is for) names made unique."""
    dq = onnx.NodeProto()
    dq.CopyFrom(tensor.node)
    names = list(tensor.node.input) + [""] * (3 - len(tensor.node.input))
    if np.any(zero) and not names[2]:
        names[2] = f"{names[0]}_zero_point"
    if copy_of:
        dq.name = unique_name(f"{dq.name or tensor.output}.{copy_of}", taken)
        dq.output[0] = unique_name(f"{tensor.output}.{copy_of}", taken)
        names = [unique_name(f"{n}.{copy_of}", taken) if n else n for n in names]
    else:  # a name that something else still reads as an initializer is not reused
        names = [unique_name(n, taken) if n in taken and n != tensor.output else n for n in names]
        taken.update(n for n in names if n)
    if scale.size > 1 and tensor.axis is None:  # a scalar bias scale became one per channel
        attributes = [a for a in dq.attribute if a.name != "axis"] + [helper.make_attribute("axis", 0)]
        dq.ClearField("attribute")
        dq.attribute.extend(attributes)
    dq.ClearField("input")
    dq.input.extend(names[:3] if names[2] else names[:2])
    made = [numpy_helper.from_array(codes, names[0]), numpy_helper.from_array(scale, names[1])]
    if names[2]:
        made.append(numpy_helper.from_array(zero, names[2]))
    return dq, made


def _channels(tensor: QuantizedTensor, values: np.ndarray) -> list:
    """Index tuples of the tensor's channels along its scale axis (the whole tensor for one scale)."""
    if tensor.axis is None:
        return [(...,)]
    return [tuple([slice(None)] * tensor.axis + [c]) for c in range(values.shape[tensor.axis])]


def _weight_codes(tensor: QuantizedTensor, values: np.ndarray):
    """(codes, scale, zero, new scale over old scale per channel or None, how many channels went which way)
    of a repaired weight."""
    old = tensor.signed()
    info = np.iinfo(tensor.codes.dtype)
    bound = int(np.abs(old).max()) or int(info.max)
    scales = np.array(tensor.scale, np.float64).reshape(-1)
    zeros = np.array(tensor.zero, np.int64).reshape(-1)
    new_scales, codes = scales.copy(), np.zeros(values.shape, np.int64)
    channels = _channels(tensor, values)
    counts = {"channels": len(channels), "kept": 0, "rescaled": 0, "rounded": 0, "new_scale": 0}
    for c, index in enumerate(channels):
        w, s = values[index], scales[c]
        if not np.any(w) or s <= 0:
            counts["kept" if not np.any(old[index]) else "rounded"] += 1
            continue  # all zero: code zero at the old scale
        limit = int(min(bound, info.max - zeros[c], zeros[c] - info.min))
        kept = np.where(w != 0, old[index], 0).astype(np.float64)
        ratio = w / s
        if np.any(kept):
            factor = float(np.sum(ratio * kept) / np.sum(kept**2))
            if factor > 0 and np.abs(ratio - factor * kept).max() <= RESCALE_TOLERANCE * np.abs(ratio).max():
                same = np.float32(s * factor) == np.float32(s)  # float32 cannot tell the scales apart
                codes[index], new_scales[c] = kept, s if same else s * factor  # a correction folded into the scale
                counts["kept" if same else "rescaled"] += 1
                continue
        rounded = np.round(ratio)
        if np.abs(rounded).max() > limit:  # no longer fits its old range: a new scale for this channel
            new_scales[c] = float(np.abs(w).max()) / limit
            rounded = np.clip(np.round(w / new_scales[c]), -limit, limit)
            counts["new_scale"] += 1
        else:
            counts["rounded"] += 1
        codes[index] = rounded
    scale = new_scales.astype(np.float32).reshape(tensor.scale.shape)
    stored = (codes + tensor.along(zeros)).astype(tensor.codes.dtype)
    ratio = np.where(scales > 0, new_scales / np.where(scales > 0, scales, 1.0), 1.0)
    return stored, scale, np.array(tensor.zero), (None if np.all(ratio == 1) else ratio), counts


def _bias_codes(tensor: QuantizedTensor, values: np.ndarray, ratio, layer: str):
    """(codes, scale, zero) of a repaired integer bias, its scales following its weight's (``ratio``)."""
    scale = np.array(tensor.scale, np.float64)
    if ratio is not None:
        if ratio.size not in (1, values.size):
            raise AsrError(f"int8: the weight scales of {layer} do not run along its output channels")
        scale = np.broadcast_to(scale.reshape(-1), values.shape) * ratio.reshape(-1)
    scale32 = scale.astype(np.float32)
    zero = np.array(tensor.zero) if scale32.shape == tensor.zero.shape else np.zeros(scale32.shape, tensor.zero.dtype)
    if np.any(scale32 <= 0):
        raise AsrError(f"int8: the bias of {layer} would get a scale that is not positive")
    codes = np.round(values / scale32.astype(np.float64)) + zero.astype(np.float64)
    info = np.iinfo(tensor.codes.dtype)
    if codes.min(initial=0) < info.min or codes.max(initial=0) > info.max:
        raise AsrError(f"int8: the bias of {layer} no longer fits {tensor.codes.dtype} at its scale")
    return codes.astype(tensor.codes.dtype), scale32, zero


@dataclass(frozen=True)
class HeldInFloat:
    """A QDQ model as a repair holds it: the model as given, its float-weight form and its quantized tensors.

    Attributes:
        given: the QDQ model as it was read.
        float_form: :func:`asr_onnx.model.qdq.dequantize_weights` of it, which the repair prunes, measures and corrects.
        tensors: its :func:`asr_onnx.model.qdq.quantized_tensors`, whose scales the repaired weights are quantized with again.
    """

    given: onnx.ModelProto
    float_form: onnx.ModelProto
    tensors: dict

    @classmethod
    def split(cls, model: onnx.ModelProto) -> tuple[onnx.ModelProto, HeldInFloat | None]:
        """(the model a repair works on: its float form for a QDQ model, else the model itself; the held form or None)."""
        held = cls.of(model)
        return (model, None) if held is None else (held.float_form, held)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> HeldInFloat | None:
        """The held form of a QDQ model; None for a model without quantized weights."""
        float_form, tensors = dequantize_weights(model)
        return cls(model, float_form, tensors) if tensors else None

    def quantize_again(self, repaired: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
        """The repaired float form with integer weights again (see :func:`requantize`:
        the original scales where the repaired weights still fit them); the model as given, every byte of
        it, when the repair left the float form as it was.

        Returns:
            (the QDQ model, the report's ``quantization`` entry: {"format", "input": "quantized",
            "unchanged", "tensors": one entry per layer weight}).
        """
        log: list = []
        unchanged = same_model(repaired, self.float_form)
        model = self.given if unchanged else requantize(repaired, self.tensors, log)
        return model, {"format": "QDQ", "input": "quantized", "unchanged": unchanged, "tensors": log}
