"""Calibration files for the calib tests: PNGs, IDX, .npy and .npz written into a temp folder."""

import gzip

import numpy as np
from PIL import Image

from asr_onnx.calib import InputSpec

F32 = np.dtype(np.float32)
GRAY = [InputSpec("input", (None, 1, 6, 5), F32)]  # H=6, W=5: unequal so H/W mix-ups show
RGB_NCHW = [InputSpec("input", (None, 3, 6, 5), F32)]
RGB_NHWC = [InputSpec("input", ("N", 6, 5, 3), F32)]
SCALE = np.float32(1 / 255)
SPEC3 = [InputSpec("x", (None, 3), F32)]


def pixels(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def all_batches(calib, batch_size=64):
    batches = list(calib.batches(batch_size))
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def write_idx(path, array, compress):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(dim).to_bytes(4, "big") for dim in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def npy(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def labelled_npz(tmp_path, count=10):
    """A set whose labels are the sample indices, to track selection."""
    x = np.arange(count, dtype=np.float32).reshape(count, 1).repeat(3, axis=1)
    return npz(tmp_path / "set.npz", x=x, y=np.arange(count))
