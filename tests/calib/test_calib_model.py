"""load_calib given a model: its inputs and its metadata preprocessing; named data sets."""

import json

import numpy as np
import pytest
from PIL import Image
from zoo import conv_net

from asr_onnx.calib import METADATA_KEY, Preprocess, input_specs, load_calib, read_idx
from asr_onnx.calib.named import NAMED_DATA, resolve_data
from asr_onnx.errors import AsrError

MEAN, STD = (0.5, 0.25, 0.125), (2.0, 4.0, 0.5)


def with_metadata(model):
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps({"mean": MEAN, "std": STD}))
    return model


@pytest.fixture
def images(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    return tmp_path, pixels


def test_a_model_brings_its_metadata_preprocessing(images):
    folder, pixels = images
    model = with_metadata(conv_net())
    got = next(load_calib(folder, model).batches(4))["input"]
    expected = (pixels.transpose(0, 3, 1, 2) / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    plain = next(load_calib(folder, input_specs(model)).batches(4))["input"]  # specs alone: no metadata
    np.testing.assert_allclose(plain, pixels.transpose(0, 3, 1, 2) / 255, rtol=1e-6, atol=1e-6)


def test_a_preprocess_given_wins_over_the_model_metadata(images):
    folder, pixels = images
    model = with_metadata(conv_net())
    got = next(load_calib(folder, model, Preprocess(scale=1.0)).batches(4))["input"]
    np.testing.assert_array_equal(got, pixels.transpose(0, 3, 1, 2).astype(np.float32))
    assert Preprocess.for_model(model) == Preprocess(mean=MEAN, std=STD)
    assert Preprocess.for_model(model, std=(1.0,)) == Preprocess(mean=MEAN, std=(1.0,))


def test_a_named_data_set_loads_from_the_python_api():
    if not NAMED_DATA["fashion-mnist:test"].exists():
        pytest.skip("Debian's Fashion-MNIST files are not installed")
    from onnx import TensorProto, helper
    from zoo import make_model

    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])])
    data = load_calib("fashion-mnist:test", model)
    assert len(data) == 10000 and data.labels is not None
    expected = read_idx(NAMED_DATA["fashion-mnist:test"])[:3] / 255
    np.testing.assert_allclose(next(data.batches(3))["x"][:, 0], expected, rtol=1e-6)


def test_named_data_set_resolves_or_explains(monkeypatch, tmp_path):
    monkeypatch.setitem(NAMED_DATA, "fashion-mnist:test", tmp_path / "absent.gz")
    with pytest.raises(AsrError, match="apt-get install -y dataset-fashion-mnist"):
        resolve_data("fashion-mnist:test")
    with pytest.raises(AsrError, match="apt-get install -y dataset-fashion-mnist"):
        load_calib("fashion-mnist:test", conv_net())
    assert str(resolve_data("some/folder")) == "some/folder"
