"""Tests for asr_onnx.calib.images: layouts, channels, resizing, dtypes, hooks and 16-bit PNGs."""

import numpy as np
import pytest
from calib_files import F32, GRAY, RGB_NCHW, RGB_NHWC, SCALE, all_batches, pixels, save_png
from PIL import Image

from asr_onnx.calib import InputSpec, Preprocess, infer_layout, load_calib
from asr_onnx.errors import AsrError


def test_gray_class_subfolders_give_numeric_labels_and_exact_values(tmp_path):
    names = ["0/a.png", "1/b.png", "10/c.png", "2/d.png"]  # sorted path order
    images = [save_png(tmp_path / name, pixels(seed, (6, 5))) for seed, name in enumerate(names)]
    pre = Preprocess(mean=(0.25,), std=(0.5,))

    calib = load_calib(tmp_path, GRAY, pre)

    assert len(calib) == 4
    np.testing.assert_array_equal(calib.labels, [0, 1, 3, 2])  # numeric order: "10" is the fourth class
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

    with pytest.raises(AsrError, match=r"image .*a\.png is 32x32 but the model expects 28x28; pass --size, --resize"):
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


@pytest.mark.parametrize("specs", [GRAY, RGB_NCHW])
@pytest.mark.parametrize("resize", [None, 6])
def test_a_32_bit_integer_tiff_gives_the_array_of_an_8_bit_png_of_the_same_pixels(tmp_path, specs, resize):
    """Issue 25: Pillow reads a 32-bit integer TIFF as mode I; its values are pixel values as they are,
    not 16-bit ones scaled down by 257."""
    raw = pixels(11, (6, 5))
    save_png(tmp_path / "png" / "a.png", raw)
    save_png(tmp_path / "tif" / "a.tif", raw.astype(np.int32))
    with Image.open(tmp_path / "tif" / "a.tif") as image:
        assert image.mode == "I" and image.tag_v2[258] == (32,)  # the file really holds 32-bit integers
    preprocess = Preprocess(resize=resize)
    from_png, from_tif = (all_batches(load_calib(tmp_path / kind, specs, preprocess))["input"] for kind in ("png", "tif"))
    np.testing.assert_array_equal(from_tif, from_png)
    if resize is None:
        np.testing.assert_array_equal(from_png[0, 0], raw.astype(np.float32) * SCALE)


def test_a_16_bit_pgm_read_as_mode_i_is_scaled_like_a_16_bit_png(tmp_path):
    """Pillow reads a 16-bit PGM as mode I (older Pillow a 16-bit PNG too): those stay 16-bit, 65535 -> 255."""
    deep = np.random.default_rng(5).integers(0, 65536, (6, 5), dtype=np.uint16)
    deep[0, :2] = (0, 65535)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.pgm").write_bytes(b"P5\n5 6\n65535\n" + deep.astype(">u2").tobytes())
    with Image.open(tmp_path / "data" / "a.pgm") as image:
        assert image.mode == "I"
    x = all_batches(load_calib(tmp_path / "data", GRAY))["input"][0, 0]
    np.testing.assert_allclose(x, deep.astype(np.float64) / 257 * SCALE, rtol=1e-5, atol=1e-6)


def test_a_32_bit_integer_tiff_past_255_keeps_its_values(tmp_path):
    """Values above 255 are neither clipped (Pillow's own conversion) nor divided by 257."""
    raw = pixels(12, (6, 5)).astype(np.int32) * 40  # up to 10,200
    save_png(tmp_path / "tif" / "a.tif", raw)
    x = all_batches(load_calib(tmp_path / "tif", GRAY))["input"][0, 0]
    np.testing.assert_array_equal(x, raw.astype(np.float32) * SCALE)
