"""IDX files (the MNIST format), gzip-compressed or plain."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from asr_onnx.errors import AsrError

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or plain.

    Args:
        path: File path; gzip is detected from the content, not the name.

    Returns:
        The array in native byte order.

    Raises:
        AsrError: Unreadable file, bad magic number or truncated data.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise AsrError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise AsrError(f"{path}: IDX header is truncated")
    shape = tuple(int(dim) for dim in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise AsrError(f"{path}: IDX data has {len(data) - header_end} bytes, header says {expected}")
    array = np.frombuffer(data, dtype, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        # Sniff the gzip magic so a renamed file still reads.
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as exc:
        raise AsrError(f"cannot read {path}: {exc}") from None
