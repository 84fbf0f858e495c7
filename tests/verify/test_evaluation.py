"""Evaluation: top-1 on labelled data, agreement and logit error against a reference."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from zoo import conv_net, random_inputs

from asr_onnx.calib import InputSpec, load_calib
from asr_onnx.cli.main import main
from asr_onnx.verify.evaluation import evaluate

SPECS = [InputSpec("input", ("N", 3, 8, 8), np.float32)]


@pytest.fixture
def labelled(tmp_path):
    x = random_inputs(50, seed=3)
    logits = ort.InferenceSession(conv_net(bn=True).SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    y = logits.argmax(1)
    y[:10] = (y[:10] + 1) % 10  # exactly 10 of 50 wrong: 80% top-1
    np.savez(tmp_path / "eval.npz", x=x, y=y.astype(np.int64))
    return tmp_path / "eval.npz"


def test_top1_on_labelled_npz(labelled):
    result = evaluate(conv_net(bn=True), load_calib(labelled, SPECS), batch_size=16, device="cpu", progress=False)
    assert result == {"samples": 50, "top1": pytest.approx(0.8)}


def test_agreement_and_logit_error_against_reference(labelled):
    model, other = conv_net(bn=True), conv_net(bn=True, seed=5)
    data = load_calib(labelled, SPECS)
    same = evaluate(model, data, reference=model, batch_size=16, device="cpu", progress=False)
    assert same["agreement"] == 1.0 and same["logit_rel_l2"] == 0.0
    diff = evaluate(other, data, reference=model, batch_size=16, device="cpu", progress=False)
    a = ort.InferenceSession(other.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": data_x(labelled)})[0]
    b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": data_x(labelled)})[0]
    assert diff["agreement"] == pytest.approx((a.argmax(1) == b.argmax(1)).mean())
    assert diff["logit_rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-5)


def data_x(path):
    return np.load(path)["x"]


def test_eval_cli_json_and_label_free(labelled, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(conv_net(bn=True), model)
    assert main(["eval", str(model), "--data", str(labelled), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(0.8)
    unlabelled = tmp_path / "u"
    unlabelled.mkdir()
    np.save(unlabelled / "x.npy", data_x(labelled))
    assert main(["eval", str(model), "--data", str(unlabelled), "--reference", str(model), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agreement"] == 1.0 and "top1" not in out
    assert main(["eval", str(model), "--data", str(unlabelled), "-q"]) == 1
    assert "no labels" in capsys.readouterr().err


def test_agreement_scores_given_outputs_without_running_anything():
    """agreement() is pure: hand-made outputs, in two batches, against a numpy oracle."""
    from asr_onnx.model.kinds import output_kinds
    from asr_onnx.verify.evaluation import agreement

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 10)), rng.normal(size=(7, 10))
    labels = b.argmax(1)
    kinds = output_kinds(conv_net(bn=True))
    batches = [(4, [a[:4]]), (3, [a[4:]])]
    got = agreement(batches, kinds, labels, reference=[(4, [b[:4]]), (3, [b[4:]])], per_sample=True)
    assert got["samples"] == 7 and got["top1"] == pytest.approx((a.argmax(1) == labels).mean())
    assert got["agreement"] == pytest.approx((a.argmax(1) == b.argmax(1)).mean())
    assert got["logit_rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b))
    np.testing.assert_allclose(got["err2"], ((a - b) ** 2).sum(1))
    assert agreement(batches, kinds) == {"samples": 7}


def test_evaluate_is_agreement_of_logits(labelled):
    from asr_onnx.model.kinds import output_kinds
    from asr_onnx.verify.evaluation import agreement, logits

    model, other = conv_net(bn=True), conv_net(bn=True, seed=5)
    data = load_calib(labelled, SPECS)
    runs = [list(logits(m, data, batch_size=16, device="cpu", progress=False)) for m in (other, model)]
    assert [n for n, _ in runs[0]] == [16, 16, 16, 2]
    pure = agreement(runs[0], output_kinds(other), data.labels, runs[1])
    assert pure == evaluate(other, data, reference=model, batch_size=16, device="cpu", progress=False)


def test_the_standardised_error_weighs_every_channel_alike_and_pools_batches():
    """A (N, 3, 3, 3) map whose channel 0 is 1,000 times channel 1: a relative L2 error sees only channel 0,
    the standardised error sees each channel in units of the reference's spread (numpy oracle), and batches
    pool exactly; a constant channel is measured against the floored variance."""
    from asr_onnx.model.kinds import OutputKind
    from asr_onnx.verify.evaluation import agreement
    from asr_onnx.verify.scoring import VARIANCE_FLOOR

    rng = np.random.default_rng(4)
    b = rng.normal(size=(10, 3, 3, 3))
    b[:, 0] *= 1000
    b[:, 2] = 5.0  # constant: no spread
    a = b.copy()
    a[:, 1] += rng.normal(0, 0.5, size=(10, 3, 3))  # half a standard deviation of error on channel 1 only
    a[:, 2] += 0.01
    kinds = [OutputKind("map", None, None, False)]
    got = agreement([(6, [a[:6]]), (4, [a[6:]])], kinds, reference=[(6, [b[:6]]), (4, [b[6:]])], per_sample=True)
    var = b.transpose(1, 0, 2, 3).reshape(3, -1).var(1)
    var = np.maximum(var, VARIANCE_FLOOR * np.median(var))
    per_channel = ((a - b) ** 2).mean((0, 2, 3)) / var
    assert got["standardised_error"] == pytest.approx(np.sqrt(per_channel.mean()), rel=1e-9)
    assert got["output_kinds"] == {"map": "map"} and got["agreement"] is None and got["metric"] == "standardised_error"
    assert got["logit_rel_l2"] < 1e-3 < 0.2 < got["standardised_error"]
    per_sample = (((a - b) ** 2).mean((2, 3)) / var).mean(1)
    np.testing.assert_allclose(got["scores"].std_err2, per_sample, rtol=1e-9)
    whole = agreement([(10, [a])], kinds, reference=[(10, [b])], per_sample=True)
    assert whole["standardised_error"] == pytest.approx(got["standardised_error"], rel=1e-12)
