"""Saved dense statistics, keyed by the model's bytes, the data and the preprocessing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import ChannelStats


def stats_key(model, calib) -> str:
    """sha256 over the model's serialized bytes and the calibration set's fingerprint."""
    hasher = hashlib.sha256(model.SerializeToString(deterministic=True))
    hasher.update(calib.fingerprint().encode())
    return hasher.hexdigest()


def save_stats(path, stats: dict[str, ChannelStats], key: str) -> Path:
    """Writes per-site statistics to an .npz (atomically), with the key that makes them valid."""
    from asr_onnx.outputs import write_file

    path = Path(path)
    arrays = {"__meta__": np.array(json.dumps({"key": key, "sites": list(stats)}))}
    for i, entry in enumerate(stats.values()):
        arrays[f"{i}.count"] = np.array(entry.count)
        arrays[f"{i}.mean"], arrays[f"{i}.m2"] = entry.mean, entry.m2
    return write_file(path, lambda handle: np.savez(handle, **arrays))


def load_stats(path, key: str) -> dict[str, ChannelStats]:
    """Reads statistics saved by :func:`save_stats`, and checks every entry.

    Raises:
        AsrError: the file is unreadable, was made for another model, data set or preprocessing, or an
            entry is malformed: a count that is not a positive number, a mean and sum of squares that are
            not two float vectors of one length, NaN or Inf, or a negative sum of squares.
    """
    from asr_onnx.filekinds import check_input

    check_input(path, "the statistics file")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta["key"] != key:
                raise AsrError(f"{path} holds statistics of another model, data set or preprocessing; "
                               "recompute them with `asr-onnx stats`")
            arrays = {site: tuple(data[f"{i}.{name}"] for name in ("count", "mean", "m2"))
                      for i, site in enumerate(meta["sites"])}
    except AsrError:
        raise
    except Exception as e:
        raise AsrError(f"cannot read statistics from {path}: {e}") from None
    return {site: _checked(path, site, *entry) for site, entry in arrays.items()}


def _checked(path, site: str, count, mean, m2) -> ChannelStats:
    def bad(why: str) -> AsrError:
        return AsrError(f"{path}: the statistics of {site!r} are malformed ({why}); recompute them with `asr-onnx stats`")

    if count.shape != () or count.dtype.kind not in "fiu" or not np.isfinite(count) or count < 1:
        raise bad(f"count {count!r}")
    if mean.ndim != 1 or m2.shape != mean.shape or mean.size == 0 or mean.dtype.kind != "f" or m2.dtype.kind != "f":
        raise bad(f"mean {mean.shape} and m2 {m2.shape} must be float vectors of one length")
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
        raise bad("NaN or Inf")
    if (m2 < 0).any():
        raise bad("a negative sum of squares")
    return ChannelStats(float(count), mean.astype(np.float64), m2.astype(np.float64))
