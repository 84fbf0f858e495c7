"""Tests for asr_onnx.calib.checks: array shapes, ranks, dtypes and non-finite values."""

import numpy as np
import pytest
from calib_files import F32, all_batches, npy, npz

from asr_onnx.calib import InputSpec, load_calib
from asr_onnx.errors import AsrError


def test_array_sample_shape_mismatch(tmp_path):
    path = npy(tmp_path / "calib.npy", np.zeros((2, 3, 32, 32), np.float32))
    spec = [InputSpec("input", (None, 1, 28, 28), F32)]

    with pytest.raises(
        AsrError, match=r"calib\.npy: sample shape \(3, 32, 32\) does not match model input 'input' \(N, 1, 28, 28\)"
    ):
        load_calib(path, spec)


def test_array_rank_mismatch(tmp_path):
    path = npy(tmp_path / "calib.npy", np.zeros((28, 28), np.float32))

    with pytest.raises(AsrError, match=r"calib\.npy: array shape \(28, 28\) does not match model input"):
        load_calib(path, [InputSpec("input", (None, 1, 28, 28), F32)])


@pytest.mark.parametrize(
    ("array", "spec_dtype"),
    [
        (np.array([["a", "b", "c"]]), F32),
        (np.ones((1, 3), bool), F32),
        (np.ones((1, 3), np.complex64), F32),
        (np.ones((1, 3), np.int64), F32),
        (np.ones((1, 3), np.float32), np.dtype(np.int64)),
    ],
    ids=["str", "bool", "complex", "int-for-float", "float-for-int"],
)
def test_array_dtype_refused(tmp_path, array, spec_dtype):
    path = npy(tmp_path / "calib.npy", array)

    with pytest.raises(AsrError, match=r"calib\.npy: array dtype .* cannot feed model input 'x'"):
        load_calib(path, [InputSpec("x", (None, 3), spec_dtype)])


def test_object_array_refused(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.array([[1, "a", None]], dtype=object), allow_pickle=True)

    with pytest.raises(AsrError, match=r"calib\.npy"):
        load_calib(path, [InputSpec("x", (None, 3), F32)])


def test_integer_arrays_feed_integer_inputs(tmp_path):
    data = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    path = npy(tmp_path / "ids.npy", data)

    got = all_batches(load_calib(path, [InputSpec("ids", (None, 3), np.int64)]))["ids"]

    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_refused(tmp_path, bad):
    data = np.zeros((300, 3), np.float32)  # more rows than one check chunk
    data[299, 1] = bad
    npy(tmp_path / "good.npy", np.zeros((1, 3), np.float32))
    npy(tmp_path / "bad.npy", data)

    with pytest.raises(AsrError, match=r"bad\.npy: array contains NaN or Inf"):
        load_calib(tmp_path, [InputSpec("x", (None, 3), F32)])


def test_non_finite_npz_refused(tmp_path):
    path = npz(tmp_path / "a.npz", x=np.array([[1.0, np.nan]]))

    with pytest.raises(AsrError, match=r"a\.npz: array contains NaN or Inf"):
        load_calib(path, [InputSpec("x", (None, 2), F32)])
