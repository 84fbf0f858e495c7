"""Tests for asr_onnx.calib.idx: IDX files, read directly and as a calibration source."""

import numpy as np
import pytest
from calib_files import F32, GRAY, SCALE, all_batches, pixels, write_idx

from asr_onnx.calib import InputSpec, Preprocess, load_calib, read_idx
from asr_onnx.errors import AsrError


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_read_idx(tmp_path, compress):
    data = pixels(30, (4, 6, 5))
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")

    got = read_idx(write_idx(tmp_path / name, data, compress))

    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, data)


def test_read_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x08\x00\x08\x01" + b"\x00" * 8)
    short = write_idx(tmp_path / "y-images-idx3-ubyte", pixels(31, (2, 3, 3)), False)
    short.write_bytes(short.read_bytes()[:-1])

    with pytest.raises(AsrError, match=r"x-images-idx3-ubyte is not an IDX file \(bad magic number\)"):
        read_idx(bad)
    with pytest.raises(AsrError, match=r"IDX data has 17 bytes, header says 18"):
        read_idx(short)


def test_idx_folder_with_labels_goes_through_preprocessing(tmp_path):
    images = pixels(32, (5, 6, 5))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7, 6, 5], np.uint8), True)
    pre = Preprocess(mean=(0.286,), std=(0.353,))

    calib = load_calib(tmp_path, GRAY, pre)

    np.testing.assert_array_equal(calib.labels, [9, 8, 7, 6, 5])
    expected = (images.astype(np.float32) * SCALE - np.float32(0.286)) / np.float32(0.353)
    np.testing.assert_array_equal(all_batches(calib, 2)["input"], expected[:, np.newaxis])


def test_idx_images_file_path_without_labels(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", pixels(33, (3, 6, 5)), False)

    calib = load_calib(path, GRAY)

    assert len(calib) == 3 and calib.labels is None


def test_idx_labels_file_path_is_refused(tmp_path):
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8), False)

    with pytest.raises(AsrError, match=r"t10k-labels-idx1-ubyte is an IDX labels file; pass the images file"):
        load_calib(path, GRAY)


def test_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels(34, (3, 6, 5)), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8), False)

    with pytest.raises(AsrError, match=r"2 labels for 3 images"):
        load_calib(tmp_path, GRAY)


def test_idx_size_mismatch_and_resize(tmp_path):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels(35, (2, 28, 28)), False)
    spec = [InputSpec("input", (None, 1, 24, 24), F32)]

    with pytest.raises(AsrError, match=r"is 28x28 but the model expects 24x24; pass --size, --resize"):
        load_calib(path, spec)
    assert all_batches(load_calib(path, spec, Preprocess(resize=24)))["input"].shape == (2, 1, 24, 24)


def test_idx_folder_with_train_and_test_needs_a_file(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels(36, (1, 6, 5)), True)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels(37, (1, 6, 5)), True)

    with pytest.raises(AsrError, match=r"several IDX image files .*; pass the path of one"):
        load_calib(tmp_path, GRAY)
