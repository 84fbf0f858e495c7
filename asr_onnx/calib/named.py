"""Named data sets: ``fashion-mnist:test`` and ``fashion-mnist:train`` are Debian's Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

from asr_onnx.errors import AsrError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NAMED_DATA = {
    "fashion-mnist:test": FASHION_MNIST / "t10k-images-idx3-ubyte.gz",
    "fashion-mnist:train": FASHION_MNIST / "train-images-idx3-ubyte.gz",
}


def resolve_data(path) -> Path:
    """A data path, where ``fashion-mnist:test`` and ``fashion-mnist:train`` name Debian's IDX files.

    Raises:
        AsrError: a named data set is not installed.
    """
    text = str(path)
    if text not in NAMED_DATA:
        return Path(path)
    resolved = NAMED_DATA[text]
    if not resolved.exists():
        raise AsrError(f"{text} needs Debian's Fashion-MNIST files: apt-get install -y dataset-fashion-mnist "
                       f"(expected {resolved})")
    return resolved
