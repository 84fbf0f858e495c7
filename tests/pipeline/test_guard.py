"""The guard (issue 17, point 2): the repair scored against pruning alone on held-out calibration samples,
checked against an oracle: both models evaluated on fresh samples the guard never saw. And point 4: a
default batch size adapts to a small calibration set."""

import json

import numpy as np
import onnx
import pytest
import zoo

from asr_onnx.calib import input_specs, load_calib
from asr_onnx.cli.main import main
from asr_onnx.pipeline.driver import Repair
from asr_onnx.pipeline.guard import warning_line
from asr_onnx.verify.evaluation import evaluate

RUNNING = {"reference": "running"}  # a BN's correction restores its running statistics
KEYS = {"mode", "held_out", "repair", "pruned", "verdict", "kept", "cost_s"}


def _set(folder, name, model, x):
    np.save(folder / f"{name}.npy", x)
    return load_calib(folder / f"{name}.npy", input_specs(model))


def _fresh_errors(job, model, tmp_path):
    """The oracle: relative error against dense of the unguarded repair and of pruning alone, on new samples."""
    fresh = _set(tmp_path, "fresh", model, zoo.random_inputs(200, seed=99))
    return [evaluate(m, fresh, reference=model, device="cpu", progress=False)["logit_rel_l2"] for m in job]


def test_the_guard_catches_a_repair_worse_than_pruning_alone_and_falls_back(tmp_path):
    dense, feeds = zoo.bn_with_statistics(stale=True)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    # restoring the stale BN's own running statistics (not the default reference) moves the repair away
    warned = Repair(dense, device="cpu", progress=False).prune(0.3).run(calib, "bn", guard="warn", **RUNNING)
    kept = Repair(dense, device="cpu", progress=False).prune(0.3).run(calib, "bn", guard="fallback", **RUNNING)
    repair_err, pruned_err = _fresh_errors([warned.output, warned.pruned], dense, tmp_path)
    assert repair_err > 2 * pruned_err  # the oracle: on fresh samples the repair is clearly worse
    entry = kept.settings["guard"]
    assert KEYS <= set(entry) and entry["held_out"] == len(calib) and entry["cost_s"] > 0
    assert entry["verdict"] == "pruning alone better" and entry["kept"] == "pruned"
    assert entry["repair"]["logit_rel_l2"] > entry["pruned"]["logit_rel_l2"]
    assert kept.output.SerializeToString() == kept.pruned.SerializeToString()
    assert warned.settings["guard"]["verdict"] == "pruning alone better"
    assert warned.settings["guard"]["kept"] == "repair" and warned.output is not warned.pruned


def test_when_the_correction_spoils_a_refit_the_guard_ships_the_refit_alone(tmp_path):
    """The refit is good, the correction after it (towards stale running statistics) is not: the guard, which
    lost the repair to pruning alone, scores the refit alone refitted on each half, and ships the refit alone,
    the better of the three on fresh samples (the oracle)."""
    dense, feeds = zoo.bn_with_statistics(stale=True)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    warned = Repair(dense, device="cpu", progress=False).prune(0.3)
    warned.run(calib, "bn", reconstruct="ls", guard="warn", **RUNNING)  # keeps the repair: all three to score
    entry = warned.settings["guard"]
    assert entry["refit_in_repair_passes"] and entry["repair_loses"] and entry["best"] == "refit"
    assert entry["kept"] == "repair" and warned.output is not warned.pruned  # fallback ships warned.pruned (CLI test)
    refit_err, repair_err, pruned_err = _fresh_errors([warned.pruned, warned.output, warned.pruned_alone], dense,
                                                      tmp_path)
    assert refit_err < min(repair_err, pruned_err)


def test_the_guard_keeps_a_repair_that_is_better(tmp_path):
    dense, feeds = zoo.bn_with_statistics(stale=False)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    job = Repair(dense, device="cpu", progress=False).prune(0.7).run(calib, "bn", guard="fallback")
    repair_err, pruned_err = _fresh_errors([job.output, job.pruned], dense, tmp_path)
    assert repair_err < pruned_err / 2  # the oracle
    entry = job.settings["guard"]
    assert entry["verdict"] == "repair better" and entry["kept"] == "repair" and job.output is not job.pruned
    assert entry["repair"]["agreement"] > entry["pruned"]["agreement"]


def test_the_guard_on_a_raw_detector_map_scores_the_standardised_error(tmp_path):
    """A raw conv map (N, 22, 64) with negative "scores" is no head it can decode: no agreement, no detection F1,
    the standardised error decides (issue 29)."""
    dense, feeds = zoo.detector_head()
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    entry = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", guard="warn").settings["guard"]
    assert entry["repair"]["agreement"] is None and entry["pruned"]["agreement"] is None
    assert entry["metric"] == "standardised_error" and entry["repair"]["detection_f1"] is None
    assert entry["verdict"] in ("repair better", "pruning alone better", "tie")
    assert entry["repair"]["logit_rel_l2"] > 0 and entry["pruned"]["logit_rel_l2"] > 0
    assert entry["repair"]["standardised_error"] > 0 and entry["pruned"]["standardised_error"] > 0


@pytest.mark.parametrize("refit", [False, True])
def test_cli_warns_in_one_line_and_reports_the_guard(tmp_path, capsys, refit):
    """A correction towards stale running statistics loses on held-out samples: without the refit the guard
    keeps pruning alone; with it (the default), the refit alone, which the correction made worse."""
    dense, feeds = zoo.bn_with_statistics(stale=True)
    onnx.save(dense, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    argv = ["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--sparsity", "0.3",
            "--reference", "running", "--device", "cpu", "-q"] + ([] if refit else ["--reconstruct", "none"])
    assert main(argv + ["-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ") and "held-out" in line]
    kept = "kept the refit without it" if refit else "kept the pruned model"
    assert len(warnings) == 1 and kept in warnings[0]
    guard = json.loads((tmp_path / "r.json").read_text())["settings"]["guard"]
    assert guard["mode"] == "fallback" and guard["kept"] == ("refit" if refit else "pruned")  # the CLI's default
    assert guard["repair_loses"] and ("refit" in guard) == refit
    if refit:  # the refit alone is the better of the three on held-out samples
        assert guard["refit"]["logit_rel_l2"] < min(guard["pruned"]["logit_rel_l2"], guard["repair"]["logit_rel_l2"])
        assert "the refit alone kept by the guard" in json.dumps(json.loads((tmp_path / "r.json").read_text())["verdict"])
    assert main(argv + ["-o", str(tmp_path / "off.onnx"), "--guard", "off"]) == 0
    assert "held-out" not in capsys.readouterr().err


@pytest.mark.parametrize("given", [None, "64"])
def test_a_default_batch_size_adapts_to_a_small_calibration_set(tmp_path, capsys, given):
    dense, feeds = zoo.bn_with_statistics(stale=False)
    onnx.save(dense, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"][:32])
    argv = ["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"),
            "--report", str(tmp_path / "r.json"), "--device", "cpu", "-q"] + (["--batch-size", given] if given else [])
    code = main(argv)
    if given is None:
        assert code == 0
        assert json.loads((tmp_path / "r.json").read_text())["settings"]["batch_size"] == 32
    else:  # only a batch size the user gave refuses the small set
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err == ["error: the calibration set has 32 samples, fewer than the batch size 64"]
        assert not (tmp_path / "o.onnx").exists()


def test_too_few_samples_to_hold_out_says_so_in_one_warning(tmp_path, capsys):
    dense, feeds = zoo.bn_with_statistics(stale=False)
    onnx.save(dense, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"][:3])
    assert main(["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: the guard did not run: 3 calibration samples are too few to hold any out"]
    guard = json.loads((tmp_path / "r.json").read_text())["settings"]["guard"]
    assert guard["held_out"] == 0 and guard["kept"] == "repair"


def test_the_guard_refits_the_candidate_auto_picked(tmp_path):
    dense, feeds = zoo.bn_with_statistics(stale=True)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    job = Repair(dense, device="cpu", progress=False).prune(0.3).run(calib, "auto", guard="fallback", **RUNNING)
    assert job.settings["method"] == "auto" and job.settings["auto"]["picked"]["method"] == "bn"
    assert job.settings["guard"]["verdict"] == "pruning alone better" and job.output is job.pruned


@pytest.mark.parametrize("shift, scale, repair_kept", [(1.5, 5.0, False), (1.2, 4.0, True)])
def test_within_noise_the_repair_is_kept_only_when_its_held_out_error_is_lower(tmp_path, shift, scale, repair_kept):
    """Issue 17: the SE MobileNetV3 classifier at 2:4 in one small graph. A mildly stale BN and 12 calibration
    samples: neither agreement nor error differs past two paired standard errors. The burden of proof is on
    the repair: with the higher held-out error (and no lower agreement, as there) it falls back, and fresh
    samples confirm it is worse; with the lower error it is kept, and is not worse on fresh samples."""
    dense, feeds = zoo.bn_with_statistics(stale=True, n=12, shift=shift, scale=scale)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    job = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", guard="fallback", **RUNNING)
    unguarded = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", **RUNNING).output
    repair_err, pruned_err = _fresh_errors([unguarded, job.pruned], dense, tmp_path)
    entry = job.settings["guard"]
    held_out = entry["repair"]["logit_rel_l2"], entry["pruned"]["logit_rel_l2"]
    assert entry["verdict"] == "tie" and entry["repair_loses"] is not repair_kept
    if repair_kept:
        assert held_out[0] < held_out[1] and entry["kept"] == "repair" and job.output is not job.pruned
        assert repair_err < pruned_err  # the oracle
        assert warning_line(entry) is None
        return
    assert held_out[0] > held_out[1] and entry["repair"]["agreement"] >= entry["pruned"]["agreement"]
    assert entry["kept"] == "pruned" and job.output is job.pruned
    assert repair_err > 1.2 * pruned_err  # the oracle
    line = warning_line(entry)
    assert line.startswith("warning: on 12 held-out calibration samples the repair is no better than pruning alone")
    assert "within noise" in line and line.endswith("kept the pruned model (--guard fallback)")


def test_the_baseline_is_the_model_as_pruned_and_a_refit_worse_than_it_falls_back_to_it(tmp_path):
    """The least-squares refit can make a model worse than pruning alone: one Gemm with 12 inputs, refitted on
    12 samples, overfits them. The guard refits its probes on each fit half (a refit on the whole set has seen
    the held-out half), compares them with the model as pruned, never refitted, and falls back to that."""
    dense, _ = zoo.one_layer("gemm")
    x = np.random.default_rng(7).normal(0, 1, (12, 12)).astype(np.float32)
    calib = _set(tmp_path, "calib", dense, x)
    job = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", reconstruct="ls", guard="fallback")
    unguarded = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", reconstruct="ls")
    raw = Repair(dense, device="cpu", progress=False).prune(0.5).pruned
    assert job.pruned_alone.SerializeToString() == raw.SerializeToString() != job.pruned.SerializeToString()
    fresh = _set(tmp_path, "fresh", dense, np.random.default_rng(99).normal(0, 1, (300, 12)).astype(np.float32))
    repair_err, pruned_err, refit_err = [evaluate(m, fresh, reference=dense, device="cpu", progress=False)
                                         ["logit_rel_l2"] for m in (unguarded.output, raw, job.pruned)]
    assert repair_err > 1.3 * pruned_err and refit_err > 1.3 * pruned_err  # the oracle: the refit hurts
    entry = job.settings["guard"]
    on_calib = [evaluate(m, calib, reference=dense, device="cpu", progress=False)["logit_rel_l2"]
                for m in (raw, job.pruned)]
    assert entry["pruned"]["logit_rel_l2"] == pytest.approx(on_calib[0], rel=1e-6) != on_calib[1]
    assert entry["repair_refitted"] and entry["verdict"] == "pruning alone better" and entry["kept"] == "pruned"
    assert entry["refit_in_repair_passes"]  # one layer: its fold refits are exactly refits on each half
    assert job.output is job.pruned_alone


def test_the_fold_refits_come_from_the_repair_passes_and_equal_refits_of_each_half_on_one_layer(tmp_path):
    """The guard's fold models are solved from the repair's own Gram sums of each half: for one layer (no upstream
    refit) they are the refits of each half, so the guard scores what it scored when it refitted each half."""
    dense, _ = zoo.one_layer("gemm")
    calib = _set(tmp_path, "calib", dense, np.random.default_rng(7).normal(0, 1, (40, 12)).astype(np.float32))
    job = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", reconstruct="ls", guard="warn")
    from_passes = job.settings["guard"]
    assert from_passes["refit_in_repair_passes"] and job.held_out_refits is not None
    job.held_out_refits = None  # the same repair, the guard refitting each half from the model as pruned
    halves = job.guard(calib, "warn", seed=0).settings["guard"]
    assert not halves["refit_in_repair_passes"]
    for key in ("logit_rel_l2", "agreement"):
        assert halves["repair"][key] == pytest.approx(from_passes["repair"][key], rel=1e-4)


def test_on_a_refit_subset_each_fold_model_is_refitted_on_the_subset_outside_its_held_out_half(tmp_path):
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.refit.reconstruct import reconstruct

    dense, _ = zoo.one_layer("gemm")
    calib = _set(tmp_path, "calib", dense, np.random.default_rng(7).normal(0, 1, (40, 12)).astype(np.float32))
    job = Repair(dense, device="cpu", progress=False).prune(0.5).run(calib, "bn", reconstruct="ls", guard="warn",
                                                                      refit_samples=30)
    assert job.settings["guard"]["refit_in_repair_passes"]
    subset, halves = calib.take_across_folds(30, 2, 0), [held for _, held in calib.folds(2, 0)]
    for k, model in enumerate(job.held_out_refits.models):
        oracle = reconstruct(dense, job.pruned_alone, subset.within(halves[1 - k]), batch_size=8, device="cpu")[0]
        (got,), (want,) = (find_layers(to_graph(m)) for m in (model, oracle))
        np.testing.assert_allclose(got.weight.values, want.weight.values, rtol=1e-4, atol=1e-6)
        assert len(subset.within(halves[1 - k])) == 15


@pytest.mark.parametrize("shift, scale", [(1.0, 3.0), pytest.param(2.0, 9.0, marks=pytest.mark.slow)])
def test_the_guard_never_keeps_a_detector_repair_with_a_lower_held_out_detection_f1(tmp_path, shift, scale):
    """Issue 29: a YOLO-style detector whose class branch's BN running statistics are stale. Restoring them
    (reference running) repairs the boxes, which in pixels dominate the raw output, so the repair's relative
    error and even its standardised error are the lower; but it loses the dense model's detections. The guard
    decides on held-out detection F1 and falls back, and fresh samples confirm the repair finds fewer."""
    dense, feeds = zoo.detector_with_statistics(stale=("cls_",), shift=shift, scale=scale)
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    job = Repair(dense, device="cpu", progress=False).prune(0.3).run(calib, "bn", guard="fallback", **RUNNING)
    entry = job.settings["guard"]
    repair, pruned = entry["repair"], entry["pruned"]
    assert entry["metric"] == "detection_f1" and repair["agreement"] is None
    assert repair["logit_rel_l2"] < pruned["logit_rel_l2"]  # the raw error would have kept the repair
    assert repair["detection_f1"] < pruned["detection_f1"]
    assert entry["repair_loses"] and entry["kept"] == "pruned" and job.output is job.pruned_alone
    assert "detection F1" in warning_line(entry)
    unguarded = Repair(dense, device="cpu", progress=False).prune(0.3).run(calib, "bn", **RUNNING).output
    fresh = _set(tmp_path, "fresh", dense, zoo._feed((3, 16, 16), n=200, seed=77))
    f1 = [evaluate(m, fresh, reference=dense, device="cpu", progress=False)["detection"]["f1"]
          for m in (unguarded, job.pruned_alone)]
    assert f1[0] < f1[1]  # the oracle: on fresh samples the repair finds fewer of the dense model's detections
    assert job.verdict.metric == "detection_f1" and job.verdict.value == pruned["detection_f1"]


@pytest.mark.parametrize("build", [lambda: zoo.yolo_detector(False, n=64),
                                   pytest.param(lambda: zoo.ssd_detector(n=64), marks=pytest.mark.slow)],
                         ids=["yolov5", "ssd"])
@pytest.mark.parametrize("reconstruct", zoo.slow_except(["none", "ls"], ["none"]))
def test_a_kept_detector_repair_never_has_the_lower_held_out_f1(tmp_path, build, reconstruct):
    dense, feeds = build()
    calib = _set(tmp_path, "calib", dense, feeds["input"])
    for sparsity in (0.5, 0.9):
        job = Repair(dense, device="cpu", progress=False).prune(sparsity).run(calib, "bn", reconstruct=reconstruct,
                                                                            guard="fallback")
        entry = job.settings["guard"]
        assert entry["metric"] == "detection_f1"
        if entry["kept"] == "repair":
            assert entry["repair"]["detection_f1"] >= entry["pruned"]["detection_f1"]
        else:
            assert job.output is job.pruned_alone
