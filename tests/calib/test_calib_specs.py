"""Tests for asr_onnx.calib.specs: Preprocess from model metadata and its key."""

import pytest

from asr_onnx.calib import Preprocess
from asr_onnx.errors import AsrError


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
