"""Tests for asr_onnx.calib.sources: .npy and .npz sources, inputs and labels."""

import numpy as np
import pytest
from calib_files import F32, GRAY, all_batches, npy, npz

from asr_onnx.calib import InputSpec, load_calib
from asr_onnx.errors import AsrError


def test_npy_batch_and_single_sample_files(tmp_path):
    batch = np.random.default_rng(0).normal(size=(3, 1, 6, 5))  # float64: cast to float32
    single = np.random.default_rng(1).normal(size=(1, 6, 5)).astype(np.float32)
    npy(tmp_path / "a.npy", batch)
    npy(tmp_path / "b.npy", single)

    calib = load_calib(tmp_path, GRAY)

    assert len(calib) == 4 and calib.labels is None
    got = all_batches(calib)["input"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.concatenate([batch.astype(np.float32), single[np.newaxis]]))


def test_npy_consecutive_samples_are_read_without_a_copy(tmp_path):
    """A batch of consecutive samples of a model-ready .npy is a view of the memory map, as a plain
    inference loop would slice it; a scattered subset is gathered into a new array."""
    data = np.random.default_rng(3).normal(size=(10, 1, 6, 5)).astype(np.float32)
    path = npy(tmp_path / "calib.npy", data)
    calib = load_calib(path, GRAY)
    first = next(calib.batches(4))["input"]
    assert not first.flags["OWNDATA"] and not first.flags["WRITEABLE"]  # the read-only memory map itself
    np.testing.assert_array_equal(first, data[:4])
    subset = calib.take(3, seed=1)
    np.testing.assert_array_equal(next(subset.batches(3))["input"], data[np.sort(subset._indices)])


def test_npy_single_file_path_and_dynamic_dims_are_free(tmp_path):
    data = np.arange(2 * 7 * 4, dtype=np.float32).reshape(2, 7, 4)
    path = npy(tmp_path / "calib.npy", data)

    calib = load_calib(path, [InputSpec("input", (None, "seq", 4), F32)])

    np.testing.assert_array_equal(all_batches(calib)["input"], data)


def test_npz_x_and_y(tmp_path):
    x = np.random.default_rng(2).normal(size=(5, 1, 6, 5)).astype(np.float32)
    path = npz(tmp_path / "set.npz", x=x, y=np.array([3, 1, 4, 1, 5]))

    calib = load_calib(path, GRAY)

    np.testing.assert_array_equal(calib.labels, [3, 1, 4, 1, 5])
    assert calib.labels.dtype == np.int64
    np.testing.assert_array_equal(all_batches(calib)["input"], x)


@pytest.mark.parametrize("key", ["input", "arr_0"])
def test_npz_input_name_or_only_array(tmp_path, key):
    x = np.ones((2, 1, 6, 5), np.float32) * 7
    path = npz(tmp_path / "set.npz", **{key: x})

    np.testing.assert_array_equal(all_batches(load_calib(path, GRAY))["input"], x)


def test_npz_with_ambiguous_arrays(tmp_path):
    path = npz(tmp_path / "set.npz", a=np.zeros((1, 1, 6, 5)), b=np.zeros((1, 1, 6, 5)))

    with pytest.raises(AsrError, match=r"cannot tell which array is the input.*has: a, b"):
        load_calib(path, GRAY)


def test_multi_input_npz(tmp_path):
    specs = [InputSpec("a", (None, 3), F32), InputSpec("b", (None, 2), np.int64)]
    a1, b1 = np.arange(6.0).reshape(2, 3), np.arange(4, dtype=np.int32).reshape(2, 2)
    a2, b2 = np.full((3,), 9.0), np.array([7, 8])  # a single sample
    npz(tmp_path / "1.npz", a=a1, b=b1, y=np.array([0, 1]))
    npz(tmp_path / "2.npz", a=a2, b=b2, y=np.array(2))

    calib = load_calib(tmp_path, specs)

    got = all_batches(calib, batch_size=2)
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
    np.testing.assert_array_equal(got["a"], np.vstack([a1, a2]))
    np.testing.assert_array_equal(got["b"], np.vstack([b1, b2]))
    np.testing.assert_array_equal(calib.labels, [0, 1, 2])


def test_multi_input_npz_missing_input_and_count_mismatch(tmp_path):
    specs = [InputSpec("a", (None, 3), F32), InputSpec("b", (None, 2), F32)]
    missing = npz(tmp_path / "m" / "1.npz", a=np.zeros((2, 3)))
    uneven = npz(tmp_path / "u" / "1.npz", a=np.zeros((2, 3)), b=np.zeros((3, 2)))

    with pytest.raises(AsrError, match=r"1\.npz lacks model input 'b' \(has: a\)"):
        load_calib(missing, specs)
    with pytest.raises(AsrError, match=r"different sample counts \(a: 2, b: 3\)"):
        load_calib(uneven, specs)


def test_npy_needs_single_input_model(tmp_path):
    path = npy(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    specs = [InputSpec("a", (None, 3), F32), InputSpec("b", (None, 3), F32)]

    with pytest.raises(AsrError, match=r"\.npy files need a single-input model"):
        load_calib(path, specs)


def test_npz_labels_must_match_sample_count(tmp_path):
    path = npz(tmp_path / "a.npz", x=np.zeros((3, 1, 6, 5)), y=np.array([1, 2]))

    with pytest.raises(AsrError, match=r"labels 'y' have shape \(2,\) but the file has 3 sample"):
        load_calib(path, GRAY)


def test_npz_labels_in_some_files_only(tmp_path):
    npz(tmp_path / "a.npz", x=np.zeros((1, 1, 6, 5)), y=np.array([1]))
    npz(tmp_path / "b.npz", x=np.zeros((1, 1, 6, 5)))

    with pytest.raises(AsrError, match=r"some \.npz files have labels 'y' and some do not"):
        load_calib(tmp_path, GRAY)


def test_garbage_npy_is_unreadable(tmp_path):
    path = tmp_path / "calib.npy"
    path.write_bytes(b"this is not numpy")

    with pytest.raises(AsrError, match=r"cannot read array file .*calib\.npy"):
        load_calib(path, GRAY)
