"""``inspect``: per-layer weights, sparsity, 2:4 conformance, eligibility and normalisation of any ONNX model."""

from __future__ import annotations

from pathlib import Path

import onnx

from asr_onnx.prune.sparsecore import layer_rows


def inspect_model(model) -> dict:
    """A JSON-ready description of a model (an onnx.ModelProto or a path).

    Returns:
        {"model", "opset", "inputs", "outputs", "layers": sparsecore.layer_rows(...), "totals"}.
        Totals count a weight shared by several layers once. A QDQ model's layers are read through their
        DequantizeLinear weights, their 2:4 conformance on the integer codes (``precision`` "int8").

    Raises:
        AsrError: a path that is not a readable, valid ONNX model.
    """
    from asr_onnx.calib.specs import input_specs
    from asr_onnx.model.files import load_model
    from asr_onnx.model.graph import opset

    source = None
    if not isinstance(model, onnx.ModelProto):
        source = str(Path(model))
        model = load_model(model)
    rows = layer_rows(model)
    unique = [r for r in rows if not r["shared"]]
    params = sum(r["params"] for r in unique)
    zeros = sum(r["zeros"] for r in unique)
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    totals = {
        "layers": len(rows),
        "params": params,
        "zeros": zeros,
        "sparsity": round(zeros / params, 6) if params else 0.0,
        "layers_24": sum(r["nm_24"] == "yes" for r in rows),
        "eligible": sum(r["eligible"] for r in rows),
        "batchnorm_nodes": bn_nodes,
        "batchnorm_after_layer": sum(r["norm"]["kind"] == "BatchNormalization" for r in rows),
        "affine_after_layer": sum(r["norm"]["kind"] == "affine" for r in rows),
    }
    return {
        "model": source,
        "opset": opset(model),
        "inputs": [{"name": s.name, "shape": [d if isinstance(d, int) else str(d) for d in s.shape],
                    "dtype": str(s.dtype)} for s in input_specs(model)],
        "outputs": [o.name for o in model.graph.output],
        "layers": rows,
        "totals": totals,
    }


def _norm_text(norm: dict) -> str:
    if norm["kind"] == "BatchNormalization":
        return "BN" if norm.get("constant_params", True) else "BN (params not constant)"
    if norm["kind"] == "affine":
        return "affine(" + ",".join(norm["ops"]) + ")"
    return "-"


ROW_WIDTH = 100  # a row's columns after the layer's name


def format_inspection(info: dict, width: int = 160) -> str:
    """The human-readable table: one line per layer, then the model total.

    A layer is named by its node name, whole, as the repair summary and the report page name it. The
    name column is at most ``width`` less the other columns wide (24 at least); a longer name has a
    line of its own, its row under it. No line is cut.
    """
    name_w = max([4] + [min(len(r["name"]), max(24, width - ROW_WIDTH)) for r in info["layers"]])
    header = (f"{'layer':<{name_w}} {'op':<13} {'weight shape':<18} {'params':>10} {'zeros':>10} {'sparsity':>8}"
              f" {'2:4':>4} {'sparse TC':>9}  {'after':<14}")
    lines = [f"{info['model'] or 'model'}  opset {info['opset']}", header]
    for r in info["layers"]:
        shape = "x".join(str(d) for d in r["shape"])
        name = r["name"]
        if len(name) > name_w:
            lines.append(name)
            name = ""
        shared = " (shared)" if r["shared"] else ""
        op = f"{r['op']} int8" if r.get("precision") == "int8" else r["op"]
        lines.append(f"{name:<{name_w}} {op:<13} {shape:<18} {r['params']:>10,} {r['zeros']:>10,}"
                     f" {r['sparsity']:>8.3f} {r['nm_24']:>4} {r['eligibility']:>9}  {_norm_text(r['norm']):<14}{shared}")
    t = info["totals"]
    if not info["layers"]:
        lines.append("(no prunable layer: Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    lines.append(f"total: {t['layers']} layers, {t['params']:,} weights, {t['zeros']:,} zeros, sparsity "
                 f"{t['sparsity']:.3f}; 2:4-sparse {t['layers_24']}/{t['layers']}; sparse-TC eligible "
                 f"{t['eligible']}/{t['layers']}; BatchNormalization nodes {t['batchnorm_nodes']}"
                 f" ({t['batchnorm_after_layer']} directly after a layer)")
    notes = [r for r in info["layers"] if r["reasons"]]
    if notes:
        lines.append("eligibility notes:")
        for r in notes:
            word = "not eligible" if not r["eligible"] else "note"
            lines.append(f"  {r['name']}: {word}: {'; '.join(r['reasons'])}")
    return "\n".join(lines)
