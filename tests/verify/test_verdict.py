"""The verdict (issue 29): usable, degraded or broken, from the score that matters, against stated thresholds."""

import pytest

from asr_onnx.verify.verdict import (
    AGREEMENT_USABLE,
    F1_BROKEN,
    F1_USABLE,
    STANDARDISED_BROKEN,
    STANDARDISED_USABLE,
    judge,
)


@pytest.mark.parametrize("metric, value, classes, label", [
    ("agreement", 0.95, 10, "usable"), ("agreement", 0.949, 10, "degraded"), ("agreement", 0.55, 10, "degraded"),
    ("agreement", 0.549, 10, "broken"), ("agreement", 0.76, 2, "degraded"), ("agreement", 0.74, 2, "broken"),
    ("detection_f1", 0.9, None, "usable"), ("detection_f1", 0.5, None, "degraded"),
    ("detection_f1", 0.49, None, "broken"), ("standardised_error", 0.2, None, "usable"),
    ("standardised_error", 0.8, None, "degraded"), ("standardised_error", 0.81, None, "broken")])
def test_labels_at_the_stated_thresholds(metric, value, classes, label):
    verdict = judge(metric, value, data="8 samples", classes=classes)
    assert verdict.label == label and verdict.metric == metric and verdict.value == value
    assert (verdict.suggestion is None) == (label == "usable")
    usable = {"agreement": AGREEMENT_USABLE, "detection_f1": F1_USABLE, "standardised_error": STANDARDISED_USABLE}
    assert verdict.threshold_usable == usable[metric]
    broken = {"agreement": 0.55 if classes == 10 else 0.75, "detection_f1": F1_BROKEN,
              "standardised_error": STANDARDISED_BROKEN}
    assert verdict.threshold_broken == pytest.approx(broken[metric])


def test_the_reason_and_the_suggestion_say_what_was_measured_and_what_to_try():
    settings = {"sparsity": 0.9, "pattern": "global", "reconstruct": "none", "exclude": [], "keep_last": False}
    verdict = judge("agreement", 0.641, data="64 held-out calibration samples", classes=4, settings=settings)
    assert verdict.label == "degraded"
    assert verdict.reason == ("top-1 agreement 64.1% against the dense model on 64 held-out calibration samples "
                              "(usable >= 95%, broken < 62%)")
    assert verdict.suggestion == ("try --reconstruct ls, a lower --sparsity (0.7), --pattern 2:4 (50%, in every "
                                  "group of 4) or leaving the head dense (--keep-last)")
    refitted = dict(settings, reconstruct="ls", keep_last=True, pattern="2:4", sparsity=0.5)
    assert judge("detection_f1", 0.3, data="x", settings=refitted, detector=True).suggestion == \
        "try unstructured pruning at 50%"
    line = judge("standardised_error", 0.9, data="x", settings=dict(settings, sparsity=0.6)).line()
    assert line.startswith("verdict: broken - standardised error 0.9 against the dense model on x (usable <= 0.2, "
                           "broken > 0.8); try --reconstruct ls, a lower --sparsity (0.5)")


def test_a_repair_is_judged_on_its_eval_data_else_the_guards_held_out_samples_else_its_calibration(tmp_path):
    import numpy as np
    import zoo

    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.pipeline.driver import Repair

    dense, feeds = zoo.bn_with_statistics(stale=False)
    np.save(tmp_path / "x.npy", feeds["input"])
    np.save(tmp_path / "e.npy", zoo.random_inputs(40, seed=9))
    calib = load_calib(tmp_path / "x.npy", input_specs(dense))
    guarded = Repair(dense, device="cpu", progress=False).prune(0.7).run(calib, "bn", guard="fallback")
    entry = guarded.settings["guard"]
    assert guarded.verdict.metric == "agreement" and guarded.verdict.value == entry[entry["kept"]]["agreement"]
    assert "96 held-out calibration samples (2 folds" in guarded.verdict.reason
    guarded.evaluate(load_calib(tmp_path / "e.npy", input_specs(dense)), name="e.npy")
    assert guarded.verdict.value == guarded.evaluation["agreement"] and "40 samples of e.npy" in guarded.verdict.reason
    unguarded = Repair(dense, device="cpu", progress=False).prune(0.7).run(calib, "bn")
    assert unguarded.verdict is None and "verdict" not in unguarded.report()  # nothing scored it, nothing ran
    unguarded.judge(calib)
    assert "the 96 calibration samples, not held out (the guard is off)" in unguarded.verdict.reason
    assert unguarded.report()["verdict"] == unguarded.verdict.as_dict()
    assert unguarded.verdict.threshold_broken == pytest.approx(0.6)  # 5 classes: half-way from chance (20%)


def test_a_detection_verdict_says_when_classes_rest_on_a_few_dense_detections():
    from asr_onnx.verify.detection import detection_scores
    from asr_onnx.verify.verdict import from_result

    # a frequent class found well, a rare one (2 dense detections) missed: the mean over classes is 0.48
    detection = detection_scores([[95, 2, 5], [0, 0, 2]])
    verdict = from_result({"metric": "detection_f1", "detection": detection}, data="9 images")
    assert verdict.label == "broken" and verdict.value == pytest.approx(190 / 197 / 2)
    assert verdict.reason.endswith("; 1 of its 2 classes rest on fewer than 5 dense detections each, pooled over "
                                   f"classes F1 {190 / 199:.3g}")
