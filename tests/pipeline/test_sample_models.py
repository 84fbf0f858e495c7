"""Checks on the bundled sample models and data in sample_models/."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import paths
import pytest
import zoo
from PIL import Image

ROOT = str(paths.ROOT)
MODELS_DIR = os.path.join(ROOT, "sample_models")
DATA_DIR = os.path.join(MODELS_DIR, "data")
MODEL_NAMES = ["resnet20", "vgg_bn", "resnet50s", "mobilenetv2"]
# (file name, keeps BatchNormalization nodes)
ONNX_FILES = [(f"{name}_bn.onnx", True) for name in MODEL_NAMES]
ONNX_FILES += [(f"{name}.onnx", False) for name in MODEL_NAMES]
TRANSFORMER_NAMES = ["vit", "convnext"]  # LayerNorm networks (issue 30): one file each, no BN
ONNX_FILES += [(f"{name}.onnx", False) for name in TRANSFORMER_NAMES]
PREPROCESS = {"mean": [0.286], "std": [0.353], "scale": 1.0 / 255.0}


@pytest.fixture(scope="module")
def eval_data():
    """Bundled eval images (x, y)."""
    with np.load(os.path.join(DATA_DIR, "eval.npz")) as data:
        return data["x"], data["y"]


def onnx_logits(filename, x):
    """Logits of a bundled ONNX model on x, via onnxruntime CPU."""
    path = os.path.join(MODELS_DIR, filename)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def read_checksums():
    """{relative path: sha256} from data/SHA256SUMS."""
    with open(os.path.join(DATA_DIR, "SHA256SUMS")) as f:
        pairs = [line.split(None, 1) for line in f if line.strip()]
    return {rel.strip(): digest for digest, rel in pairs}


# ------------------------------------------------------------------ bundled data


def test_eval_npz_shapes_and_labels(eval_data):
    x, y = eval_data
    assert x.shape == (2000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (2000,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() <= 9
    assert np.isfinite(x).all()
    # Normalized with mean 0.2860 / std 0.3530: pixel 0 maps to -0.810.
    assert np.isclose(x.min(), -0.2860 / 0.3530, atol=1e-5)


def test_calib_pngs_decode_to_grayscale_28x28():
    pngs = []
    for label in sorted(os.listdir(os.path.join(DATA_DIR, "calib"))):
        assert label.isdigit() and 0 <= int(label) <= 9
        folder = os.path.join(DATA_DIR, "calib", label)
        pngs += [os.path.join(folder, name) for name in os.listdir(folder)]
    assert len(pngs) == 512
    for path in pngs:
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (28, 28)


def test_checksums_match():
    checksums = read_checksums()
    assert "eval.npz" in checksums
    assert sum(rel.startswith("calib/") for rel in checksums) == 512
    for rel, digest in checksums.items():
        with open(os.path.join(DATA_DIR, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, rel


def test_licence_present():
    with open(os.path.join(DATA_DIR, "LICENSE-fashion-mnist.txt")) as f:
        text = f.read()
    assert "Copyright (c) 2017 Zalando SE" in text and "MIT" in text


# ------------------------------------------------------------------- ONNX files


@pytest.mark.parametrize("filename,keeps_bn", ONNX_FILES)
def test_onnx_file_valid(filename, keeps_bn):
    model = onnx.load(os.path.join(MODELS_DIR, filename))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["asr_onnx.preprocess"]) == PREPROCESS
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if keeps_bn:
        assert bn_nodes and all(len(n.output) == 1 for n in bn_nodes)
    else:
        assert not bn_nodes


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_the_transformer_samples_normalise_by_layernorm_and_run_linear_layers_as_matmul(name):
    model = onnx.load(os.path.join(MODELS_DIR, f"{name}.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") >= 10 and ops.count("MatMul") >= 12 and "Erf" in ops
    if name == "vit":  # attention written out: per-head reshapes and a softmax per block
        assert ops.count("Softmax") == 6 and ops.count("Reshape") >= 24
    else:  # depthwise 7x7 convs
        assert sum(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
                   for n in model.graph.node) == 6


# the two ResNet-20s (the demo's) and the two LayerNorm networks by default; the others with -m slow
@pytest.mark.parametrize("filename", zoo.slow_except([filename for filename, _ in ONNX_FILES],
                                                    ("resnet20_bn.onnx", "resnet20.onnx", "vit.onnx",
                                                     "convnext.onnx")))
def test_onnx_accuracy_on_bundled_eval(filename, eval_data):
    x, y = eval_data
    accuracy = (onnx_logits(filename, x).argmax(1) == y).mean()
    assert accuracy >= 0.88, f"{filename}: top-1 {accuracy:.4f}"


# ------------------------------------------------------------- torch vs ONNX


@pytest.fixture(scope="module")
def train_module():
    """sample_models/train.py imported by path (needs torch)."""
    pytest.importorskip("torch")
    path = os.path.join(MODELS_DIR, "train.py")
    spec = importlib.util.spec_from_file_location("sample_models_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", zoo.slow_except(MODEL_NAMES + TRANSFORMER_NAMES, ("resnet20", "vit", "convnext")))
def test_torch_matches_onnx(name, train_module, eval_data):
    import torch

    x = eval_data[0][:64]
    model = train_module.load_trained(name, MODELS_DIR)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for filename in (f"{name}_bn.onnx", f"{name}.onnx") if name in MODEL_NAMES else (f"{name}.onnx",):
        diff = np.abs(onnx_logits(filename, x) - expected).max()
        assert diff <= 1e-4, f"{filename}: max abs diff {diff}"


@pytest.mark.parametrize("filename", zoo.slow_except(["resnet20_bn.onnx", "resnet20.onnx"], ("resnet20_bn.onnx",)))
def test_sparsity_zero_leaves_a_sample_model_as_it_was_on_brightened_class_sorted_images(filename):
    """The bundled calibration folder (read class by class) through a brighter, flatter preprocessing than
    training's: every method at --sparsity 0 returns the input model's logits within 1e-4 relative (auto
    on the zoo graphs: tests/test_graphs.py)."""
    from asr_onnx.calib import Preprocess, input_specs, load_calib
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import repair

    model = load_model(os.path.join(MODELS_DIR, filename))
    brightened = Preprocess(mean=[0.1], std=[0.5], scale=1.0 / 255.0)  # training: mean 0.286, std 0.353
    calib = load_calib(os.path.join(DATA_DIR, "calib"), input_specs(model), brightened).take(128)
    x = np.concatenate([b["input"] for b in calib.batches(128)])
    expected = onnx_logits(filename, x).astype(np.float64)
    for method in ("bn", "lw", "naive", "asr"):
        job = repair(model, calib, sparsity=0.0, method=method, batch_size=32, device="cpu", progress=False)
        session = ort.InferenceSession(job.output.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"input": x})[0].astype(np.float64)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4, method


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_sparsity_zero_with_the_default_refit_leaves_a_layernorm_sample_as_it_was(name):
    """Issue 30: the LayerNorm networks at --sparsity 0 through the CLI's default repair (LAMP, OBS masks, refit,
    BN recalibration, head correction): every weight as it was, the logits within 1e-5 relative."""
    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.model.files import load_model
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.pipeline.driver import Repair

    filename = f"{name}.onnx"
    model = load_model(os.path.join(MODELS_DIR, filename))
    calib = load_calib(os.path.join(DATA_DIR, "calib"), input_specs(model)).take(64)
    job = Repair(model, batch_size=32, device="cpu", progress=False).prune(0.0, allocation="lamp", score="obs")
    job.run(calib, "bn", reconstruct="ls")
    for got, want in zip(find_layers(to_graph(job.output)), find_layers(to_graph(model)), strict=True):
        assert np.array_equal(got.weight.values, want.weight.values), got.name
    x = np.concatenate([b["input"] for b in calib.batches(64)])
    session = ort.InferenceSession(job.output.SerializeToString(), providers=["CPUExecutionProvider"])
    got, expected = session.run(["logits"], {"input": x})[0], onnx_logits(filename, x)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
