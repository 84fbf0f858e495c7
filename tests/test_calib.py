"""Tests for asr_onnx.calib: sources, preprocessing, batching, subsets and validation."""

import gzip
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from asr_onnx.calib import (
    CalibSet,
    InputSpec,
    Preprocess,
    infer_layout,
    load_calib,
    read_idx,
)
from asr_onnx.errors import AsrError

F32 = np.dtype(np.float32)
GRAY = [InputSpec("input", (None, 1, 6, 5), F32)]  # H=6, W=5: unequal so H/W mix-ups show
RGB_NCHW = [InputSpec("input", (None, 3, 6, 5), F32)]
RGB_NHWC = [InputSpec("input", ("N", 6, 5, 3), F32)]
SCALE = np.float32(1 / 255)


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- images


def test_gray_class_subfolders_give_numeric_labels_and_exact_values(tmp_path):
    names = ["0/a.png", "1/b.png", "10/c.png", "2/d.png"]  # sorted path order
    images = [save_png(tmp_path / name, pixels(seed, (6, 5))) for seed, name in enumerate(names)]
    pre = Preprocess(mean=(0.25,), std=(0.5,))

    calib = load_calib(tmp_path, GRAY, pre)

    assert len(calib) == 4
    np.testing.assert_array_equal(calib.labels, [0, 1, 10, 2])  # integer folder names are the labels
    assert calib.labels.dtype == np.int64
    got = all_batches(calib)["input"]
    for row, path in enumerate(images):
        raw = np.asarray(Image.open(path)).astype(np.float32)
        expected = (raw * SCALE - np.float32(0.25)) / np.float32(0.5)
        np.testing.assert_array_equal(got[row], expected[np.newaxis])
    assert got.dtype == np.float32 and got.shape == (4, 1, 6, 5)


def test_class_subfolders_with_names_sort_alphabetically(tmp_path):
    save_png(tmp_path / "dog" / "1.png", pixels(0, (6, 5)))
    save_png(tmp_path / "cat" / "1.png", pixels(1, (6, 5)))
    save_png(tmp_path / "cat" / "2.png", pixels(2, (6, 5)))

    calib = load_calib(tmp_path, GRAY)

    np.testing.assert_array_equal(calib.labels, [0, 0, 1])


def test_images_at_root_have_no_labels(tmp_path):
    save_png(tmp_path / "a.png", pixels(0, (6, 5)))
    save_png(tmp_path / "sub" / "b.png", pixels(1, (6, 5)))

    calib = load_calib(tmp_path, GRAY)

    assert calib.labels is None
    assert len(calib) == 2


def test_rgb_nchw_default_layout(tmp_path):
    raw = pixels(3, (6, 5, 3))
    save_png(tmp_path / "a.png", raw)

    got = all_batches(load_calib(tmp_path, RGB_NCHW))["input"]

    expected = (raw.astype(np.float32) * SCALE).transpose(2, 0, 1)
    np.testing.assert_array_equal(got[0], expected)


def test_rgb_bgr_nhwc_with_mean_std(tmp_path):
    raw = pixels(4, (6, 5, 3))
    save_png(tmp_path / "a.png", raw)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    pre = Preprocess(mean=mean, std=std, channel_order="bgr")

    got = all_batches(load_calib(tmp_path, RGB_NHWC, pre))["input"]

    bgr = raw[..., ::-1].astype(np.float32)
    expected = (bgr * SCALE - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    assert got.shape == (1, 6, 5, 3)
    np.testing.assert_array_equal(got[0], expected)


def test_gray_image_to_rgb_model_and_rgb_image_to_gray_model(tmp_path):
    gray = pixels(5, (6, 5))
    save_png(tmp_path / "g" / "a.png", gray)
    color = pixels(6, (6, 5, 3))
    save_png(tmp_path / "c" / "a.png", color)

    as_rgb = all_batches(load_calib(tmp_path / "g", RGB_NCHW, Preprocess(scale=1.0)))["input"][0]
    as_gray = all_batches(load_calib(tmp_path / "c", GRAY, Preprocess(scale=1.0)))["input"][0, 0]

    np.testing.assert_array_equal(as_rgb, np.stack([gray] * 3).astype(np.float32))
    expected_gray = np.asarray(Image.fromarray(color).convert("L")).astype(np.float32)
    np.testing.assert_array_equal(as_gray, expected_gray)


def test_rank3_gray_model_has_no_channel_axis(tmp_path):
    raw = pixels(7, (6, 5))
    save_png(tmp_path / "a.png", raw)

    got = all_batches(load_calib(tmp_path, [InputSpec("x", (None, 6, 5), F32)]))["x"]

    np.testing.assert_array_equal(got, (raw.astype(np.float32) * SCALE)[np.newaxis])


def test_resize_without_resampling_is_a_centre_crop(tmp_path):
    raw = pixels(8, (8, 10))  # shorter side already 8: crop only
    save_png(tmp_path / "a.png", raw)

    got = all_batches(load_calib(tmp_path, GRAY, Preprocess(resize=8, scale=1.0)))["input"]

    np.testing.assert_array_equal(got[0, 0], raw[1:7, 2:7].astype(np.float32))


def test_resize_shorter_side_then_crop_matches_pillow(tmp_path):
    raw = pixels(9, (16, 20, 3))
    path = save_png(tmp_path / "a.png", raw)

    got = all_batches(load_calib(tmp_path, RGB_NHWC, Preprocess(resize=8)))["input"]

    resized = np.asarray(Image.open(path).resize((10, 8), Image.Resampling.BILINEAR))
    expected = resized[1:7, 2:7].astype(np.float32) * SCALE
    np.testing.assert_array_equal(got[0], expected)


def test_images_are_cast_to_model_dtype(tmp_path):
    save_png(tmp_path / "a.png", pixels(10, (6, 5)))

    got = all_batches(load_calib(tmp_path, [InputSpec("input", (1, 1, 6, 5), np.float16)]))["input"]

    assert got.dtype == np.float16


def test_dynamic_hw_needs_size_and_size_is_used(tmp_path):
    save_png(tmp_path / "a.png", pixels(11, (6, 5)))
    dynamic = [InputSpec("input", (None, 1, "h", "w"), F32)]

    with pytest.raises(AsrError, match=r"dynamic H,W; pass --size"):
        load_calib(tmp_path, dynamic)
    got = all_batches(load_calib(tmp_path, dynamic, Preprocess(size=(6, 5))))["input"]
    assert got.shape == (1, 1, 6, 5)


def test_size_conflicting_with_static_model_dims(tmp_path):
    save_png(tmp_path / "a.png", pixels(12, (6, 5)))

    with pytest.raises(AsrError, match=r"--size 7x7 does not match model input 'input'"):
        load_calib(tmp_path, GRAY, Preprocess(size=(7, 7)))


def test_resize_smaller_than_crop_is_refused(tmp_path):
    save_png(tmp_path / "a.png", pixels(13, (6, 5)))

    with pytest.raises(AsrError, match=r"--resize 4 is smaller than the crop size 6x5"):
        load_calib(tmp_path, GRAY, Preprocess(resize=4))


def test_layout_inference():
    assert infer_layout((None, 3, 224, 224)) == "nchw"
    assert infer_layout((None, 224, 224, 3)) == "nhwc"
    assert infer_layout((None, 1, "h", "w")) == "nchw"
    assert infer_layout((None, "h", "w", 1)) == "nhwc"
    assert infer_layout((None, 3, 5, 3)) == "nchw"  # ambiguous


def test_ambiguous_layout_defaults_to_nchw_unless_given(tmp_path):
    raw = pixels(14, (3, 3, 3))
    save_png(tmp_path / "a.png", raw)
    spec = [InputSpec("input", (None, 3, 3, 3), F32)]

    nchw = all_batches(load_calib(tmp_path, spec, Preprocess(scale=1.0)))["input"][0]
    nhwc = all_batches(load_calib(tmp_path, spec, Preprocess(scale=1.0, layout="nhwc")))["input"][0]

    np.testing.assert_array_equal(nchw, raw.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(nhwc, raw.astype(np.float32))


def test_image_size_mismatch(tmp_path):
    save_png(tmp_path / "a.png", pixels(15, (32, 32)))
    spec = [InputSpec("input", (None, 1, 28, 28), F32)]

    with pytest.raises(AsrError, match=r"image .*a\.png is 32x32 but the model expects 28x28; pass --size or --resize"):
        load_calib(tmp_path, spec)


@pytest.mark.parametrize("shape", [(None, 784), (None, 1, 1, 28, 28)])
def test_images_need_a_4d_input(tmp_path, shape):
    save_png(tmp_path / "a.png", pixels(16, (28, 28)))

    with pytest.raises(AsrError, match=r"images need a 4-D model input.*pass \.npy arrays"):
        load_calib(tmp_path, [InputSpec("input", shape, F32)])


def test_images_refuse_unusual_channel_counts(tmp_path):
    save_png(tmp_path / "a.png", pixels(17, (6, 5)))

    with pytest.raises(AsrError, match=r"has 4 channels"):
        load_calib(tmp_path, [InputSpec("input", (None, 4, 6, 5), F32)])
    with pytest.raises(AsrError, match=r"dynamic channel dim"):
        load_calib(tmp_path, [InputSpec("input", (None, "c", 6, 5), F32)], Preprocess(layout="nchw"))


def test_images_need_a_single_input_model(tmp_path):
    save_png(tmp_path / "a.png", pixels(18, (6, 5)))
    specs = [InputSpec("a", (None, 1, 6, 5), F32), InputSpec("b", (None, 2), F32)]

    with pytest.raises(AsrError, match=r"images need a single-input model"):
        load_calib(tmp_path, specs)


def test_mean_length_must_fit_channels(tmp_path):
    save_png(tmp_path / "a.png", pixels(19, (6, 5)))

    with pytest.raises(AsrError, match=r"mean has 3 values but model input 'input' has 1 channel"):
        load_calib(tmp_path, GRAY, Preprocess(mean=(0.1, 0.2, 0.3)))


def test_single_image_file(tmp_path):
    raw = pixels(20, (6, 5))
    path = save_png(tmp_path / "one.png", raw)

    calib = load_calib(path, GRAY, Preprocess(scale=1.0))

    assert len(calib) == 1 and calib.labels is None
    np.testing.assert_array_equal(all_batches(calib)["input"][0, 0], raw.astype(np.float32))


# --------------------------------------------------------------------------- corrupt images


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


# --------------------------------------------------------------------------- arrays


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


def test_garbage_npy_is_unreadable(tmp_path):
    path = tmp_path / "calib.npy"
    path.write_bytes(b"this is not numpy")

    with pytest.raises(AsrError, match=r"cannot read array file .*calib\.npy"):
        load_calib(path, GRAY)


# --------------------------------------------------------------------------- IDX


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

    with pytest.raises(AsrError, match=r"is 28x28 but the model expects 24x24; pass --size or --resize"):
        load_calib(path, spec)
    assert all_batches(load_calib(path, spec, Preprocess(resize=24)))["input"].shape == (2, 1, 24, 24)


def test_idx_folder_with_train_and_test_needs_a_file(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels(36, (1, 6, 5)), True)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels(37, (1, 6, 5)), True)

    with pytest.raises(AsrError, match=r"several IDX image files .*; pass the path of one"):
        load_calib(tmp_path, GRAY)


# --------------------------------------------------------------------------- batching and subsets


def labelled_npz(tmp_path, count=10):
    """A set whose labels are the sample indices, to track selection."""
    x = np.arange(count, dtype=np.float32).reshape(count, 1).repeat(3, axis=1)
    return npz(tmp_path / "set.npz", x=x, y=np.arange(count))


SPEC3 = [InputSpec("x", (None, 3), F32)]


def test_batches_cover_all_samples_in_order_with_short_last_batch(tmp_path):
    calib = load_calib(labelled_npz(tmp_path, 7), SPEC3)

    batches = list(calib.batches(3))

    assert [len(batch["x"]) for batch in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), np.arange(7))


def test_image_batches_in_order(tmp_path):
    raws = [pixels(40 + i, (6, 5)) for i in range(5)]
    for i, raw in enumerate(raws):
        save_png(tmp_path / f"{i}.png", raw)

    batches = list(load_calib(tmp_path, GRAY, Preprocess(scale=1.0)).batches(2))

    assert [len(batch["input"]) for batch in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches])[:, 0], np.stack(raws))


def test_batches_span_files(tmp_path):
    for i in range(3):
        npy(tmp_path / f"{i}.npy", np.full((2, 3), i, np.float32))

    batches = list(load_calib(tmp_path, SPEC3).batches(4))

    np.testing.assert_array_equal(batches[0]["x"][:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(batches[1]["x"][:, 0], [2, 2])


def test_batch_size_must_be_positive(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    with pytest.raises(AsrError, match=r"batch size must be a positive integer"):
        next(calib.batches(0))


def test_take_is_deterministic_and_in_source_order(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    first, again, other = calib.take(4, seed=1), calib.take(4, seed=1), calib.take(4, seed=2)

    assert len(first) == 4
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.labels, other.labels)
    assert list(first.labels) == sorted(first.labels)
    np.testing.assert_array_equal(all_batches(first)["x"][:, 0], first.labels)  # data follows labels
    assert len(calib.take(50)) == 10


def test_take_of_a_take_stays_inside_it(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    inner = calib.take(6, seed=3)
    inner_inner = inner.take(3, seed=4)

    assert set(inner_inner.labels) <= set(inner.labels)
    assert len(inner_inner) == 3


def test_split_is_disjoint_complete_and_deterministic(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    fit, held = calib.split(0.7, seed=5)
    fit_again, _ = calib.split(0.7, seed=5)

    assert (len(fit), len(held)) == (7, 3)
    assert set(fit.labels).isdisjoint(held.labels)
    assert set(fit.labels) | set(held.labels) == set(range(10))
    np.testing.assert_array_equal(fit.labels, fit_again.labels)
    assert fit.fingerprint() != held.fingerprint()


def test_split_fraction_must_be_in_range(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    with pytest.raises(AsrError, match=r"split fraction must be between 0 and 1"):
        calib.split(1.5)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive_to_bytes(tmp_path):
    npy(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    npy(tmp_path / "b.npy", np.ones((2, 3), np.float32))
    first = load_calib(tmp_path, SPEC3).fingerprint()

    assert load_calib(tmp_path, SPEC3).fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0
    npy(tmp_path / "b.npy", np.full((2, 3), 2, np.float32))
    assert load_calib(tmp_path, SPEC3).fingerprint() != first


def test_fingerprint_sensitive_to_file_names(tmp_path):
    npy(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    first = load_calib(tmp_path, SPEC3).fingerprint()

    (tmp_path / "a.npy").rename(tmp_path / "c.npy")

    assert load_calib(tmp_path, SPEC3).fingerprint() != first


def test_fingerprint_sensitive_to_preprocessing_and_selection(tmp_path):
    save_png(tmp_path / "a.png", pixels(50, (6, 5)))
    save_png(tmp_path / "b.png", pixels(51, (6, 5)))
    plain = load_calib(tmp_path, GRAY)

    normalised = load_calib(tmp_path, GRAY, Preprocess(mean=(0.5,)))

    assert normalised.fingerprint() != plain.fingerprint()
    assert plain.take(1).fingerprint() != plain.fingerprint()
    assert plain.take(2).fingerprint() == plain.fingerprint()


def test_fingerprint_of_image_bytes(tmp_path):
    save_png(tmp_path / "a.png", pixels(52, (6, 5)))
    first = load_calib(tmp_path, GRAY).fingerprint()

    save_png(tmp_path / "a.png", pixels(53, (6, 5)))

    assert load_calib(tmp_path, GRAY).fingerprint() != first


# --------------------------------------------------------------------------- Preprocess


def test_from_metadata_reads_json_and_overrides_win():
    props = {"asr_onnx.preprocess": '{"mean": [0.286], "std": [0.353], "scale": 0.0039215, "size": [28, 28]}'}

    pre = Preprocess.from_metadata(props, std=(0.5,), mean=None)

    assert pre.mean == (0.286,)  # a None override keeps the metadata value
    assert pre.std == (0.5,)  # explicit override wins
    assert pre.scale == 0.0039215
    assert pre.size == (28, 28)


def test_from_metadata_without_key_gives_defaults():
    assert Preprocess.from_metadata({"other": "x"}) == Preprocess()
    assert Preprocess.from_metadata({}, resize=32) == Preprocess(resize=32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"must be a JSON object"),
        ('{"colour": "red"}', r"unknown fields: colour"),
        ('{"channel_order": "rbg"}', r"channel_order must be one of rgb, bgr"),
        ('{"std": [0.0]}', r"std .* contains 0"),
        ('{"hook": "os:system"}', r"names a hook .* may only carry data"),  # a model file never runs code
    ],
)
def test_from_metadata_errors(text, message):
    with pytest.raises(AsrError, match=message):
        Preprocess.from_metadata({"asr_onnx.preprocess": text})


def test_from_metadata_unknown_override():
    with pytest.raises(AsrError, match=r"unknown preprocessing option 'colour'"):
        Preprocess.from_metadata({}, colour="red")


def test_preprocess_key_is_stable_and_covers_fields():
    assert Preprocess(mean=[0.5]).key() == Preprocess(mean=(0.5,)).key()
    keys = {
        Preprocess().key(),
        Preprocess(size=(2, 2)).key(),
        Preprocess(resize=4).key(),
        Preprocess(mean=(0.1,)).key(),
        Preprocess(std=(0.2,)).key(),
        Preprocess(scale=1.0).key(),
        Preprocess(channel_order="bgr").key(),
        Preprocess(layout="nhwc").key(),
        Preprocess(hook="m:f").key(),
    }
    assert len(keys) == 9


# --------------------------------------------------------------------------- hooks


def test_file_hook_replaces_preprocessing(tmp_path):
    hook_file = tmp_path / "hooks" / "prep.py"
    hook_file.parent.mkdir()
    hook_file.write_text(
        "import numpy as np\n"
        "def prep(image, spec):\n"
        "    return np.full((1, 6, 5), image.size[0] * 10 + len(spec.name), np.float64)\n"
    )
    save_png(tmp_path / "data" / "a.png", pixels(60, (6, 5)))

    calib = load_calib(tmp_path / "data", GRAY, Preprocess(hook=f"{hook_file}:prep"))

    got = all_batches(calib)["input"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.full((1, 1, 6, 5), 55.0))


def test_fingerprint_follows_hook_file_edits(tmp_path):
    hook_file = tmp_path / "prep.py"
    hook_file.write_text("import numpy as np\ndef prep(image, spec):\n    return np.zeros((1, 6, 5))\n")
    save_png(tmp_path / "data" / "a.png", pixels(64, (6, 5)))
    pre = Preprocess(hook=f"{hook_file}:prep")
    first = load_calib(tmp_path / "data", GRAY, pre).fingerprint()

    assert load_calib(tmp_path / "data", GRAY, pre).fingerprint() == first
    hook_file.write_text("import numpy as np\ndef prep(image, spec):\n    return np.ones((1, 6, 5))\n")
    assert load_calib(tmp_path / "data", GRAY, pre).fingerprint() != first


def test_hook_output_is_validated(tmp_path):
    hook_file = tmp_path / "prep.py"
    hook_file.write_text("import numpy as np\ndef prep(image, spec):\n    return np.zeros((3, 6, 5))\n")
    save_png(tmp_path / "data" / "a.png", pixels(61, (6, 5)))
    calib = load_calib(tmp_path / "data", GRAY, Preprocess(hook=f"{hook_file}:prep"))

    with pytest.raises(AsrError, match=r"a\.png \(hook .*\): sample shape \(3, 6, 5\) does not match"):
        all_batches(calib)


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("nohook", r"hook must be 'module:function'"),
        ("no_such_module_xyz:f", r"cannot load hook no_such_module_xyz:f"),
        ("/no/such/file.py:f", r"hook file .*file\.py does not exist"),
        ("json:no_such_function", r"json has no function 'no_such_function'"),
    ],
)
def test_bad_hooks(tmp_path, hook, message):
    save_png(tmp_path / "a.png", pixels(62, (6, 5)))

    with pytest.raises(AsrError, match=message):
        load_calib(tmp_path, GRAY, Preprocess(hook=hook))


# --------------------------------------------------------------------------- paths


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


def test_calib_set_is_returned(tmp_path):
    calib = load_calib(labelled_npz(tmp_path), SPEC3)

    assert isinstance(calib, CalibSet)
    assert calib.specs == SPEC3


@pytest.mark.parametrize("specs", [GRAY, RGB_NCHW])
@pytest.mark.parametrize("resize", [None, 6])
def test_16_bit_png_is_scaled_to_the_8_bit_range_not_clipped(tmp_path, specs, resize):
    """Issue 14.11: 65535 reads as 255 and 25700 as 100 (Pillow's own conversion clips both to 255).
    Resized, a uniform image stays uniform, so the bilinear resize needs no oracle of its own."""
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (6, 5), dtype=np.uint16) if resize is None else np.full((6, 5), 25700, np.uint16)
    deep[0, :3] = (0, 25700, 65535) if resize is None else 25700
    save_png(tmp_path / "data" / "a.png", deep)
    x = next(iter(load_calib(tmp_path / "data", specs, Preprocess(resize=resize)).batches(1)))["input"][0]
    expected = deep.astype(np.float64) / 257 * SCALE  # 65535 / 257 = 255
    for channel in x:
        np.testing.assert_allclose(channel, expected, rtol=1e-5, atol=1e-6)


def test_shuffled_batches_mix_the_classes_and_keep_the_labels(tmp_path):
    x = np.repeat(np.arange(4, dtype=np.float32), 8)[:, None] * np.ones(3, np.float32)  # class-sorted
    calib = load_calib(npz(tmp_path / "set.npz", x=x, y=np.repeat(np.arange(4), 8)), SPEC3)
    mixed = calib.shuffled(seed=3)

    batches = list(mixed.batches(8))

    assert all(len(np.unique(b["x"][:, 0])) > 1 for b in batches)  # in source order each holds one class
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), mixed.labels)
    assert sorted(mixed.labels) == sorted(calib.labels)
    np.testing.assert_array_equal(next(calib.shuffled(seed=3).batches(8))["x"], batches[0]["x"])


def test_a_class_sorted_folder_repairs_like_its_shuffled_twin(tmp_path):
    """The bundled calibration folder is read class by class; its images in a random flat order give the
    same repair (before batches were mixed: logit error 0.94 against dense with the sorted folder,
    0.58 with one batch of the whole set)."""
    import shutil
    from pathlib import Path

    from asr_onnx.api import Repair
    from asr_onnx.calib import input_specs, metadata
    from asr_onnx.modelio import load_model
    from asr_onnx.verify import evaluate

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_models")
    model = load_model(os.path.join(root, "resnet20_bn.onnx"))
    specs, pre = input_specs(model), Preprocess.from_metadata(metadata(model))
    files = sorted(Path(root, "data", "calib").rglob("*.png"))
    for i, index in enumerate(np.random.default_rng(5).permutation(len(files))):
        shutil.copy(files[index], tmp_path / f"{i:04d}.png")
    held_out = load_calib(os.path.join(root, "data", "eval.npz"), specs, pre).take(300)

    outputs = [Repair(model, progress=False).prune(0.9).run(load_calib(path, specs, pre), "bn").output
               for path in (os.path.join(root, "data", "calib"), tmp_path)]
    against_dense = [evaluate(out, held_out, reference=model, progress=False)["logit_rel_l2"] for out in outputs]
    between = evaluate(outputs[0], held_out, reference=outputs[1], progress=False)

    assert abs(against_dense[0] - against_dense[1]) < 0.05 and max(against_dense) < 0.7
    assert between["agreement"] > 0.97 and between["logit_rel_l2"] < 0.05
