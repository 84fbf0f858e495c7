"""Calibration and evaluation data: image folders, .npy/.npz arrays and IDX files.

``load_calib`` validates a source once, up front, and returns a ``CalibSet`` that streams
model-ready batches without holding the whole set in memory.
"""

from .calibset import CalibSet, load_calib
from .discovery import ARRAY_SUFFIXES, IMAGE_SUFFIXES
from .idx import read_idx
from .images import infer_layout
from .named import NAMED_DATA, resolve_data
from .specs import METADATA_KEY, InputSpec, Preprocess, fixed_batch, input_specs, metadata

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
