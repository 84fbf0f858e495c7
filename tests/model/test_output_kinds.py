"""eval and verify on non-classifiers (issue 17, point 6): the batch axis of a time-first output, and no
argmax "agreement" over a detector's mixed box and score values."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

from asr_onnx.calib import input_specs, load_calib
from asr_onnx.cli.main import main
from asr_onnx.model.kinds import PER_STEP
from asr_onnx.pipeline.driver import Repair
from asr_onnx.verify.compare import compare_models
from asr_onnx.verify.evaluation import evaluate


def _calib(tmp_path, model, x):
    np.save(tmp_path / "x.npy", x)
    return load_calib(tmp_path / "x.npy", input_specs(model))


def _pruned(model):
    return Repair(model, device="cpu", progress=False).prune(0.6).pruned


def _oracle_step_agreement(pruned, dense, x):
    """numpy: per sample, the fraction of time steps whose argmax class agrees; (T, N, C) is time first."""
    a, b = zoo.time_first_oracle(pruned, x), zoo.time_first_oracle(dense, x)
    return (a.argmax(-1) == b.argmax(-1)).mean(0).mean(), np.sqrt(((a - b) ** 2).sum() / (b**2).sum())


@pytest.mark.parametrize("batch", ["N", 1])
def test_a_time_first_output_counts_samples_and_agrees_per_step(tmp_path, batch):
    dense, feeds = zoo.time_first_recogniser(batch)
    x = feeds["input"]
    pruned = _pruned(dense)
    data = _calib(tmp_path, dense, x)
    result = evaluate(pruned, data, reference=dense, device="cpu", progress=False, batch_size=5)
    want_agreement, want_error = _oracle_step_agreement(pruned, dense, x.astype(np.float64))
    assert result["samples"] == len(x) == zoo.N  # not T * N
    assert result["agreement_kind"] == PER_STEP
    assert 0 < want_agreement < 1  # the pruning changed some decisions: the figure can fail
    assert result["agreement"] == pytest.approx(want_agreement, abs=1e-9)
    assert result["logit_rel_l2"] == pytest.approx(want_error, rel=1e-4)
    compared = compare_models(pruned, dense, data, batch_size=5 if batch == "N" else 1, device="cpu")
    (out,) = compared["outputs"]
    assert compared["samples"] == zoo.N and out["batch_axis"] == 1 and out["shape"][1] == zoo.N
    assert out["top1_agreement"] == pytest.approx(want_agreement, abs=1e-9)


def test_a_detector_output_reports_only_the_relative_error(tmp_path):
    dense, feeds = zoo.detector_head()
    x = feeds["input"]
    pruned = _pruned(dense)
    data = _calib(tmp_path, dense, x)
    result = evaluate(pruned, data, reference=dense, device="cpu", progress=False)
    a, b = (ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0].astype(np.float64)
            for m in (pruned, dense))
    assert a.shape == (zoo.N, 22, 64)
    assert result["samples"] == zoo.N and result["agreement"] is None and "neither" in result["agreement_kind"]
    assert result["logit_rel_l2"] == pytest.approx(np.sqrt(((a - b) ** 2).sum() / (b**2).sum()), rel=1e-5)
    per_sample = np.sqrt(((a - b) ** 2).sum((1, 2)) / (b**2).sum((1, 2)))
    assert result["max_rel_l2"] == pytest.approx(per_sample.max(), rel=1e-5)
    (out,) = compare_models(pruned, dense, data, device="cpu")["outputs"]
    assert out["top1_agreement"] is None and out["max_sample_rel_l2"] == pytest.approx(per_sample.max(), rel=1e-5)


def test_eval_and_verify_cli_on_a_time_first_recogniser(tmp_path, capsys):
    dense, feeds = zoo.time_first_recogniser()
    dense_path, pruned_path = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    onnx.save(dense, dense_path)
    onnx.save(_pruned(dense), pruned_path)
    np.save(tmp_path / "x.npy", feeds["input"])
    assert main(["eval", str(pruned_path), "--data", str(tmp_path / "x.npy"), "--reference", str(dense_path),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert f"samples {zoo.N} " in out and "per step" in out
    assert main(["verify", str(pruned_path), "--reference", str(dense_path), "--data", str(tmp_path / "x.npy")]) == 1
    out = capsys.readouterr().out
    assert f"compared {zoo.N} samples" in out and "top-1 agreement" in out and "per step" in out
