"""The Repair pipeline's own choices: which sites the dense pass measures, what auto picks, and pick's rule."""

import numpy as np
import onnx
import pytest
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import merge_all
from asr_onnx.pipeline.driver import Repair


def test_dense_pass_measures_only_the_sites_without_a_bn_under_the_running_reference():
    """With reference="running" a real BN's reference is its running statistics, so only BN-less sites
    need the dense pass; the default, "calib", measures them all."""
    calib = ArraySet(random_inputs(32))
    lean = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    lean.measure(calib, reference="running")
    virtual = {s.key for s in lean.measurement.sites if s.bn is None}
    assert virtual and set(lean.measurement.dense) == virtual != {s.key for s in lean.measurement.sites}
    default = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7).measure(calib)
    assert set(default.measurement.dense) == {s.key for s in default.measurement.sites}
    assert all(site["reference"] == "dense calibration statistics" for site in default.report()["sites"])
    full = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    full.measure(calib, all_dense=True, reference="running")
    assert set(full.measurement.dense) == {s.key for s in full.measurement.sites}
    for key in virtual:
        np.testing.assert_allclose(lean.measurement.dense[key].var, full.measurement.dense[key].var, rtol=1e-5)
    a = lean.correct("asr").fold().output.graph.initializer
    b = {t.name: t for t in full.correct("asr").fold().output.graph.initializer}
    for tensor in a:  # the same repair, up to float32 rounding in a different statistics graph
        np.testing.assert_allclose(onnx.numpy_helper.to_array(tensor), onnx.numpy_helper.to_array(b[tensor.name]),
                                   rtol=1e-4, atol=1e-6)
    sites = lean.report()["sites"]
    assert all(("dense_var" in site) == (site["tensor"] in virtual) for site in sites)
    assert all(site["reference"] == "bn running statistics" for site in sites if site["tensor"] not in virtual)


def test_cached_dense_statistics_must_cover_the_sites_without_a_bn():
    calib = ArraySet(random_inputs(32))
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    with pytest.raises(AsrError, match="another model"):
        job.measure(calib, dense_stats={}, reference="running")  # the Gemm head has no BN: it needs them


def test_auto_reports_its_choice_and_matches_a_candidate(calib_and_eval):
    calib, _ = calib_and_eval
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.8).measure(calib)
    job.auto(calib).fold()
    auto = job.settings["auto"]
    assert auto["picked"] in auto["candidates"] and len(auto["candidates"]) >= 4
    assert auto["held_out"] == len(calib)  # cross-fitting scores every calibration sample once
    assert auto["picked"]["tied"]
    lowest = min((c for c in auto["candidates"] if c["tied"]), key=lambda c: c["logit_rel_l2"])
    assert auto["picked"] in (lowest, auto["candidates"][0])  # the first candidate, bn, is the default
    best = max(auto["candidates"], key=lambda c: c["agreement"])
    assert best["tied"] and auto["picked"]["agreement"] <= best["agreement"]
    assert job.settings["method"] == "auto"
    from asr_onnx.report.build import summary

    text = summary(job.report())
    chosen = [line for line in text.splitlines() if line.endswith("<- picked")]
    assert f"auto picked {auto['picked']['method']} ({auto['picked']['placement']}" in text
    assert len(chosen) == 1 and chosen[0].split()[0] == auto["picked"]["method"] and "rule: " in text


def test_pick_uses_the_paired_difference_on_the_same_samples():
    from asr_onnx.pipeline.crossfit import pick

    best = np.arange(400) % 10 < 8  # agrees on 80%
    scores = [{"logit_rel_l2": 0.5}, {"logit_rel_l2": 0.2}, {"logit_rel_l2": 0.1}]
    # candidate 1 differs from the best on 4 samples (paired SE 0.005): 0.01 behind is a real difference
    near = best.copy()
    near[:4] = False
    worse = np.arange(400) % 10 < 6
    assert pick(scores, [best, near, worse]) is scores[0] and not scores[1]["tied"]
    # candidate 1 differs on 2 samples each way: same agreement, so it ties and its lower logit error wins
    swap = best.copy()
    swap[[0, 1]], swap[[8, 9]] = False, True
    assert pick(scores, [best, swap, worse]) is scores[1] and scores[1]["tied"] and not scores[2]["tied"]


def test_pick_keeps_the_default_when_logit_error_cannot_separate_either():
    from asr_onnx.pipeline.crossfit import pick

    best = np.arange(400) % 10 < 8
    swap = best.copy()
    swap[[0, 1]], swap[[8, 9]] = False, True  # ties with best on agreement
    behind = best & (np.arange(400) % 10 < 6)  # 20 points behind: no tie
    scores = [{"logit_rel_l2": 0.51}, {"logit_rel_l2": 0.5}, {"logit_rel_l2": 0.9}]
    rng = np.random.default_rng(0)
    winner_err = rng.uniform(1.0, 2.0, 400)
    close = winner_err + rng.normal(0.01, 0.5, 400)  # 0.01 worse on average, paired SE 0.025: a tie
    apart = winner_err + rng.normal(0.5, 0.5, 400)  # 0.5 worse: a real difference
    other = winner_err * 3
    assert pick(scores, [best, swap, best], [close, winner_err, other]) is scores[0]
    assert pick(scores, [best, swap, best], [apart, winner_err, other]) is scores[1]
    assert pick(scores, [best, swap, best]) is scores[1]  # without per-sample errors: the lowest logit error
    assert pick(scores, [behind, swap, best], [close, winner_err, other]) is scores[1]  # default not tied


def test_a_fork_shares_the_sites_found_once_and_leaves_its_origin_as_it_was():
    """A probe is a new Repair over the same dense and pruned models: it finds no site again, and measuring
    it changes nothing of the job it came from."""
    calib = ArraySet(random_inputs(32))
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7).measure(calib)
    measured = job.measurement
    probe = job.fork().measure(calib)
    assert probe is not job and probe.pruned is job.pruned and job.measurement is measured
    assert probe.measurement.sites is measured.sites and probe.measurement is not measured
    for key, batches in measured.pruned.items():
        np.testing.assert_array_equal(merge_all(probe.measurement.pruned[key]).var, merge_all(batches).var)
    fresh = job.fork(pruned=False)
    assert fresh.pruned is job.dense and fresh.measurement is None


def _calib(folder, x, model):
    from asr_onnx.calib import input_specs, load_calib

    np.save(folder / "calib.npy", x)
    return load_calib(folder / "calib.npy", input_specs(model))


def _outputs(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# bn_kept at 0.9 on 24 samples: the refit wins on held-out agreement; the one Gemm on 12 samples of its 12
# inputs: the refit overfits (worse on fresh samples too, see test_guard), so the cheaper "none" is kept
@pytest.mark.parametrize("name, sparsity, picked", [("bn_kept", 0.9, "ls"), ("gemm", 0.5, "none")])
def test_reconstruct_auto_scores_both_candidates_held_out_and_applies_its_pick(tmp_path, name, sparsity, picked):
    import zoo

    from asr_onnx.pipeline.crossfit import PICK_RULE

    dense, feeds = zoo.one_layer("gemm") if name == "gemm" else zoo.CLASSES[name]()
    x = np.random.default_rng(7).normal(0, 1, (12, 12)).astype(np.float32) if name == "gemm" else feeds["input"]
    calib = _calib(tmp_path, x, dense)
    job = Repair(dense, device="cpu", progress=False).prune(sparsity).run(calib, "bn", reconstruct="auto")
    entry = job.settings["reconstruct_auto"]
    assert [c["reconstruct"] for c in entry["candidates"]] == ["none", "ls"]
    assert all(0 <= c["agreement"] <= 1 and c["logit_rel_l2"] > 0 for c in entry["candidates"])
    assert entry["candidates"][0] != entry["candidates"][1]  # each candidate scored on its own
    assert entry["picked"]["reconstruct"] == picked and entry["picked"] in entry["candidates"]
    assert entry["folds"] == 2 and entry["held_out"] == len(calib) and entry["scored_with"] == "bn"
    assert entry["reason"] == PICK_RULE and job.settings["reconstruct"] == "auto"
    assert (job.pruned is job.pruned_alone) == (picked == "none")
    same = Repair(dense, device="cpu", progress=False).prune(sparsity).run(calib, "bn", reconstruct=picked)
    np.testing.assert_allclose(_outputs(job.output, x), _outputs(same.output, x), rtol=1e-6, atol=1e-6)
    assert job.refits == same.refits


@pytest.mark.slow  # reconstruct auto and method auto each run by default on their own
def test_reconstruct_auto_with_auto_chooses_the_refit_with_bn_then_the_method_on_the_result(tmp_path):
    import zoo

    from asr_onnx.report.build import summary

    dense, feeds = zoo.bn_kept()
    calib = _calib(tmp_path, feeds["input"], dense)
    job = Repair(dense, device="cpu", progress=False).prune(0.9).run(calib, "auto", reconstruct="auto")
    s = job.settings
    assert s["reconstruct_auto"]["scored_with"] == "bn" and s["reconstruct_auto"]["picked"]["reconstruct"] == "ls"
    refitted = Repair(dense, device="cpu", progress=False).prune(0.9).run(calib, "auto", reconstruct="ls")
    assert s["auto"]["candidates"] == refitted.settings["auto"]["candidates"]  # auto ran on the refitted model
    lines = summary(job.report()).splitlines()
    first = [line.split()[0] for line in lines if line.startswith(("reconstruct auto picked ", "auto picked "))]
    assert first == ["reconstruct", "auto"]


def test_an_unknown_reconstruction_and_auto_without_folds_are_refused():
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.5)
    with pytest.raises(AsrError, match="unknown reconstruction 'lsq'; choose one of none, ls, auto"):
        job.reconstruct(ArraySet(random_inputs(32)), "lsq")
    with pytest.raises(AsrError, match="reconstruct auto needs a calibration set that can be cut into folds"):
        job.reconstruct(ArraySet(random_inputs(32)), "auto")


def test_a_refit_on_part_of_the_calibration_set_is_the_refit_on_that_seeded_part(tmp_path):
    """refit_samples=N refits on N seeded samples drawn evenly from the guard's folds
    (CalibSet.take_across_folds), and the recalibration after it still sees every sample."""
    import zoo

    from asr_onnx.pipeline.guard import FOLDS

    dense, feeds = zoo.bn_kept()
    calib = _calib(tmp_path, feeds["input"], dense)
    part = Repair(dense, device="cpu", progress=False).prune(0.9).run(calib, "bn", reconstruct="ls", refit_samples=16,
                                                                       seed=3)
    assert part.settings["refit_samples"] == 16
    by_hand = Repair(dense, device="cpu", progress=False).prune(0.9).reconstruct(calib.take_across_folds(16, FOLDS, 3), "ls")
    by_hand.run(calib, "bn", seed=3)
    np.testing.assert_allclose(_outputs(part.output, feeds["input"]), _outputs(by_hand.output, feeds["input"]),
                               rtol=1e-6, atol=1e-6)
    whole = Repair(dense, device="cpu", progress=False).prune(0.9).run(calib, "bn", reconstruct="ls", seed=3)
    assert part.refits != whole.refits  # 16 of the samples are not all of them
    with pytest.raises(AsrError, match="cannot refit on -1 samples"):
        Repair(dense, device="cpu", progress=False).prune(0.9).reconstruct(calib, "ls", samples=-1)
    with pytest.raises(AsrError, match="cannot refit on 8 samples of this calibration set"):
        Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.5).reconstruct(
            ArraySet(random_inputs(32)), "ls", samples=8)
