"""Issue 6, bad input: the cases tests/test_cli.py does not cover, each a one-line error with exit code 1
that writes nothing and leaves the input as it was; and determinism of the whole run."""

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from PIL import Image

from asr_onnx_cli.main import main
from models import conv_net, random_inputs


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(folder, count, size=8, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def checker_failing(tmp_path):
    model = conv_net(bn=True)
    model.graph.node[1].input[0] = "nowhere"  # a BN reading a tensor that nothing produces
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def missing_external(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(conv_net(bn=True), path, save_as_external_data=True, size_threshold=0, location="ext.weights")
    (tmp_path / "ext.weights").unlink()
    return path


def unknown_op(tmp_path):
    """A custom-domain op that onnxruntime has no kernel for: the model cannot be measured."""
    import zoo

    g = zoo.G(1)
    h = g.relu(g.conv(g.node("Mystery", [g.conv("input", 3, 6)], domain="com.example"), 6, 8))
    model = g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 8), out_shape=["N", 5],
                    extra_opsets=[("com.example", 1)])
    onnx.save(model, tmp_path / "mystery.onnx")
    return tmp_path / "mystery.onnx"


def escaping_external(tmp_path):
    """External data whose location climbs out of the model's folder."""
    path = missing_external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.bin"
    path.write_bytes(model.SerializeToString())
    return path


def bad_case(name, tmp_path, model, calib):
    """(argv, message) for one bad input."""
    if name == "checker":
        return [str(checker_failing(tmp_path)), "--calib", calib], "fails onnx.checker"
    if name == "external data missing":
        return [str(missing_external(tmp_path)), "--calib", calib], "external data of"
    if name == "external data outside":
        return [str(escaping_external(tmp_path)), "--calib", calib], "outside its folder"
    if name == "non-images":
        (tmp_path / "text").mkdir()
        for i in range(3):
            (tmp_path / "text" / f"{i}.txt").write_text("not an image")
        return [model, "--calib", str(tmp_path / "text")], "no images or .npy/.npz files"
    if name == "corrupt png strict":
        folder = images(tmp_path / "img", 6)
        (folder / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
        return [model, "--calib", str(folder), "--strict", "--batch-size", "4"], "corrupt image"
    if name == "wrong image size":
        return [model, "--calib", str(images(tmp_path / "big", 6, size=10)), "--batch-size", "4"], "pass --size"
    if name == "inf data":
        x = random_inputs(16)
        x[5, 1, 2, 3] = np.inf
        (tmp_path / "inf").mkdir()
        np.save(tmp_path / "inf" / "x.npy", x)
        return [model, "--calib", str(tmp_path / "inf")], "NaN or Inf"
    if name == "unknown op":
        return [str(unknown_op(tmp_path)), "--calib", calib, "--batch-size", "16"], "onnxruntime cannot load"
    if name == "n:m with 0":
        return [model, "--calib", calib, "--pattern", "0:4"], "0 < N < M"
    raise AssertionError(name)


BAD = ["checker", "external data missing", "external data outside", "non-images", "corrupt png strict", "wrong image size", "inf data",
       "n:m with 0", "unknown op"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_line_and_writes_nothing(name, tmp_path, bn_model, calib_dir, capsys):
    argv, message = bad_case(name, tmp_path, str(bn_model), str(calib_dir))
    out = tmp_path / "out" / "result.onnx"
    out.parent.mkdir()
    inputs = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["repair", *argv, "-o", str(out), "--report", str(out.parent / "r.json"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert list(out.parent.iterdir()) == []
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == inputs


def test_corrupt_png_is_skipped_with_a_warning(tmp_path, bn_model):
    folder = images(tmp_path / "img", 6)
    (folder / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    out = tmp_path / "out.onnx"
    with pytest.warns(UserWarning, match="skipping corrupt image .*03.png"):
        code = main(["repair", str(bn_model), "--calib", str(folder), "-o", str(out), "--batch-size", "4",
                     "--report", str(tmp_path / "r.json"), "-q"])
    assert code == 0 and out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["calib_size"] == 5


@pytest.mark.parametrize("where", ["missing", "read-only", "a folder"])
def test_unwritable_output_folder(where, tmp_path, bn_model, calib_dir, capsys, monkeypatch):
    if where == "missing":
        out, message = tmp_path / "no" / "such" / "out.onnx", "does not exist"
    elif where == "a folder":
        (tmp_path / "taken.onnx").mkdir()
        out, message = tmp_path / "taken.onnx", "is a folder"
    else:
        (tmp_path / "ro").mkdir()
        out, message = tmp_path / "ro" / "out.onnx", "not writable"
        real = os.access  # root writes anywhere, so the permission check itself is what is tested
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out.parent) else real(p, mode))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_the_input_and_leaves_no_temporary_file(bn_model, calib_dir):
    before = bn_model.read_bytes()
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(bn_model), "--overwrite",
                 "--batch-size", "16", "-q"])
    assert code == 0 and bn_model.read_bytes() != before
    onnx.checker.check_model(str(bn_model))
    assert sorted(p.name for p in bn_model.parent.iterdir()) == sorted(["bn.onnx", "calib"])


def test_same_inputs_give_identical_model_and_report(bn_model, calib_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        argv = ["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--report", str(report),
                "--method", "asr", "--sparsity", "0.7", "--calib-size", "40", "--seed", "3", "--batch-size", "16",
                "--device", "cpu", "-q"]
        assert main(argv) == 0
        data = json.loads(report.read_text())
        del data["timings_s"]
        runs.append((out.read_bytes(), data))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    other = tmp_path / "c.onnx"  # and the seed matters: a different subset gives a different model
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(other), "--method", "asr",
                 "--sparsity", "0.7", "--calib-size", "40", "--seed", "4", "--batch-size", "16", "-q"]) == 0
    assert other.read_bytes() != runs[0][0]
