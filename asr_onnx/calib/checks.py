"""Checks of model-ready arrays against an input spec: dtype, sample shape, count, finiteness."""

from __future__ import annotations

import numpy as np

from asr_onnx.calib.specs import InputSpec, is_static
from asr_onnx.errors import AsrError

_FINITE_CHUNK_ROWS = 256


def check_dtype(origin: str, dtype: np.dtype, spec: InputSpec):
    """Floats feed float inputs, integers feed integer inputs; anything else is refused."""
    wanted = spec.dtype.kind
    accepted = {"f": "f", "i": "iu", "u": "iu", "b": "b"}.get(wanted)
    ok = dtype.kind in accepted if accepted else dtype == spec.dtype
    if not ok:
        raise AsrError(f"{origin}: array dtype {dtype} cannot feed model input '{spec.name}' ({spec.dtype})")


def check_sample_shape(origin: str, sample_shape: tuple, shown_shape: tuple, spec: InputSpec):
    expected = spec.shape[1:]
    matches = len(sample_shape) == len(expected) and all(
        not is_static(dim) or dim == got for dim, got in zip(expected, sample_shape)
    )
    if not matches:
        raise AsrError(
            f"{origin}: sample shape {tuple(shown_shape)} does not match model input '{spec.name}' {spec.describe()}"
        )


def sample_count(origin: str, array: np.ndarray, spec: InputSpec) -> tuple[int, bool]:
    """Validate one array against ``spec``; return (samples, is_single_sample)."""
    check_dtype(origin, array.dtype, spec)
    if array.ndim == len(spec.shape):
        check_sample_shape(origin, array.shape[1:], array.shape[1:], spec)
        count, single = array.shape[0], False
    elif array.ndim == len(spec.shape) - 1:
        check_sample_shape(origin, array.shape, array.shape, spec)
        count, single = 1, True
    else:
        raise AsrError(
            f"{origin}: array shape {array.shape} does not match model input '{spec.name}' {spec.describe()}"
        )
    _check_finite(origin, array)
    return count, single


def _check_finite(origin: str, array: np.ndarray):
    if array.dtype.kind not in "fc":
        return
    flat = array.reshape(1, -1) if array.ndim == 0 else array
    # Chunked so a memory-mapped file is scanned without a full-size boolean copy.
    for start in range(0, max(len(flat), 1), _FINITE_CHUNK_ROWS):
        if not np.isfinite(flat[start : start + _FINITE_CHUNK_ROWS]).all():
            raise AsrError(f"{origin}: array contains NaN or Inf")
