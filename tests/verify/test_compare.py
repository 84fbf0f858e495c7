"""Output comparison: Polygraphy's tolerance rules, checked against Polygraphy itself, and `asr-onnx verify`."""

import json
import warnings

import numpy as np
import onnx
import pytest
from zoo import conv_net

from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError
from asr_onnx.verify.compare import compare_arrays
from asr_onnx.verify.fp16 import to_fp16

STATS = ["elemwise", "mean", "median", "max"]


def polygraphy_passes(a, b, atol, rtol, stat) -> bool:
    from polygraphy.comparator import CompareFunc, IterationResult
    from polygraphy.logger import G_LOGGER

    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # polygraphy < 0.50
        SimpleCompareFunc = CompareFunc.simple
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=stat)
    result = compare(IterationResult({"y": a}, runner_name="candidate"), IterationResult({"y": b}, runner_name="ref"))
    return bool(result["y"])


def test_verdicts_match_polygraphys_comparator():
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(40):
        b = rng.normal(size=(6, 5)).astype(np.float32)
        b[rng.random(b.shape) < 0.1] = 0  # zeros take Polygraphy's epsilon in the relative error
        a = (b + rng.normal(size=b.shape) * 10 ** rng.uniform(-7, -1)).astype(np.float32)
        atol, rtol = 10 ** rng.uniform(-6, -1), 10 ** rng.uniform(-6, 0)
        for stat in STATS:
            ours = compare_arrays("y", a, b, atol=atol, rtol=rtol, check_error_stat=stat).passed
            assert ours == polygraphy_passes(a, b, atol, rtol, stat), (stat, atol, rtol)
            verdicts.append(ours)
    assert any(verdicts) and not all(verdicts)  # both outcomes were exercised


def test_either_tolerance_is_enough_and_the_statistic_matters():
    b = np.array([[100.0, 1.0, 0.5, 2.0]], np.float32)
    a = b + np.array([[0.5, 1e-6, 0.0, 0.0]], np.float32)
    # element 0: abs 0.5 > atol but rel 0.005 <= rtol -> within; element 1: abs within
    assert compare_arrays("y", a, b, atol=1e-3, rtol=1e-2).passed
    r = compare_arrays("y", a, b, atol=1e-3, rtol=1e-3)
    assert not r.passed and r.mismatches == 1 and "1 of 4 elements" in r.reason
    # median abs error 5e-7 <= atol although the max is 0.5
    assert compare_arrays("y", a, b, atol=1e-3, rtol=1e-6, check_error_stat="median").passed
    assert not compare_arrays("y", a, b, atol=1e-3, rtol=1e-6, check_error_stat="max").passed
    assert r.max_absdiff == pytest.approx(0.5) and r.max_reldiff == pytest.approx(0.005)


def test_nan_fails_and_shapes_must_match():
    b = np.ones((2, 3), np.float32)
    a = b.copy()
    a[0, 0] = np.nan
    for stat in STATS:
        assert not compare_arrays("y", a, b, atol=1.0, rtol=1.0, check_error_stat=stat).passed
    with pytest.raises(AsrError, match="shape"):
        compare_arrays("y", np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(AsrError, match="statistic"):
        compare_arrays("y", b, b, check_error_stat="p99")


def test_top1_agreement_and_accuracy():
    b = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    a = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]], np.float32)
    r = compare_arrays("logits", a, b, labels=np.array([1, 0, 2, 1]))
    assert r.top1_agreement == 0.5
    assert r.accuracy == {"candidate": 0.5, "reference": 1.0}


def verify(*args):
    return main(["verify", *map(str, args), "--device", "cpu", "--batch-size", "16"])


def test_verify_cli_passes_on_the_same_model_and_gates_a_changed_one(bn_model, calib_dir, tmp_path, capsys):
    assert verify(bn_model, "--reference", bn_model, "--data", calib_dir) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "top-1 agreement 1.0000" in out and "compared 48 samples" in out

    changed = onnx.load(str(bn_model))
    weight = next(t for t in changed.graph.initializer if t.name == "fc.bias")
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full(10, 0.01, np.float32), "fc.bias"))
    onnx.save(changed, tmp_path / "changed.onnx")
    assert verify(tmp_path / "changed.onnx", "--reference", bn_model, "--data", calib_dir) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: verify FAILED: output logits")
    assert "FAILED" in captured.out
    # a shift of 0.01 on every logit: within atol 0.02, and the mean statistic agrees
    assert verify(tmp_path / "changed.onnx", "--reference", bn_model, "--data", calib_dir, "--atol", "0.02") == 0
    capsys.readouterr()
    assert verify(tmp_path / "changed.onnx", "--reference", bn_model, "--data", calib_dir, "--atol", "0.02",
                  "--check-error-stat", "mean", "--json", "--limit", "20") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["samples"] == 20
    (out,) = report["outputs"]
    assert out["mean_absdiff"] == pytest.approx(0.01, rel=1e-3) and out["top1_agreement"] is not None


def test_verify_cli_accepts_an_fp16_io_model(bn_model, calib_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = to_fp16(onnx.load(str(bn_model)), keep_io=False)
    onnx.save(half, tmp_path / "half.onnx")
    assert verify(tmp_path / "half.onnx", "--reference", bn_model, "--data", calib_dir) == 1
    capsys.readouterr()
    assert verify(tmp_path / "half.onnx", "--reference", bn_model, "--data", calib_dir, "--atol", "1e-2",
                  "--rtol", "1e-2") == 0


def test_verify_cli_refuses_models_with_different_inputs(bn_model, calib_dir, tmp_path, capsys):
    other = conv_net(channels=(3, 8, 16))
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if n == "input" else n for n in node.input]
    onnx.save(other, tmp_path / "other.onnx")
    assert verify(tmp_path / "other.onnx", "--reference", bn_model, "--data", calib_dir) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different inputs" in err


def test_a_fixed_batch_reference_is_compared_on_whole_batches_from_the_api(tmp_path):
    """compare_models, not only the CLI, cuts the data to whole batches of a model that fixes its batch."""
    from zoo import random_inputs

    from asr_onnx.calib import load_calib
    from asr_onnx.verify.compare import compare_models

    np.save(tmp_path / "x.npy", random_inputs(10, seed=4))
    model = conv_net(bn=True, batch=4)
    data = load_calib(tmp_path / "x.npy", model)
    result = compare_models(model, model, data, device="cpu", batch_size=16)
    assert result["passed"] and result["samples"] == 8
    np.save(tmp_path / "few.npy", random_inputs(3, seed=4))
    with pytest.raises(AsrError, match="3 samples, fewer than the model's fixed batch size 4"):
        compare_models(model, model, load_calib(tmp_path / "few.npy", model), device="cpu")


def shifted_model(bn_model, tmp_path, shift=0.01):
    """bn_model with every logit moved by ``shift``: outside the default tolerances, the same top-1 everywhere."""
    changed = onnx.load(str(bn_model))
    bias = next(t for t in changed.graph.initializer if t.name == "fc.bias")
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(10, shift, np.float32), "fc.bias"))
    onnx.save(changed, tmp_path / "shifted.onnx")
    return tmp_path / "shifted.onnx"


def test_verify_min_agreement_decides_alone_and_the_default_failure_says_why(bn_model, calib_dir, tmp_path, capsys):
    shifted = shifted_model(bn_model, tmp_path)
    assert verify(shifted, "--reference", bn_model, "--data", calib_dir) == 1
    captured = capsys.readouterr()
    (err,) = captured.err.strip().splitlines()
    assert "default tolerances (atol = rtol = 1e-05, elemwise) pass only a model that computes the same" in err
    assert "its top-1 agreement is 100.00%; gate it with --min-agreement" in err
    assert "gate it with --min-agreement" in captured.out
    assert verify(shifted, "--reference", bn_model, "--data", calib_dir, "--min-agreement", "0.99") == 0
    out = capsys.readouterr().out
    assert "(informative); gate: top-1 agreement >= 99.00%" in out
    assert "PASSED (outside the tolerances, which do not gate)" in out and "PASSED: 1 output(s)" in out
    assert verify(shifted, "--reference", bn_model, "--data", calib_dir, "--min-agreement", "0.99", "--json") == 0
    (output,) = json.loads(capsys.readouterr().out)["outputs"]
    assert output["passed"] and output["within_tolerance"] is False and output["agreement_passed"] is True


@pytest.mark.parametrize("extra, code, message", [
    (["--min-agreement", "0.99", "--atol", "1e-5"], 1, "every element within"),  # both gates: tolerances fail
    (["--min-agreement", "0.99", "--atol", "0.02"], 0, ""),  # both pass
    (["--min-agreement", "1", "--check-error-stat", "mean"], 1, "mean abs error"),
])
def test_verify_with_tolerances_given_both_gates_decide(bn_model, calib_dir, tmp_path, capsys, extra, code, message):
    shifted = shifted_model(bn_model, tmp_path)
    assert verify(shifted, "--reference", bn_model, "--data", calib_dir, *extra) == code
    err = capsys.readouterr().err
    assert (code == 0) == (err == "")
    assert "default tolerances" not in err  # they were given: no note


def test_verify_agreement_gate_fails_a_model_that_disagrees(bn_model, calib_dir, tmp_path, capsys):
    changed = onnx.load(str(bn_model))
    weight = next(t for t in changed.graph.initializer if t.name == "fc.weight")
    flipped = -onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(flipped, "fc.weight"))
    onnx.save(changed, tmp_path / "flipped.onnx")
    assert verify(tmp_path / "flipped.onnx", "--reference", bn_model, "--data", calib_dir,
                  "--min-agreement", "0.5") == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: verify FAILED: output logits: top-1 agreement ") and "< 50.00%" in err


@pytest.mark.parametrize("value, code, message", [
    ("1.5", 2, "--min-agreement"),
    ("nan", 2, "--min-agreement"),
    ("0.9", 1, "no output has a top-1 agreement"),  # a detector: nothing to gate on
])
def test_verify_min_agreement_bad_input(tmp_path, capsys, value, code, message):
    from zoo import detector_head

    dense, feeds = detector_head()
    onnx.save(dense, tmp_path / "det.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    assert verify(tmp_path / "det.onnx", "--reference", tmp_path / "det.onnx", "--data", tmp_path / "x.npy",
                  "--min-agreement", value) == code
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ") and message in err
