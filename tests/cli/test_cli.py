"""The CLI end to end on real files: outputs, reports, and one-line errors that write nothing."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from zoo import make_model, random_inputs

from asr_onnx.cli.main import main


def outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_repair_writes_model_and_report(bn_model, calib_dir, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--method", "asr",
                 "--sparsity", "0.7", "--batch-size", "16", "--report", str(report), "-q", "--device", "cpu"])
    assert code == 0
    onnx.checker.check_model(str(out))
    data = json.loads(report.read_text())
    assert data["settings"]["method"] == "asr" and data["totals"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert {s["norm"] for s in data["sites"]} == {"bn", "folded"}
    site = data["sites"][1]
    assert len(site["reference_var"]) == site["channels"] == len(site["pruned_var"]) == len(site["gains"])
    assert site["lambda"] > 0 and site["gain"]["min"] <= site["gain"]["median"] <= site["gain"]["max"]
    assert {"prune", "measure_dense", "measure_pruned", "fold", "save"} <= set(data["timings_s"])
    assert data["onnxruntime"]["provider"] == "CPUExecutionProvider"


def test_default_output_name_and_input_untouched(folded_model, calib_dir, capsys):
    before = hashlib.sha256(folded_model.read_bytes()).hexdigest()
    assert main(["repair", str(folded_model), "--calib", str(calib_dir), "--batch-size", "16"]) == 0
    assert (folded_model.parent / "folded.repaired.onnx").exists()
    assert hashlib.sha256(folded_model.read_bytes()).hexdigest() == before
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("fixture", ["bn_model", "folded_model"])
def test_zero_sparsity_and_no_method_leaves_outputs_unchanged(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    out = tmp_path / "same.onnx"
    assert main(["repair", str(model), "--sparsity", "0", "--method", "none", "-o", str(out), "-q"]) == 0
    x = random_inputs(8)
    np.testing.assert_allclose(outputs(out, x), outputs(model, x), rtol=1e-6, atol=1e-6)


def no_prunable_model(path):
    nodes = [helper.make_node("Relu", ["input"], ["y"])]
    model = make_model(nodes, [], [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    onnx.save(model, path)


def bad_case(name, tmp_path, bn_model, calib_dir):
    """Returns (argv, message) for one bad input."""
    model, calib = str(bn_model), str(calib_dir)
    if name == "missing model":
        return [str(tmp_path / "nope.onnx"), "--calib", calib], "model not found"
    if name == "directory model":
        return [str(tmp_path), "--calib", calib], "not a file"
    if name == "empty model":
        (tmp_path / "empty.onnx").write_bytes(b"")
        return [str(tmp_path / "empty.onnx"), "--calib", calib], "empty"
    if name == "garbage model":
        (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 50)
        return [str(tmp_path / "junk.onnx"), "--calib", calib], "not a readable ONNX model"
    if name == "truncated model":
        (tmp_path / "cut.onnx").write_bytes(bn_model.read_bytes()[:300])
        return [str(tmp_path / "cut.onnx"), "--calib", calib], "not a readable ONNX model"
    if name == "empty calib":
        (tmp_path / "void").mkdir()
        return [model, "--calib", str(tmp_path / "void")], "no images or .npy/.npz"
    if name == "wrong shape":
        (tmp_path / "shape").mkdir()
        np.save(tmp_path / "shape" / "x.npy", np.zeros((4, 3, 9, 9), np.float32))
        return [model, "--calib", str(tmp_path / "shape")], "does not match"
    if name == "wrong dtype":
        (tmp_path / "dtype").mkdir()
        np.save(tmp_path / "dtype" / "x.npy", np.zeros((4, 3, 8, 8), np.complex64))
        return [model, "--calib", str(tmp_path / "dtype")], "dtype"
    if name == "nan data":
        (tmp_path / "nan").mkdir()
        x = random_inputs(16)
        x[3, 0, 0, 0] = np.nan
        np.save(tmp_path / "nan" / "x.npy", x)
        return [model, "--calib", str(tmp_path / "nan")], "NaN"
    if name == "no prunable layer":
        no_prunable_model(tmp_path / "relu.onnx")
        return [str(tmp_path / "relu.onnx"), "--calib", calib], "no prunable layer"
    if name == "sparsity 1":
        return [model, "--calib", calib, "--sparsity", "1.0"], "sparsity must be in"
    if name == "sparsity negative":
        return [model, "--calib", calib, "--sparsity", "-0.1"], "sparsity must be in"
    if name == "sparsity text":
        return [model, "--calib", calib, "--sparsity", "abc"], "sparsity must be a number"
    if name == "n >= m":
        return [model, "--calib", calib, "--pattern", "4:4"], "0 < N < M"
    if name == "calib smaller than batch":
        return [model, "--calib", calib, "--batch-size", "100"], "fewer than the batch size"
    raise AssertionError(name)


BAD = ["missing model", "directory model", "empty model", "garbage model", "truncated model", "empty calib",
       "wrong shape", "wrong dtype", "nan data", "no prunable layer", "sparsity 1", "sparsity negative",
       "sparsity text", "n >= m", "calib smaller than batch"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_line_and_writes_nothing(name, tmp_path, bn_model, calib_dir, capsys):
    argv, message = bad_case(name, tmp_path, bn_model, calib_dir)
    out = tmp_path / "out" / "result.onnx"
    out.parent.mkdir()
    before = hashlib.sha256(bn_model.read_bytes()).hexdigest()
    code = main(["repair", *argv, "-o", str(out), "--report", str(out.parent / "r.json"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert files(out.parent) == []
    assert hashlib.sha256(bn_model.read_bytes()).hexdigest() == before


def test_output_equal_to_input_is_refused(bn_model, calib_dir, capsys):
    before = bn_model.read_bytes()
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(bn_model), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err and bn_model.read_bytes() == before


def test_usage_error_is_one_line_with_status_2(capsys):
    assert main(["repair", "m.onnx", "--method", "magic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "magic" in err


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-c", "from asr_onnx.cli.main import main; raise SystemExit(main())",
                             "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "repair" in result.stdout


# issue 14.6: every bad option is one line with status 2 (usage), before any work
BAD_OPTIONS = [
    ("repair", ["--exclude", "conv("], "not a regular expression"),
    # issue 25: re.compile raises OverflowError and RecursionError too; every --exclude is compiled up front
    ("repair", ["--exclude", "conv", "--exclude", "a{99999999999}"], "not a regular expression"),
    ("repair", ["--exclude", "(" * 10000 + ")" * 10000], "not a regular expression"),
    ("repair", ["--seed", "-1"], "--seed"),
    ("stats", ["--seed", "-1"], "--seed"),
    ("sweep", ["--seed", "-1"], "--seed"),
    ("verify", ["--seed", "-1"], "--seed"),
    ("repair", ["--threads", "-2"], "--threads"),
    *((command, ["--batch-size", size], "--batch-size") for command in ("repair", "stats", "sweep", "eval", "verify")
      for size in ("0", "-4")),
    ("repair", ["--calib-size", "0"], "--calib-size"),
    ("repair", ["--reconstruct", "lsq"], "--reconstruct"),
    ("repair", ["--refit-samples", "-1"], "--refit-samples"),
    # issue 31: the output is int8 or float16, never both; --int8-target only with --int8
    ("repair", ["--int8", "--fp16"], "--int8 and --fp16 exclude each other"),
    ("repair", ["--int8", "--fp16-io"], "--int8 and --fp16 exclude each other"),
    ("repair", ["--int8-target", "tensorrt"], "--int8-target needs --int8"),
    ("repair", ["--int8", "--int8-target", "gpu"], "--int8-target"),
    ("stats", ["--calib-size", "0"], "--calib-size"),
    ("sweep", ["--calib-size", "0"], "--calib-size"),
    ("sweep", ["--eval-size", "0"], "--eval-size"),
    ("eval", ["--limit", "0"], "--limit"),
    ("verify", ["--atol", "nan"], "--atol"),
    ("verify", ["--rtol", "nan"], "--rtol"),
    ("verify", ["--atol", "-1e-3"], "--atol"),
    ("verify", ["--rtol", "-1"], "--rtol"),
]


def command_line(command, bn_model, calib_dir, tmp_path):
    model, calib = str(bn_model), str(calib_dir)
    return {"repair": ["repair", model, "--calib", calib, "-o", str(tmp_path / "o.onnx")],
            "stats": ["stats", model, "--calib", calib, "-o", str(tmp_path / "s.npz")],
            "sweep": ["sweep", model, "--calib", calib, "--eval", calib, "-o", str(tmp_path / "sweep")],
            "eval": ["eval", model, "--data", calib, "--reference", model],
            "verify": ["verify", model, "--reference", model, "--data", calib]}[command]


@pytest.mark.parametrize(("command", "option", "message"), BAD_OPTIONS)
def test_bad_option_is_one_usage_line_and_writes_nothing(command, option, message, bn_model, calib_dir, tmp_path,
                                                         capsys):
    before = files(tmp_path)
    assert main([*command_line(command, bn_model, calib_dir, tmp_path), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert files(tmp_path) == before


def test_sweep_output_that_is_an_existing_file_is_refused(bn_model, calib_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep")
    argv = command_line("sweep", bn_model, calib_dir, tmp_path)
    assert main([*argv[:-1], str(taken), "--sparsity", "0.5", "--method", "bn", "--batch-size", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an existing file" in err, err
    assert taken.read_text() == "keep"


def test_the_api_refuses_a_bad_regex_and_a_nan_tolerance():
    from zoo import DictSet, conv_net

    from asr_onnx.errors import AsrError
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.compare import compare_models

    model = conv_net(bn=True)
    for pattern in ("conv(", "a{99999999999}", "(" * 10000 + ")" * 10000):
        with pytest.raises(AsrError, match="not a regular expression"):
            Repair(model, progress=False).prune(0.5, exclude=[pattern])
    with pytest.raises(AsrError, match="atol must be a number >= 0"):
        compare_models(model, model, DictSet({"input": random_inputs(8)}), atol=float("nan"))

def test_repair_with_lamp_and_a_refit_reports_each_layer(bn_model, calib_dir, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--allocation", "lamp",
                 "--reconstruct", "ls", "--sparsity", "0.7", "--batch-size", "16", "--report", str(report), "-q",
                 "--device", "cpu", "--refit-samples", "32"])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["settings"]["allocation"] == "lamp" and data["settings"]["reconstruct"] == "ls"
    assert data["settings"]["refit_samples"] == 32
    refits = [layer["refit"] for layer in data["layers"]]
    assert all(set(r) == {"err_before", "err_after", "gram_size", "cond"} for r in refits)
    assert all(r["err_after"] <= r["err_before"] for r in refits)


def test_the_default_chooses_obs_masks_in_the_refit_and_magnitude_without_it(bn_model, calib_dir, tmp_path):
    """Issue 28: with the refit (the default) the masks are OBS's, with each layer's LAMP budget; pruning alone
    (--method none, no refit) and --reconstruct none rank by magnitude."""
    settings = {}
    for name, extra in (("default", []), ("alone", ["--method", "none"]), ("stats", ["--reconstruct", "none"])):
        report = tmp_path / f"{name}.json"
        code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(tmp_path / f"{name}.onnx"),
                     "--sparsity", "0.7", "--batch-size", "16", "--report", str(report), "-q", "--device", "cpu",
                     "--guard", "off", *extra])
        assert code == 0
        settings[name] = json.loads(report.read_text())
    assert settings["default"]["settings"]["score"] == "obs"
    assert settings["alone"]["settings"]["score"] == settings["stats"]["settings"]["score"] == "magnitude"
    default = onnx.load(str(tmp_path / "default.onnx"))
    alone = onnx.load(str(tmp_path / "alone.onnx"))
    zeros = {name: {t.name: int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in model.graph.initializer
                    if len(t.dims) == 4} for name, model in (("default", default), ("alone", alone))}
    assert zeros["default"] == zeros["alone"]  # the same budget per layer, placed by OBS
    moved = [name for name in zeros["alone"]
             if not np.array_equal(*(onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))
                                     == 0 for m in (default, alone)))]
    assert moved


def test_the_rownorm_score_needs_no_data_and_reaches_the_report(bn_model, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["repair", str(bn_model), "--method", "none", "--score", "rownorm", "--allocation", "lamp",
                 "--sparsity", "0.6", "-o", str(out), "--report", str(report), "-q", "--device", "cpu"])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["settings"]["score"] == "rownorm"
    assert {layer["score"] for layer in data["layers"] if layer["pruned"]} == {"rownorm"}


def test_reconstruct_needs_calibration_data(bn_model, tmp_path, capsys):
    code = main(["repair", str(bn_model), "--method", "none", "--reconstruct", "ls", "-o", str(tmp_path / "o.onnx")])
    assert code == 1 and "--calib is required for --reconstruct ls" in capsys.readouterr().err
    assert files(tmp_path) == ["bn.onnx"]


def test_repair_with_reconstruct_auto_prints_and_reports_the_pick(bn_model, calib_dir, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--reconstruct", "auto",
                 "--sparsity", "0.9", "--batch-size", "16", "--report", str(report), "--device", "cpu"])
    assert code == 0 and out.exists()
    settings = json.loads(report.read_text())["settings"]
    entry = settings["reconstruct_auto"]
    assert settings["reconstruct"] == "auto" and [c["reconstruct"] for c in entry["candidates"]] == ["none", "ls"]
    assert entry["picked"] in entry["candidates"] and entry["held_out"] == 48 and entry["folds"] == 2
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reconstruct auto picked")]
    assert printed == [f"reconstruct auto picked {entry['picked']['reconstruct']} on 48 held-out calibration "
                       f"samples (2 folds, scored with bn)"]


@pytest.mark.parametrize("option, folds", [("--reconstruct", 2), ("--method", 4)])
def test_auto_on_a_fixed_batch_that_the_folds_cannot_cut_is_one_error_line(option, folds, tmp_path, capsys):
    from zoo import conv_net

    onnx.save(conv_net(bn=True, batch=8), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", random_inputs(20))
    code = main(["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"),
                 option, "auto", "--sparsity", "0.8", "-q", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"error: the model fixes its batch at 8, and 20 calibration samples do not cut into "
                                 f"{folds} held-out parts of whole batches; give a multiple of {8 * folds} samples"]
    assert files(tmp_path) == ["m.onnx", "x.npy"]


def test_a_layer_emptied_by_one_global_threshold_is_named_and_lamp_suggested(tmp_path, capsys):
    """Issue 30: one |w| threshold empties a layer whose weights are small for a reason the network ignores (a BN
    after it rescales them), silently; the repair cannot bring it back. The run says so and names it; LAMP,
    which never empties a layer, gives no such line."""
    from zoo import conv_net

    model = conv_net(bn=True)
    small = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    small.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(small) * 1e-3, small.name))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    args = ["repair", str(path), "--method", "none", "--sparsity", "0.75", "-q", "-o", str(tmp_path / "o.onnx")]
    assert main(args + ["--allocation", "global"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: one global threshold left 1 layer(s)") and "conv2 100.0%" in err
    assert "--allocation lamp" in err and len(err.splitlines()) == 1
    assert main(args + ["--overwrite"]) == 0  # the default is LAMP
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["2:4", "channels"])
def test_an_allocation_with_a_pattern_that_fixes_each_layers_sparsity_is_refused(pattern, bn_model, capsys):
    """Issue 30: --allocation lamp with --pattern 2:4 was ignored without a word."""
    assert main(["repair", str(bn_model), "--pattern", pattern, "--allocation", "lamp", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--allocation lamp" in err and len(err.splitlines()) == 1
    assert not (bn_model.parent / "bn.repaired.onnx").exists()
