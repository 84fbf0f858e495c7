"""A QDQ model's weights seen in float, put back in integers, and the damage quantization did corrected.

A QDQ model keeps each layer weight (and bias) as integer codes behind a DequantizeLinear:
``w = (q - zero) * scale``, one scale per output channel or one per tensor. :func:`dequantize_weights`
replaces those nodes by the float tensors they compute (exactly: float32, as onnxruntime computes them),
so that every stage of a repair (pruning, measurement, correction, refit) works on the model as it runs,
its activations still quantized. :func:`requantize` then puts integer codes back, channel by channel:

- a channel whose new weights are the old codes (those still nonzero) times one positive factor, as a
  correction folded into a layer makes them, keeps its codes: the factor goes into its scale;
- otherwise the new weights are rounded with the old scale where they still fit the codes' old range
  (the largest |q - zero| of the tensor: 127, or 63 for onnxruntime's reduced range), else with a new
  scale that maps the largest |w| onto that range.

A weight of exactly 0 is always code ``zero``, so pruned weights stay zero. A bias keeps the relation
``bias scale = input scale * weight scale`` that onnxruntime's integer kernels assume: it is rescaled with
its weight's channels, then rounded to int32.

:func:`correct_quantization` measures a quantized model's per-channel statistics through its QDQ graph
(every upstream layer renormalised, as the repair measures a pruned model) and folds the correction
that maps them onto the float model's into each layer's bias and weight scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import AsrError

#: layer op -> the inputs a quantized weight (1) and bias (2) are read at.
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}
CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")  # a MatMul's shift would need an Add node the QDQ graph lacks
CORRECTIONS = ("none", "bn")
RESCALE_TOLERANCE = 1e-6  # relative: float32 rounds a rescaled weight by 6e-8 of its size
INT32_MAX = 2**31 - 1


@dataclass
class QuantizedTensor:
    """One DequantizeLinear of a constant that a layer reads as its weight or bias.

    Attributes:
        output: the DequantizeLinear's output (the name the layer reads).
        node: the DequantizeLinear node (a copy).
        codes: the integer codes, in their own dtype.
        scale: the float32 scale(s), as stored.
        zero: the zero point(s), as stored (zeros of the codes' dtype when absent).
        axis: the axis the scales run along, or None for one scale.
        readers: (layer node name, input index) of every input it feeds.
    """

    output: str
    node: onnx.NodeProto
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    axis: int | None
    readers: list = field(default_factory=list)

    def _along(self, values: np.ndarray) -> np.ndarray:
        """A per-axis array shaped to broadcast over the codes (a scalar stays as it is)."""
        if self.axis is None:
            return values.reshape(())
        view = [1] * self.codes.ndim
        view[self.axis] = values.size
        return values.reshape(view)

    def signed(self) -> np.ndarray:
        """The codes less their zero point, int64."""
        return self.codes.astype(np.int64) - self._along(self.zero.astype(np.int64))

    def values(self) -> np.ndarray:
        """The float32 tensor the DequantizeLinear computes."""
        return self.signed().astype(np.float32) * self._along(self.scale.astype(np.float32))


def _array(inits: dict, name: str):
    return numpy_helper.to_array(inits[name]) if name in inits else None


def quantized_tensors(model: onnx.ModelProto) -> dict[str, QuantizedTensor]:
    """Every DequantizeLinear of an integer constant whose output only layers read as weight or bias.

    Returns:
        DequantizeLinear output name -> :class:`QuantizedTensor`; empty for a float model.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    other: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        places = WEIGHT_INPUTS.get(node.op_type, ()) if (node.domain or "") in ("", "ai.onnx") else ()
        for index, name in enumerate(node.input):
            if index in places and node.name:
                readers.setdefault(name, []).append((node.name, index))
            elif name:
                other.add(name)
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or (node.domain or "") not in ("", "ai.onnx"):
            continue
        out = node.output[0]
        codes, scale = _array(inits, node.input[0]), _array(inits, node.input[1]) if len(node.input) > 1 else None
        if codes is None or scale is None or codes.dtype.kind not in "iu" or out in other or out not in readers:
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue  # blocked quantization: scales per block, not per channel
        zero = _array(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and zero is None:
            continue
        zero = np.zeros(scale.shape, codes.dtype) if zero is None else zero
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim if scale.size > 1 else None
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        found[out] = QuantizedTensor(out, kept, codes, scale, zero, axis, readers[out])
    return found


def dequantize_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, QuantizedTensor]]:
    """A copy of ``model`` whose quantized layer weights and biases are float32 initializers.

    Each DequantizeLinear of :func:`quantized_tensors` is replaced by the float32 tensor it computes,
    under its output's name; its codes, scales and zero points go where nothing else reads them. The
    activations' QuantizeLinear/DequantizeLinear stay, so the copy computes what the model computes.

    Returns:
        (the copy, :func:`quantized_tensors` of ``model``); the copy is ``model`` itself when it has none.
    """
    tensors = quantized_tensors(model)
    if not tensors:
        return model, tensors
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = [node for node in graph.node if not (node.op_type == "DequantizeLinear" and node.output[0] in tensors)]
    graph.ClearField("node")
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used or t.name in tensors]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.initializer.extend(numpy_helper.from_array(t.values(), name) for name, t in tensors.items())
    return copy, tensors


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two models have the same nodes (in any order) and the same values of every initializer a node reads."""
    def content(model):
        nodes = sorted(node.SerializeToString(deterministic=True) for node in model.graph.node)
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        inits = {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
                 for t in model.graph.initializer if t.name in used}
        return nodes, inits, [o.name for o in model.graph.output], [i.name for i in model.graph.input]

    return content(a) == content(b)


def requantize(model: onnx.ModelProto, tensors: dict[str, QuantizedTensor], log: list | None = None) -> onnx.ModelProto:
    """Puts integer codes back behind a DequantizeLinear for every layer input that ``tensors`` quantized.

    Args:
        model: a float-weight form (see :func:`dequantize_weights`), as a repair left it: its layer nodes
            keep their names, their weights and biases are float32 initializers (maybe renamed).
        tensors: :func:`quantized_tensors` of the QDQ model the form was made from.
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
        dq.name = _unique(f"{dq.name or tensor.output}.{copy_of}", taken)
        dq.output[0] = _unique(f"{tensor.output}.{copy_of}", taken)
        names = [_unique(f"{n}.{copy_of}", taken) if n else n for n in names]
    else:  # a name that something else still reads as an initializer is not reused
        names = [_unique(n, taken) if n in taken and n != tensor.output else n for n in names]
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


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


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
    stored = (codes + tensor._along(zeros)).astype(tensor.codes.dtype)
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


# ---------------------------------------------------------------- correcting a quantized model


def float_twin(float_model: onnx.ModelProto, fake: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of the float model whose layer outputs carry the names the quantized model's layers write.

    onnxruntime's quantizer removes a Relu after a Conv (the output's zero point clips instead) and gives
    the Conv the Relu's output name, so the same name means different tensors in the two models. Layers
    are matched by node name (and op); a float tensor that already has a target name is renamed away first.

    Returns:
        (the twin, quantized layer output name -> the float layer's output name, for the matched layers).
    """
    fake_out = {n.name: (n.op_type, n.output[0]) for n in fake.graph.node if n.name and n.op_type in WEIGHT_INPUTS}
    pairs = {}
    for node in float_model.graph.node:
        target = fake_out.get(node.name)
        if target and target[0] == node.op_type:
            pairs[node.output[0]] = target[1]
    twin = onnx.ModelProto()
    twin.CopyFrom(float_model)
    names = {n for node in twin.graph.node for n in list(node.input) + list(node.output)}
    names |= {v.name for v in list(twin.graph.input) + list(twin.graph.output)}
    targets = set(pairs.values())
    taken = names | targets
    rename = {name: _unique(f"{name}.asr_float", taken) for name in names if name in targets and name not in pairs}
    rename.update(pairs)
    for node in twin.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
    for value in list(twin.graph.output) + list(twin.graph.value_info):
        value.name = rename.get(value.name, value.name)
    return twin, {target: source for source, target in pairs.items()}


@dataclass
class QuantCorrection:
    """What :func:`correct_quantization` did at each corrected layer.

    Attributes:
        method: "none" or "bn".
        sites: layer output name (in the quantized graph) -> {"layer", "channels", "gain" (min/median/max of
            the factor folded into the weight scales), "mean_shift" (median over channels of the quantized
            output's mean offset, in the float output's standard deviations), "var_ratio" (median of the
            quantized output's variance over the float one's)}.
    """

    method: str
    sites: dict


def correct_quantization(float_model, qdq_model, calib, *, method: str = "bn", batch_size: int = 64,
                         device: str = "auto", threads: int = 0, progress: bool = False,
                         sequential: bool = True) -> tuple[onnx.ModelProto, QuantCorrection]:
    """Maps each quantized layer's per-channel output mean and variance onto the float model's.

    The float model's statistics are measured at every layer output, then the quantized model's through
    its QDQ graph level by level, every corrected layer upstream renormalised to its population statistics
    (:func:`asr_onnx.measure.measure_pruned` with ``sequential``: the repair's exact layer-by-layer
    recalibration, one pass per depth of layers). Each layer's correction (the exact recalibration of a
    virtual BN, :func:`asr_onnx.recal.correct`) is folded into its float weight and bias, and
    :func:`requantize` then keeps the codes, moving each channel's factor into its weight scale and the
    shift into its bias.

    Two cheaper schedules were tried and dropped (benchmarks/RESULTS.md, section 8): one pass with the
    upstream sites renormalised by batch statistics, whose noise is of the size of the quantization damage,
    and correcting every layer at once from one pass (each layer then also undoes the shift that its
    upstream layers' corrections remove, and a second round makes it worse).

    Args:
        float_model: the float model the quantized one was made from (every node named).
        qdq_model: its QDQ model.
        calib: the calibration set.
        method: "none" (returns ``qdq_model``) or "bn". Defaults to "bn".
        batch_size, device, threads, progress: as for :func:`asr_onnx.measure.measure`.
        sequential: False measures in one pass, upstream renormalised by batch statistics (the first
            schedule dropped above, kept for the benchmark). Defaults to True.

    Returns:
        (the corrected QDQ model, a :class:`QuantCorrection`).
    """
    from .graph import find_layers, find_sites, to_graph, to_model
    from .measure import SiteMap, measure, measure_pruned, site_levels
    from .stats import merge_all

    if method not in CORRECTIONS:
        raise AsrError(f"unknown quantization correction {method!r}; choose one of {', '.join(CORRECTIONS)}")
    if method == "none":
        return qdq_model, QuantCorrection(method, {})
    fake, tensors = dequantize_weights(qdq_model)
    twin, matched = float_twin(float_model, fake)
    graph = to_graph(fake)
    sites = find_sites(graph, find_layers(graph))
    quantized = {r[0] for t in tensors.values() for r in t.readers if r[1] == 1}
    corrected = [s for s in sites if s.bn is None and s.key in matched and s.layer.op in CORRECTED_OPS
                 and s.layer.name in quantized]
    if not corrected:
        return qdq_model, QuantCorrection(method, {})
    keys = sorted(s.key for s in corrected)
    options = dict(batch_size=min(batch_size, len(calib)), device=device, threads=threads, progress=progress)
    batches, _ = measure(twin, calib, keys=keys, desc="float", **options)
    dense = {key: merge_all(b) for key, b in batches.items()}
    kept = [s for s in sites if s.bn is not None or s in corrected]  # a BN site keeps its own statistics
    site_map = SiteMap(kept, frozenset(keys), site_levels(graph, sites))
    measured = measure_pruned(fake, calib, site_map, dense, "running", sequential=sequential, **options)
    report = {s.key: _write(graph, s, measured.references[s.key], measured.pruned[s.key]) for s in corrected}
    graph.cleanup().toposort()
    return requantize(to_model(graph, fake), tensors), QuantCorrection(method, report)


def _write(graph, site, ref, stats: list) -> dict:
    """Writes one site's correction into ``graph``; returns what the report says of it."""
    from .recal import VAR_FLOOR, affine, correct, write
    from .stats import merge_all

    fix = correct(site, ref, stats, "bn")
    gain, _ = affine(ref, fix)  # the factor on the layer's output, folded into its weight scales
    write(graph, site, ref, fix)
    measured = merge_all(stats)
    std = np.sqrt(np.maximum(ref.var, VAR_FLOOR))
    return {"layer": site.layer.name, "channels": int(ref.var.size), "gain": _spread(gain),
            "mean_shift": _round(np.median(np.abs(measured.mean - ref.mean) / std)),
            "var_ratio": _round(np.median(measured.var / np.maximum(ref.var, VAR_FLOOR)))}


def _round(value) -> float:
    return float(f"{float(value):.6g}")


def _spread(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"min": _round(values.min()), "median": _round(np.median(values)), "max": _round(values.max())}
