"""--resize-mode crop|stretch|letterbox and --pad-value, the hook example of docs/commands.md, and the hints of a size
mismatch (issue 29: there was no plain resize and no letterbox, and "pass --size" showed with --size given)."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from calib_files import F32, GRAY, RGB_NCHW, SCALE, all_batches, pixels, save_png
from paths import ROOT
from PIL import Image
from zoo import detector_head, dynamic_hw_detector

from asr_onnx.calib import METADATA_KEY, InputSpec, Preprocess, load_calib
from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError

COMMANDS_DOC = ROOT / "docs" / "commands.md"


def test_stretch_is_a_plain_bilinear_resize(tmp_path):
    raw = pixels(1, (9, 14, 3))
    path = save_png(tmp_path / "a.png", raw)
    got = all_batches(load_calib(tmp_path, RGB_NCHW, Preprocess(resize_mode="stretch")))["input"]
    expected = np.asarray(Image.open(path).resize((5, 6), Image.Resampling.BILINEAR)).astype(np.float32) * SCALE
    np.testing.assert_array_equal(got[0], expected.transpose(2, 0, 1))


@pytest.mark.parametrize("image_hw, size, new_hw, top_left", [
    ((10, 20), (16, 16), (8, 16), (4, 0)),  # wide: bars above and below
    ((7, 10), (8, 8), (6, 8), (1, 0)),  # 5.6 rounds to 6; (8 - 6) / 2 - 0.1 rounds to 1
    ((10, 20), (13, 20), (10, 20), (1, 0)),  # no resize; an odd border of 3: 1 above, 2 below, as Ultralytics
    ((4, 4), (8, 6), (6, 6), (1, 0)),  # scaled up
    ((6, 5), (6, 5), (6, 5), (0, 0)),  # already the size: unchanged
])
def test_letterbox_keeps_the_aspect_and_pads_with_ultralytics_rounding(tmp_path, image_hw, size, new_hw, top_left):
    raw = pixels(2, (*image_hw, 3))
    path = save_png(tmp_path / "a.png", raw)
    specs = [InputSpec("input", (None, 3, "h", "w"), F32)]
    got = all_batches(load_calib(tmp_path, specs, Preprocess(size=size, resize_mode="letterbox", scale=1.0)))["input"]
    resized = np.asarray(Image.open(path).resize(new_hw[::-1], Image.Resampling.BILINEAR), np.float32)
    expected = np.full((*size, 3), 114, np.float32)
    (top, left), (height, width) = top_left, new_hw
    expected[top:top + height, left:left + width] = resized
    np.testing.assert_array_equal(got[0], expected.transpose(2, 0, 1))


def test_letterbox_pad_value_is_in_pixel_units_before_scale_mean_and_std(tmp_path):
    save_png(tmp_path / "a.png", pixels(3, (3, 5)))
    pre = Preprocess(resize_mode="letterbox", pad_value=0, mean=(0.5,), std=(0.25,))
    got = all_batches(load_calib(tmp_path, GRAY, pre))["input"][0, 0]  # 3x5 into 6x5: 1.5 rows of border
    np.testing.assert_allclose(got[0], (0 - 0.5) / 0.25)
    np.testing.assert_allclose(got[-2:], (0 - 0.5) / 0.25)
    deep = np.full((3, 5), 65535, np.uint16)  # a 16-bit PNG pads in the same 0..255 units
    save_png(tmp_path / "deep" / "a.png", deep)
    got = all_batches(load_calib(tmp_path / "deep", GRAY, Preprocess(resize_mode="letterbox", pad_value=51)))["input"]
    np.testing.assert_allclose(got[0, 0, 0], 51 * SCALE, rtol=1e-6)
    np.testing.assert_allclose(got[0, 0, 2], 1.0, rtol=1e-6)


@pytest.mark.parametrize("preprocess, message", [
    (dict(resize_mode="fit"), "resize_mode must be one of crop, stretch, letterbox"),
    (dict(resize_mode="letterbox", pad_value=300), "pad_value must be between 0 and 255"),
    (dict(resize_mode="letterbox", pad_value=float("nan")), "pad_value must be finite"),
    (dict(resize_mode="stretch", resize=8), "--resize 8 goes with --resize-mode crop"),
])
def test_bad_resize_modes(preprocess, message):
    with pytest.raises(AsrError, match=message):
        Preprocess(**preprocess)


def test_resize_mode_comes_from_metadata_and_an_override_drops_the_models_crop():
    props = {METADATA_KEY: json.dumps({"resize": 32, "size": [28, 28], "resize_mode": "crop"})}
    assert Preprocess.from_metadata(props, resize_mode="letterbox") == Preprocess(size=(28, 28),
                                                                                  resize_mode="letterbox")
    letterbox = {METADATA_KEY: json.dumps({"resize_mode": "letterbox", "pad_value": 0})}
    assert Preprocess.from_metadata(letterbox).pad_value == 0.0


def test_the_new_fields_leave_old_keys_alone_and_key_when_set():
    assert "resize_mode" not in Preprocess().key() and "pad_value" not in Preprocess().key()  # old --stats stay valid
    keys = {Preprocess().key(), Preprocess(resize_mode="stretch").key(), Preprocess(resize_mode="letterbox").key(),
            Preprocess(resize_mode="letterbox", pad_value=0).key()}
    assert len(keys) == 4


@pytest.mark.parametrize("preprocess, hint, not_hint", [
    (Preprocess(), "but the model expects 6x5; pass --size, --resize", None),
    (Preprocess(size=(6, 5)), "but --size expects 6x5; pass --resize", "--size,"),
])
def test_a_size_mismatch_hints_only_at_what_was_not_given(tmp_path, preprocess, hint, not_hint):
    save_png(tmp_path / "a.png", pixels(4, (9, 9)))
    with pytest.raises(AsrError) as caught:
        load_calib(tmp_path, GRAY, preprocess)
    assert hint in str(caught.value) and "--resize-mode stretch or letterbox" in str(caught.value)
    assert not_hint is None or not_hint not in str(caught.value)


def documented_hook(tmp_path) -> Path:
    """The YOLO letterbox hook of docs/commands.md, written to a file as a user would."""
    blocks = re.findall(r"```python\n(# yolo_letterbox\.py.*?)```", COMMANDS_DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1
    path = tmp_path / "yolo_letterbox.py"
    path.write_text(blocks[0])
    return path


def test_the_documented_hook_gives_the_samples_of_resize_mode_letterbox(tmp_path):
    for seed, shape in enumerate([(20, 12, 3), (9, 30, 3), (16, 16), (5, 7, 3)]):
        save_png(tmp_path / "data" / f"{seed}.png", pixels(seed, shape))
    model, _ = detector_head(size=16)  # a static (N, 3, 16, 16) input: the hook reads its size from spec
    hooked = all_batches(load_calib(tmp_path / "data", model, Preprocess(hook=f"{documented_hook(tmp_path)}:letterbox")))
    built = all_batches(load_calib(tmp_path / "data", model, Preprocess(resize_mode="letterbox")))
    np.testing.assert_allclose(hooked["input"], built["input"], rtol=1e-6, atol=1e-7)


def test_cli_letterbox_on_a_dynamic_hw_detector_and_pad_value_needs_letterbox(tmp_path, capsys):
    model, _ = dynamic_hw_detector()
    onnx.save(model, tmp_path / "det.onnx")
    for seed, shape in enumerate([(20, 12, 3), (9, 30, 3), (16, 16, 3)]):
        save_png(tmp_path / "photos" / f"{seed}.png", pixels(seed, shape))
    argv = ["eval", str(tmp_path / "det.onnx"), "--data", str(tmp_path / "photos"), "--reference",
            str(tmp_path / "det.onnx"), "-q", "--json"]
    assert main([*argv, "--size", "16,16"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "but --size expects 16x16; pass --resize" in line and "pass --size" not in line
    assert main([*argv, "--size", "16,16", "--resize-mode", "letterbox", "--pad-value", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["logit_rel_l2"] == 0.0
    assert main([*argv, "--size", "16,16", "--resize-mode", "stretch", "--pad-value", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "--pad-value" in line and "letterbox" in line
