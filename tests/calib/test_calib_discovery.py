"""Tests for asr_onnx.calib.discovery: paths, folders, single files and corrupt images."""

import os
import warnings

import numpy as np
import pytest
from calib_files import GRAY, SPEC3, all_batches, npy, pixels, save_png

from asr_onnx.calib import Preprocess, load_calib
from asr_onnx.errors import AsrError


def test_single_image_file(tmp_path):
    raw = pixels(20, (6, 5))
    path = save_png(tmp_path / "one.png", raw)

    calib = load_calib(path, GRAY, Preprocess(scale=1.0))

    assert len(calib) == 1 and calib.labels is None
    np.testing.assert_array_equal(all_batches(calib)["input"][0, 0], raw.astype(np.float32))


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    save_png(tmp_path / "a.png", pixels(21, (6, 5)))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save_png(tmp_path / "c.png", pixels(22, (6, 5)))

    with pytest.warns(UserWarning, match=r"skipping corrupt image .*b\.png"):
        calib = load_calib(tmp_path, GRAY)

    assert len(calib) == 2
    assert all_batches(calib)["input"].shape == (2, 1, 6, 5)


def test_truncated_png_is_caught_by_verify(tmp_path):
    good = save_png(tmp_path / "a.png", pixels(23, (6, 5)))
    data = good.read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) - 20])  # cut into the IDAT/IEND chunks

    with pytest.warns(UserWarning, match=r"b\.png"):
        calib = load_calib(tmp_path, GRAY)
    assert len(calib) == 1


def test_corrupt_image_is_an_error_when_strict(tmp_path):
    save_png(tmp_path / "a.png", pixels(24, (6, 5)))
    (tmp_path / "b.png").write_bytes(b"not a png")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict must not warn first
        with pytest.raises(AsrError, match=r"corrupt image .*b\.png"):
            load_calib(tmp_path, GRAY, strict=True)


def test_all_images_corrupt(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"nope")

    with pytest.warns(UserWarning):
        with pytest.raises(AsrError, match=r"no readable images in .* \(2 corrupt\)"):
            load_calib(tmp_path, GRAY)


def test_missing_path(tmp_path):
    with pytest.raises(AsrError, match=r"calibration path .*nowhere does not exist"):
        load_calib(tmp_path / "nowhere", GRAY)


def test_unreadable_path(tmp_path, monkeypatch):
    target = tmp_path / "locked"
    target.mkdir()
    real_access = os.access
    # Root ignores file modes, so deny access for this path only instead of chmod.
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(target) else real_access(path, mode))

    with pytest.raises(AsrError, match=r"cannot read calibration path .*locked"):
        load_calib(target, GRAY)


def test_empty_folder(tmp_path):
    with pytest.raises(AsrError, match=r"no images or \.npy/\.npz files in "):
        load_calib(tmp_path, GRAY)


def test_folder_of_non_image_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data.csv").write_text("1,2")

    with pytest.raises(AsrError, match=r"no images or \.npy/\.npz files in .*found 2 other file"):
        load_calib(tmp_path, GRAY)


def test_hidden_files_are_ignored(tmp_path):
    save_png(tmp_path / "a.png", pixels(63, (6, 5)))
    (tmp_path / ".cache").mkdir()
    npy(tmp_path / ".cache" / "x.npy", np.zeros((1, 3)))

    assert len(load_calib(tmp_path, GRAY)) == 1


def test_unsupported_single_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("1 2 3")

    with pytest.raises(AsrError, match=r"calib\.txt: unsupported file type"):
        load_calib(path, GRAY)


def test_mixed_images_and_arrays(tmp_path):
    save_png(tmp_path / "a.png", pixels(64, (6, 5)))
    npy(tmp_path / "b.npy", np.zeros((1, 1, 6, 5), np.float32))

    with pytest.raises(AsrError, match=r"mixes images and \.npy/\.npz files"):
        load_calib(tmp_path, GRAY)


def test_folder_of_empty_arrays(tmp_path):
    npy(tmp_path / "a.npy", np.zeros((0, 3), np.float32))

    with pytest.raises(AsrError, match=r"no samples in "):
        load_calib(tmp_path, SPEC3)
