"""2:4 structured sparsity for TensorRT: conformance of weights and per-layer eligibility.

The 2:4 axis is the one TensorRT and Polygraphy (``polygraphy inspect sparsity``) check: for a
Conv weight ``(K, C/groups, kh, kw)`` the groups of 4 run along axis 1 (input channels) at each
``(k, kh, kw)``; for Gemm and MatMul along the reduction axis of the weight (Gemm ``transB=1``:
axis 1, else axis 0; MatMul: axis 0 of a 2-D weight).

Eligibility is structural: whether TensorRT can run the layer on sparse tensor cores at all
(hard reasons make a layer ineligible) and whether it is likely to (advisory notes: ASP's
alignment rule, small layers). Whether the weights actually are 2:4 sparse is reported separately.
"""

from __future__ import annotations

import re

import numpy as np

#: TensorRT rarely picks a sparse tactic below this many channels (input or output).
SMALL_CHANNELS = 256


def conforms_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Whether every run of ``m`` consecutive entries along ``axis`` has at most ``n`` nonzeros.

    Raises:
        ValueError: the axis length is not a multiple of ``m``.
    """
    weight = np.asarray(weight)
    axis = axis % weight.ndim
    if weight.shape[axis] % m:
        raise ValueError(f"axis {axis} has length {weight.shape[axis]}, not a multiple of {m}")
    moved = np.moveaxis(weight != 0, axis, -1)
    groups = moved.reshape(-1, m)
    return bool(np.all(groups.sum(axis=1) <= n))


def reduction_axis(layer) -> int | None:
    """The weight axis that TensorRT's 2:4 pattern runs along, or None when there is none."""
    rank = len(layer.weight.shape)
    if layer.op == "Conv":
        return 1
    if layer.op == "Gemm":
        return layer.in_axis
    if layer.op == "MatMul" and rank == 2:
        return 0
    return None


def conformance(layer) -> str:
    """"yes" or "no" for 2:4 along the layer's reduction axis, "n.a." when it has none or it is not a multiple of 4."""
    axis = reduction_axis(layer)
    if axis is None or layer.weight.shape[axis] % 4:
        return "n.a."
    return "yes" if conforms_nm(layer.weight.values, 2, 4, axis) else "no"


def eligibility(layer) -> tuple[bool, list[str]]:
    """Whether TensorRT can use sparse tensor cores for ``layer``, and why (not).

    Returns:
        (eligible, reasons). When not eligible, ``reasons`` are the hard reasons. When eligible,
        ``reasons`` are advisory notes (empty when nothing speaks against it):

        - hard: not a Conv/Gemm/MatMul (TensorRT has no sparse deconvolution), depthwise conv,
          grouped conv, a batched (rank > 2) MatMul weight, reduction channels C not a multiple of 4.
        - advisory: K % 8 != 0 or C % 16 != 0 (NVIDIA's ASP skips such layers), fewer than 256
          channels (TensorRT rarely picks a sparse tactic for small layers).
    """
    shape = tuple(layer.weight.shape)
    hard = []
    axis = reduction_axis(layer)
    if layer.op == "ConvTranspose":
        hard.append("ConvTranspose: TensorRT uses 2:4 sparsity only for Conv and MatMul/Gemm")
    elif layer.op == "MatMul" and axis is None:
        hard.append(f"batched MatMul weight {list(shape)}: TensorRT's 2:4 check needs a 2-D weight")
    elif layer.depthwise:
        hard.append("depthwise conv")
    elif layer.op == "Conv" and layer.groups > 1:
        hard.append(f"grouped conv (group={layer.groups})")
    if hard:
        return False, hard
    c = shape[axis]
    k = shape[layer.out_axis]
    if c % 4:
        return False, [f"input channels C={c} not a multiple of 4"]
    notes = []
    if k % 8 or c % 16:
        notes.append(f"K % 8 != 0 or C % 16 != 0 (K={k}, C={c}): ASP skips such layers")
    if min(k, c) < SMALL_CHANNELS:
        notes.append(f"fewer than {SMALL_CHANNELS} channels (K={k}, C={c}): TensorRT rarely picks a sparse tactic")
    return True, notes


def _affine_chain(layer) -> list[str]:
    """The ops of the per-channel Mul/Add/Sub/Div chain that alone consumes the layer's output."""
    import onnx_graphsurgeon as gs

    ops, tensor = [], layer.output
    while len(tensor.outputs) == 1 and len(ops) < 8:
        node = tensor.outputs[0]
        if node.op not in ("Mul", "Add", "Sub", "Div"):
            break
        const = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if len(const) != 1 or const[0].values.size not in (1, layer.channels) or not node.outputs:
            break
        ops.append(node.op)
        tensor = node.outputs[0]
    return ops


def _norm_after(layer, bn_of: dict) -> dict:
    """What normalises the layer's output: its BatchNormalization, a per-channel Mul/Add chain, or nothing.

    ``constant_params`` is False for a BN that alone follows the layer but whose parameters are not
    plain constants (an Identity of an initializer, say): repair treats such a BN as an ordinary op.
    """
    bn = bn_of.get(id(layer.node))
    consumers = layer.output.outputs
    if bn is None and len(consumers) == 1 and consumers[0].op == "BatchNormalization":
        bn = consumers[0]
        constant = False
    else:
        constant = True
    if bn is not None:
        return {"kind": "BatchNormalization", "node": bn.name or bn.outputs[0].name, "ops": ["BatchNormalization"],
                "constant_params": constant}
    chain = _affine_chain(layer)
    if chain:
        return {"kind": "affine", "node": None, "ops": chain}
    return {"kind": "none", "node": None, "ops": []}


def layer_rows(model) -> list[dict]:
    """One JSON-ready row per prunable layer of an onnx.ModelProto (or an onnx-graphsurgeon graph).

    Each row: name, op, weight, shape, params, zeros, sparsity, shared (the weight was counted at an
    earlier layer), nm_24 ("yes"/"no"/"n.a."), axis_24, eligible, eligibility ("yes": eligible with
    nothing against it, "maybe": eligible with advisory notes, "no"), reasons, norm (kind
    "BatchNormalization"/"affine"/"none", node, ops). A QDQ model's layers are read through their
    DequantizeLinear weights (:func:`asr_onnx.model.qdq.dequantize_weights`): each row then has
    ``precision`` ("int8" where the weight is quantized, else "float") and 2:4 read on the integer codes.
    """
    import onnx

    from asr_onnx.model.graph import find_layers, find_sites, to_graph
    from asr_onnx.model.qdq import dequantize_weights

    tensors: dict = {}
    if isinstance(model, onnx.ModelProto):
        model, tensors = dequantize_weights(model)
    graph = to_graph(model) if isinstance(model, onnx.ModelProto) else model
    layers = find_layers(graph)
    bn_of = {id(site.layer.node): site.bn for site in find_sites(graph, layers)
             if site.bn is not None and site.layer is not None}
    seen, rows = set(), []
    for layer in layers:
        values = np.asarray(layer.weight.values)
        eligible, reasons = eligibility(layer)
        zeros = int(values.size - np.count_nonzero(values))
        rows.append({
            "name": layer.name,
            "op": layer.op,
            "weight": layer.weight.name,
            "shape": [int(d) for d in values.shape],
            "params": int(values.size),
            "zeros": zeros,
            "sparsity": round(zeros / values.size, 6) if values.size else 0.0,
            "shared": layer.weight.name in seen,
            "nm_24": conformance(layer),
            "axis_24": reduction_axis(layer),
            "eligible": eligible,
            "eligibility": "no" if not eligible else ("maybe" if reasons else "yes"),
            "reasons": reasons,
            "norm": _norm_after(layer, bn_of),
        })
        seen.add(layer.weight.name)
    return _on_codes(rows, tensors) if tensors else rows


def _on_codes(rows: list[dict], tensors: dict) -> list[dict]:
    """The rows of a QDQ model's float form with ``precision`` and 2:4 conformance read on the integer codes."""
    for row in rows:
        tensor = tensors.get(row["weight"])
        row["precision"] = "int8" if tensor is not None else "float"
        if tensor is not None and row["nm_24"] != "n.a.":
            row["nm_24"] = "yes" if conforms_nm(tensor.signed(), 2, 4, row["axis_24"]) else "no"
    return rows


def eligibility_summary(rows: list[dict], limit: int = 5) -> list[str]:
    """A few lines for a terminal summary: counts, the advisory notes grouped by kind, the ineligible layers."""
    if not rows:
        return ["sparse tensor cores: no prunable layers"]
    counts = {v: sum(r["eligibility"] == v for r in rows) for v in ("yes", "maybe", "no")}
    conform = sum(r["nm_24"] == "yes" for r in rows)
    lines = [f"sparse tensor cores: {counts['yes']} eligible, {counts['maybe']} eligible with notes, "
             f"{counts['no']} not eligible; {conform}/{len(rows)} layers 2:4-sparse"]
    kinds = {}
    for row in rows:
        if row["eligible"]:
            for reason in row["reasons"]:
                kind = re.sub(r" \([^)]*\)", "", reason)  # without this layer's K and C
                kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in kinds.items():
        lines.append(f"  note: {count} layer(s): {kind}")
    ineligible = [r for r in rows if not r["eligible"]]
    for row in ineligible[:limit]:
        lines.append(f"  not eligible: {row['name']}: {'; '.join(row['reasons'])}")
    if len(ineligible) > limit:
        lines.append(f"  ... {len(ineligible) - limit} more not eligible (see the JSON report)")
    return lines
