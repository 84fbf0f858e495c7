"""asr-onnx bench: structure, alternation, and that both models really run on the same batch."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import numpy_helper

from asr_onnx.calib import input_specs
from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError
from asr_onnx.prune.masks import nm_mask
from asr_onnx.verify.timing import alternating_schedule, bench, parse_input_shapes, random_feed


def conv_weights_edited(model, edit):
    """A copy of ``model`` with ``edit(weight)`` applied to every 4-D Conv weight."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv_weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    for i, init in enumerate(out.graph.initializer):
        if init.name in conv_weights:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init)), init.name))
    return out


def two_four(weight):
    if weight.shape[1] % 4:
        return weight
    return (weight * nm_mask(weight, 2, 4, axis=1)).astype(weight.dtype)


def halved(weight):
    return (weight * 0.5).astype(weight.dtype)


def ort_outputs(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_bench_alternates_and_runs_both_models_on_one_batch():
    dense, _ = zoo.bn_kept()
    pruned = conv_weights_edited(dense, halved)
    result = bench(pruned, dense, batch_size=3, threads=1, runs=5, warmup=1, seed=4)
    assert result["schedule"] == ["model", "reference", "reference", "model"] * 2 + ["model", "reference"]
    for stats in result["models"].values():
        lat, runs = stats["latency_ms"], stats["runs_ms"]
        assert len(runs) == 5 and all(t > 0 for t in runs)
        assert lat["min"] == min(runs) and lat["q1"] <= lat["median"] <= lat["q3"]
        assert lat["iqr"] == pytest.approx(lat["q3"] - lat["q1"])
        assert stats["throughput"] == pytest.approx(3 / (lat["median"] / 1e3))
        assert stats["provider"] == "CPUExecutionProvider"
    models = result["models"]
    assert result["speedup"] == pytest.approx(models["reference"]["latency_ms"]["median"]
                                              / models["model"]["latency_ms"]["median"])
    feed = random_feed(input_specs(dense), 3, seed=4)  # the oracle: both models on the same batch
    a, b = ort_outputs(pruned, feed)[0], ort_outputs(dense, feed)[0]
    assert result["output_rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-4)
    assert result["output_rel_l2"] > 1e-3
    assert result["settings"]["batch_size"] == 3 and result["settings"]["threads"] == 1


def test_bench_of_a_model_against_itself_has_identical_outputs_and_alone_has_no_ratio():
    dense, _ = zoo.bn_kept()
    assert bench(dense, dense, runs=2, warmup=0)["output_rel_l2"] == 0.0
    alone = bench(dense, runs=3, warmup=0)
    assert list(alone["models"]) == ["model"] and alone["schedule"] == ["model"] * 3
    assert alone["speedup"] is None and alone["output_rel_l2"] is None


def test_alternating_schedule_swaps_the_first_model_every_round():
    assert alternating_schedule(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_random_feed_fills_the_batch_axis_and_refuses_what_it_cannot_fill():
    model, _ = zoo.two_inputs()
    feed = random_feed(input_specs(model), 4, seed=0)
    assert feed["image"].shape == (4, 3, 8, 8) and feed["mask"].shape == (4, 1, 8, 8)
    assert np.array_equal(feed["image"], random_feed(input_specs(model), 4, seed=0)["image"])
    fixed, _ = zoo.fixed_batch_1()
    assert bench(fixed, runs=1, warmup=0, batch_size=1)["models"]["model"]["runs_ms"]
    with pytest.raises(AsrError, match="fixes a batch of 1; pass --batch-size 1"):
        bench(fixed, batch_size=2)
    free_height, _ = zoo.bn_kept()
    free_height.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(AsrError, match=r"non-batch axis that is not fixed \(N, 3, H, 8\)"):
        bench(free_height)


def test_a_reference_with_other_inputs_is_refused():
    dense, _ = zoo.bn_kept()
    other, _ = zoo.two_inputs()
    with pytest.raises(AsrError, match="different inputs"):
        bench(dense, other)


def test_trtexec_line_asks_for_sparse_kernels_only_for_a_24_model(tmp_path, monkeypatch):
    dense, _ = zoo.bn_kept()
    sparse = conv_weights_edited(dense, two_four)
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    onnx.save(sparse, tmp_path / "sparse.onnx")
    trt = bench(str(tmp_path / "sparse.onnx"), runs=1, warmup=0, batch_size=2)["trtexec"]
    assert trt["found"] == str(fake) and trt["sparse_24"]
    assert trt["command"].startswith(f"trtexec --onnx={tmp_path / 'sparse.onnx'} --shapes=input:2x3x8x8 --fp16")
    assert "--sparsity=enable" in trt["command"]
    dense_trt = bench(dense, runs=1, warmup=0)["trtexec"]
    assert not dense_trt["sparse_24"] and "--sparsity" not in dense_trt["command"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert bench(dense, runs=1, warmup=0)["trtexec"] == {"found": None, "sparse_24": False, "command": None}


def test_cli_bench_prints_both_models_and_json(tmp_path, capsys):
    dense, _ = zoo.bn_kept()
    onnx.save(dense, tmp_path / "dense.onnx")
    onnx.save(conv_weights_edited(dense, halved), tmp_path / "pruned.onnx")
    args = ["bench", str(tmp_path / "pruned.onnx"), "--reference", str(tmp_path / "dense.onnx"), "--runs", "3",
            "--warmup", "1", "--threads", "1", "--batch-size", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "model " in text and "reference " in text and "speed-up" in text and "TensorRT:" in text
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schedule"] == ["model", "reference", "reference", "model", "model", "reference"]
    assert result["models"]["reference"]["path"] == str(tmp_path / "dense.onnx")
    assert sorted(os.listdir(tmp_path)) == ["dense.onnx", "pruned.onnx"]  # nothing written


@pytest.mark.parametrize("case", ["missing", "corrupt", "other-inputs", "fixed-batch"])
def test_cli_bench_bad_input_is_one_error_line(case, tmp_path, capsys):
    dense, _ = zoo.bn_kept()
    onnx.save(dense, tmp_path / "dense.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    onnx.save(zoo.two_inputs()[0], tmp_path / "other.onnx")
    onnx.save(zoo.fixed_batch_1()[0], tmp_path / "fixed.onnx")
    args = {"missing": [str(tmp_path / "none.onnx")], "corrupt": [str(tmp_path / "corrupt.onnx")],
            "other-inputs": [str(tmp_path / "dense.onnx"), "--reference", str(tmp_path / "other.onnx")],
            "fixed-batch": [str(tmp_path / "fixed.onnx"), "--batch-size", "4"]}[case]
    assert main(["bench", *args, "--runs", "1"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == ""


def test_cli_bench_bad_usage_is_status_2(tmp_path, capsys):
    assert main(["bench", "m.onnx", "--runs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("values, expected", [
    (["images:[1,3,320,320]"], {"images": (1, 3, 320, 320)}),
    (["a:[2,3,8,8] b:[2,1,8,8]"], {"a": (2, 3, 8, 8), "b": (2, 1, 8, 8)}),  # one quoted value
    (["a:[2,3,8,8],b:[2,1,8,8]"], {"a": (2, 3, 8, 8), "b": (2, 1, 8, 8)}),
    (["a:[2, 3, 8, 8]", "b:[2,1,8,8]"], {"a": (2, 3, 8, 8), "b": (2, 1, 8, 8)}),  # repeated option
    (["a:2x3x8x8,b:2x1x8x8"], {"a": (2, 3, 8, 8), "b": (2, 1, 8, 8)}),  # trtexec's --shapes
    (["input:0:[1,4]"], {"input:0": (1, 4)}),  # a TensorFlow name keeps its colon
])
def test_parse_input_shapes_reads_polygraphys_and_trtexecs_syntax(values, expected):
    assert parse_input_shapes(values) == expected


@pytest.mark.parametrize("value, message", [
    ("images", "is not NAME:"),
    (":[1,3]", "is not NAME:"),
    ("images:[1,3,H,W]", "every axis needs a size"),
    ("images:[1,0,8]", "every axis needs a size"),
    ("images:[]", "every axis needs a size"),
    ("a:[1] a:[2]", "'a' twice"),
])
def test_parse_input_shapes_refuses_bad_entries(value, message):
    with pytest.raises(AsrError, match=message):
        parse_input_shapes([value])


def test_the_dynamic_hw_detector_matches_its_numpy_oracle_at_two_sizes():
    model, feeds = zoo.dynamic_hw_detector()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (feeds["images"], feeds["images"][:3, :, :7, :9]):
        got = session.run(None, {"images": np.ascontiguousarray(x)})[0]
        np.testing.assert_allclose(got, zoo.dynamic_hw_detector_oracle(model, x), rtol=1e-5, atol=1e-5)


def test_bench_times_a_dynamic_hw_model_at_the_given_shape():
    model, _ = zoo.dynamic_hw_detector()
    with pytest.raises(AsrError, match=r"not fixed \(batch, 3, height, width\); give every axis a size with "
                                       r"--input-shapes images:\[1,3,height,width\]"):
        bench(model, runs=1, warmup=0)
    result = bench(model, model, runs=2, warmup=0, input_shapes={"images": (2, 3, 32, 24)})
    assert result["settings"]["batch_size"] == 2 and result["output_rel_l2"] == 0.0
    feed = random_feed(input_specs(model), 2, seed=3, shapes={"images": (2, 3, 32, 24)})
    assert feed["images"].shape == (2, 3, 32, 24)
    np.testing.assert_array_equal(feed["images"], random_feed(input_specs(model), 2, seed=3,
                                                              shapes={"images": (2, 3, 32, 24)})["images"])


@pytest.mark.parametrize("shapes, batch_size, message", [
    ({"image": (2, 3, 8, 8), "mask": (4, 1, 8, 8)}, None, r"batches of \[2, 4\]"),
    ({"image": (2, 3, 8, 8)}, 4, "a batch of 2 but --batch-size is 4"),
    ({"picture": (1, 3, 8, 8)}, None, "'picture', not an input of the model .inputs: image, mask"),
    ({"image": (1, 3, 8)}, None, "gives 'image' 3 axes, but the input has 4"),
    ({"image": (1, 4, 8, 8)}, None, "gives 'image' 4 on axis 1, which the input fixes at 3"),
])
def test_bench_refuses_shapes_that_do_not_fit(shapes, batch_size, message):
    model, _ = zoo.two_inputs()
    with pytest.raises(AsrError, match=message):
        bench(model, runs=1, warmup=0, batch_size=batch_size, input_shapes=shapes)


@pytest.mark.parametrize("words", [
    ["--input-shapes", "image:[2,3,8,8]", "mask:[2,1,8,8]"],  # Polygraphy: one option, several words
    ["--input-shapes", "image:[2,3,8,8],mask:[2,1,8,8]"],
    ["--input-shapes", "image:[2,3,8,8]", "--input-shapes", "mask:[2,1,8,8]"],
    ["--input-shapes", "image:2x3x8x8", "mask:2x1x8x8", "--batch-size", "2"],
])
def test_cli_bench_input_shapes(words, tmp_path, capsys):
    onnx.save(zoo.two_inputs()[0], tmp_path / "two.onnx")
    for argv in ([str(tmp_path / "two.onnx"), *words], [*words, str(tmp_path / "two.onnx")]):  # model first or last
        assert main(["bench", *argv, "--runs", "1", "--warmup", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["settings"]["batch_size"] == 2


def test_cli_bench_of_a_dynamic_hw_model_hints_and_then_runs(tmp_path, capsys):
    onnx.save(zoo.dynamic_hw_detector()[0], tmp_path / "det.onnx")
    assert main(["bench", str(tmp_path / "det.onnx"), "--runs", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "--input-shapes images:[1,3,height,width]" in line
    assert main(["bench", str(tmp_path / "det.onnx"), "--runs", "2", "--input-shapes", "images:[1,3,64,48]"]) == 0
    assert "batch 1," in capsys.readouterr().out


@pytest.mark.parametrize("words, message", [
    (["--input-shapes", "images:[1,3,H,W]"], "every axis needs a size"),
    (["images:[1,3,8,8]"], "unexpected argument"),  # a shape without --input-shapes
    (["--input-shapes", "images:[1,3,8,8]", "other.onnx"], "unexpected argument"),
])
def test_cli_bench_input_shapes_bad_usage(words, message, tmp_path, capsys):
    onnx.save(zoo.dynamic_hw_detector()[0], tmp_path / "det.onnx")
    assert main(["bench", str(tmp_path / "det.onnx"), *words, "--runs", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
