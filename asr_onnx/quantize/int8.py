"""INT8 output: the repaired model quantized to QDQ form by onnxruntime's own static quantizer.

Weights are int8, one symmetric scale per output channel, so 0 is exactly code 0 and every pruned weight
stays zero (checked, with TensorRT's 2:4 pattern, on the integer codes before anything is returned).
Activations are calibrated on the calibration set the repair used, for the target the model will run on
(:mod:`asr_onnx.quantize.calibrate`). The calibration method and, for the CPU, the weight range are chosen
on held-out calibration data, and so is the quantization correction (:mod:`asr_onnx.quantize.correct`)
against plain post-training quantization (:mod:`asr_onnx.quantize.choose`); the winner is then made with the
whole set.
"""

from __future__ import annotations

import numpy as np
import onnx

from asr_onnx.errors import AsrError, first_line
from asr_onnx.quantize.calibrate import CALIB_BATCH, check_options, prepare, quantize
from asr_onnx.quantize.choose import CORRECTION_RULE, choose_float_layers, choose_recipe, correction_verdict, score
from asr_onnx.quantize.correct import correct_quantization, correction_sample
from asr_onnx.quantize.layers import check_rows, layer_error_rows, layer_rows

ERROR_SAMPLES = 256  # calibration samples the final output and per-layer errors are measured on
RUNTIMES = {"cpu": "onnxruntime on the CPU (QDQ: integer kernels)",
            "tensorrt": "TensorRT (explicit quantization: trtexec --int8)"}


def to_int8(model: onnx.ModelProto, calib, *, target: str = "cpu", calibration: str = "auto",
            correction: str = "auto", seed: int = 0, batch_size: int = CALIB_BATCH, device: str = "cpu",
            threads: int = 0, progress: bool = False, keep: list | None = None,
            float_layers: str = "auto") -> tuple[onnx.ModelProto, dict]:
    """Quantizes a float model to QDQ (see the module docstring), checked before it is returned; a model whose
    weights are quantized already is refused.

    Args:
        model: the float model (the repair's output); it is not modified.
        calib: the calibration set (needs ``folds`` for the held-out choices).
        target: "cpu" or "tensorrt". Defaults to "cpu".
        calibration: "auto" or one of CALIBRATIONS. Defaults to "auto".
        correction: "auto", "none" or "bn". Defaults to "auto".
        seed: the held-out split's seed. Defaults to 0.
        batch_size: samples per calibration and statistics run. Defaults to 64.
        device: where the calibration and the scores run. Defaults to "cpu" (the scores are of the CPU's kernels).
        threads: onnxruntime intra-op threads for the statistics. Defaults to 0.
        progress: progress bars. Defaults to False.
        keep: a list to append the plain post-training quantized model to, beside the one returned (for a
            benchmark of the correction). Defaults to None.
        float_layers: "auto" (leave the layers in float that are better so on held-out samples) or "none" (every
            layer int8: the choice depends on the CPU's int8 kernels, and a model built for another runtime or a
            reproducible build may want none). Defaults to "auto".

    Returns:
        (the QDQ model, the report's ``quantization`` entry).

    Raises:
        AsrError: an unknown option, a model that is quantized already, a calibration set that cannot be cut
            in two, a zero or a 2:4 pattern lost in the integer weights, an output that is not finite, or the
            quantizer's failure.
    """
    from asr_onnx.model.qdq import quantized_tensors

    if quantized_tensors(model):
        raise AsrError("int8: the model is quantized already (QDQ weights); its repair keeps them int8 without --int8")
    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.check import check_output
    from asr_onnx.model.qdq import quantized_tensors

    check_options(target, calibration, correction)
    if float_layers not in ("auto", "none"):
        raise AsrError(f"int8: float_layers must be auto or none, got {float_layers!r}")
    if quantized_tensors(model):
        raise AsrError("int8: the model is quantized already (QDQ weights); its repair keeps them int8 without --int8")
    if not hasattr(calib, "folds"):
        raise AsrError("int8 needs a calibration set that can be cut into folds (its choices are held out)")
    base = prepare(model)
    batch_size = fixed_batch(input_specs(base)) or min(batch_size, len(calib))
    options = dict(batch_size=batch_size, device=device, threads=threads, progress=progress)
    fit, held = calib.folds(2, seed)[0]
    recipe, fit_model, calibration_rows, fit_scored = choose_recipe(base, fit, held, target=target,
                                                                    calibration=calibration, batch_size=batch_size,
                                                                    device=device)
    float_entry: dict = {"picked": [], "candidates": [], "rule": "none: every layer int8, as asked"}
    if float_layers == "auto":
        recipe, fit_model, float_entry = choose_float_layers(base, fit, held, recipe, fit_model, fit_scored,
                                                             batch_size=batch_size, device=device)
    correction_rows, verdict, picked_correction = None, None, correction
    if correction == "auto":
        fitted = correct_quantization(base, fit_model, correction_sample(fit, seed), method="bn", **options)[0]
        verdict, keep_it, correction_rows = correction_verdict(score([fit_model, fitted], base, held, target=target,
                                                                     device=device))
        picked_correction = "bn" if keep_it else "none"
    plain = quantize(base, calib, recipe, batch_size=batch_size, device=device)
    if keep is not None:
        keep.append(plain)
    corrected, fix = correct_quantization(base, plain, correction_sample(calib, seed), method=picked_correction,
                                          **options)
    rows = layer_rows(base, corrected)
    check_rows(rows)
    try:
        onnx.checker.check_model(corrected, full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker's errors are many kinds: one line
        raise AsrError(f"int8: the quantized model fails onnx.checker: {first_line(e)}") from None
    check_output(corrected)
    sample = calib.take(ERROR_SAMPLES, seed) if hasattr(calib, "take") else calib
    final = score([plain, corrected] if corrected is not plain else [plain], base, sample, target=target,
                  device=device)
    for name, result in zip(("ptq", "corrected"), final):
        if not np.isfinite(result["err2"]).all():
            raise AsrError(f"int8: the quantized model's output ({name}) is not finite on calibration data")
    errors = layer_error_rows(base, plain, corrected, sample, device=device, batch_size=batch_size)
    for row in rows:
        row.update(errors.get(row["name"], {}))
    entry = {
        "format": "QDQ",
        "target": target,
        "runtime": RUNTIMES[target],
        "weights": {"type": "int8", "scales": "per output channel", "symmetric": True,
                    "range": 63 if recipe.weights == "reduced" else 127},
        "activations": {"type": "int8" if target == "tensorrt" else "uint8", "scales": "per tensor",
                        "symmetric": target == "tensorrt"},
        "calibration": {"picked": recipe.as_dict(), "fit": len(fit), "held_out": len(held),
                        "candidates": calibration_rows},
        "float_layers": float_entry,
        "correction": {"picked": picked_correction, "candidates": correction_rows, "verdict": verdict,
                       "rule": CORRECTION_RULE if verdict else None, "sites": fix.sites},
        "output": {"samples": final[0]["samples"], "ptq": _summary(final[0]),
                   "corrected": _summary(final[1]) if len(final) > 1 else None},
        "layers": rows,
    }
    return corrected, entry


def _summary(result: dict) -> dict:
    return {"agreement": result["agreement"], "logit_rel_l2": float(f"{result['logit_rel_l2']:.6g}")}
