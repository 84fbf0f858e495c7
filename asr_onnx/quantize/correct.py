"""The quantization correction: a quantized model's per-channel output statistics mapped back onto the float
model's, folded into each layer's int32 bias and weight scales, its integer codes kept.

:func:`correct_quantization` measures the quantized model through its QDQ graph (its weights seen in float,
:func:`asr_onnx.model.qdq.dequantize_weights`; every upstream layer renormalised, as a repair measures a pruned
model), corrects each layer as a virtual BN is recalibrated (:func:`asr_onnx.correct.recal.correct`) and
quantizes the result again (:func:`asr_onnx.model.requantize.requantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from asr_onnx.errors import AsrError
from asr_onnx.quantize.calibrate import CORRECTIONS

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")  # a MatMul's shift would need an Add node the QDQ graph lacks
CORRECTION_SAMPLES = 512  # samples the correction measures: its cost is one pass per depth of layers


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


def correction_sample(calib, seed: int):
    """What the correction measures: a seeded CORRECTION_SAMPLES of a calib.CalibSet, in a random order (no
    batch of one class); any other set as it is."""
    return calib.take(CORRECTION_SAMPLES, seed).shuffled(seed) if hasattr(calib, "shuffled") else calib


def correct_quantization(float_model, qdq_model, calib, *, method: str = "bn", batch_size: int = 64,
                         device: str = "auto", threads: int = 0, progress: bool = False,
                         sequential: bool = True) -> tuple[onnx.ModelProto, QuantCorrection]:
    """Maps each quantized layer's per-channel output mean and variance onto the float model's.

    The float model's statistics are measured at every layer output, then the quantized model's through
    its QDQ graph level by level, every corrected layer upstream renormalised to its population statistics
    (:func:`asr_onnx.measure.passes.measure_pruned` with ``sequential``: the repair's exact layer-by-layer
    recalibration, one pass per depth of layers). Each layer's correction (the exact recalibration of a
    virtual BN) is folded into its float weight and bias, and requantizing then keeps the codes, moving
    each channel's factor into its weight scale and the shift into its bias.

    Two cheaper schedules were tried and dropped (benchmarks/RESULTS.md, section 8): one pass with the
    upstream sites renormalised by batch statistics, whose noise is of the size of the quantization damage,
    and correcting every layer at once from one pass (each layer then also undoes the shift that its
    upstream layers' corrections remove, and a second round makes it worse).

    Args:
        float_model: the float model the quantized one was made from (every node named).
        qdq_model: its QDQ model.
        calib: the calibration set.
        method: "none" (returns ``qdq_model``) or "bn". Defaults to "bn".
        batch_size, device, threads, progress: as for :func:`asr_onnx.measure.passes.measure`.
        sequential: False measures in one pass, upstream renormalised by batch statistics (the first
            schedule dropped above, kept for the benchmark). Defaults to True.

    Returns:
        (the corrected QDQ model, a :class:`QuantCorrection`).
    """
    from asr_onnx.measure.passes import SiteMap, measure, measure_pruned, site_levels
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model
    from asr_onnx.model.qdq import dequantize_weights, float_twin
    from asr_onnx.model.requantize import requantize

    if method not in CORRECTIONS:
        raise AsrError(f"unknown quantization correction {method!r}; choose one of {', '.join(CORRECTIONS)}")
    if method == "none":
        return qdq_model, QuantCorrection(method, {})
    fake, tensors = dequantize_weights(qdq_model)
    twin, matched = float_twin(float_model, fake)
    graph = to_graph(fake)
    # a LayerNorm's output is no quantized layer's: it is neither corrected nor measured here
    sites = [s for s in find_sites(graph, find_layers(graph)) if s.ln is None]
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
    report = {s.key: write_correction(graph, s, measured.references[s.key], measured.pruned[s.key])
              for s in corrected}
    graph.cleanup().toposort()
    return requantize(to_model(graph, fake), tensors), QuantCorrection(method, report)


def write_correction(graph, site, ref, stats: list) -> dict:
    """Writes one site's correction (the exact recalibration of a virtual BN from ``ref`` and the quantized
    model's per-batch ``stats``) into ``graph``; returns what the report says of it."""
    from asr_onnx.correct.recal import affine, correct, write
    from asr_onnx.measure.norms import ABS_VAR_FLOOR
    from asr_onnx.measure.stats import merge_all

    fix = correct(site, ref, stats, "bn")
    gain, _ = affine(ref, fix)  # the factor on the layer's output, folded into its weight scales
    write(graph, site, ref, fix)
    measured = merge_all(stats)
    std = np.sqrt(np.maximum(ref.var, ABS_VAR_FLOOR))
    return {"layer": site.layer.name, "channels": int(ref.var.size), "gain": _spread(gain),
            "mean_shift": _round(np.median(np.abs(measured.mean - ref.mean) / std)),
            "var_ratio": _round(np.median(measured.var / np.maximum(ref.var, ABS_VAR_FLOOR)))}


def _round(value) -> float:
    return float(f"{float(value):.6g}")


def _spread(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"min": _round(values.min()), "median": _round(np.median(values)), "max": _round(values.max())}
