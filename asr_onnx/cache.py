"""Saved dense statistics, keyed by the model's bytes, the data and the preprocessing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import AsrError
from .stats import ChannelStats


def stats_key(model, calib) -> str:
    """sha256 over the model's serialized bytes and the calibration set's fingerprint."""
    hasher = hashlib.sha256(model.SerializeToString(deterministic=True))
    hasher.update(calib.fingerprint().encode())
    return hasher.hexdigest()


def save_stats(path, stats: dict[str, ChannelStats], key: str) -> Path:
    """Writes per-site statistics to an .npz (atomically), with the key that makes them valid."""
    from .outputs import write_file

    path = Path(path)
    arrays = {"__meta__": np.array(json.dumps({"key": key, "sites": list(stats)}))}
    for i, entry in enumerate(stats.values()):
        arrays[f"{i}.count"] = np.array(entry.count)
        arrays[f"{i}.mean"], arrays[f"{i}.m2"] = entry.mean, entry.m2
    return write_file(path, lambda handle: np.savez(handle, **arrays))


def load_stats(path, key: str) -> dict[str, ChannelStats]:
    """Reads statistics saved by :func:`save_stats`.

    Raises:
        AsrError: the file is unreadable, or was made for another model, data set or preprocessing.
    """
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta["key"] != key:
                raise AsrError(f"{path} holds statistics of another model, data set or preprocessing; "
                               "recompute them with `asr-onnx stats`")
            return {site: ChannelStats(float(data[f"{i}.count"]), data[f"{i}.mean"], data[f"{i}.m2"])
                    for i, site in enumerate(meta["sites"])}
    except AsrError:
        raise
    except Exception as e:
        raise AsrError(f"cannot read statistics from {path}: {e}") from None
