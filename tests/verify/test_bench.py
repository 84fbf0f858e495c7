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
from asr_onnx.verify.timing import alternating_schedule, bench, random_feed


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
