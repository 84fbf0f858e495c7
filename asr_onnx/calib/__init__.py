"""Calibration and evaluation data: image folders, .npy/.npz arrays and IDX files.

``load_calib`` validates a source once, up front, and returns a ``CalibSet`` that streams
model-ready batches without holding the whole set in memory.
"""

from asr_onnx.calib.calibset import CalibSet, load_calib
from asr_onnx.calib.discovery import ARRAY_SUFFIXES, IMAGE_SUFFIXES
from asr_onnx.calib.idx import read_idx
from asr_onnx.calib.images import infer_layout
from asr_onnx.calib.named import NAMED_DATA, resolve_data
from asr_onnx.calib.specs import METADATA_KEY, InputSpec, Preprocess, fixed_batch, input_specs, metadata

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "METADATA_KEY",
    "NAMED_DATA",
    "CalibSet",
    "InputSpec",
    "Preprocess",
    "fixed_batch",
    "infer_layout",
    "input_specs",
    "load_calib",
    "metadata",
    "read_idx",
    "resolve_data",
]
