"""INT8 output: onnxruntime's static quantizer on a repaired model, the held-out choices, the quantization
correction, and the per-layer checks on the integer codes.

Placed after verify (its choices are scored as verify scores a model, by the paired rules of
:mod:`asr_onnx.verify.paired`) and before report (which renders its entry); its correction measures and
corrects through measure/ and correct/ as a repair does.
"""

from asr_onnx.quantize.calibrate import CALIBRATIONS, TARGETS, QuantRecipe, prepare, quantize
from asr_onnx.quantize.correct import QuantCorrection, correct_quantization, correction_sample, write_correction
from asr_onnx.quantize.int8 import to_int8
from asr_onnx.quantize.layers import check_rows, layer_rows

__all__ = [
    "CALIBRATIONS",
    "TARGETS",
    "QuantCorrection",
    "QuantRecipe",
    "check_rows",
    "correct_quantization",
    "correction_sample",
    "layer_rows",
    "prepare",
    "quantize",
    "to_int8",
    "write_correction",
]
