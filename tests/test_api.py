"""The Repair pipeline's own choices: which sites the dense pass measures, what auto picks, and pick's rule."""

import numpy as np
import onnx
import pytest
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.api import Repair
from asr_onnx.errors import AsrError
from asr_onnx.stats import merge_all


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
    from asr_onnx.report import summary

    text = summary(job.report())
    chosen = [line for line in text.splitlines() if line.endswith("<- picked")]
    assert f"auto picked {auto['picked']['method']} ({auto['picked']['placement']}" in text
    assert len(chosen) == 1 and chosen[0].split()[0] == auto["picked"]["method"] and "rule: " in text


def test_pick_uses_the_paired_difference_on_the_same_samples():
    from asr_onnx.select import pick

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
    from asr_onnx.select import pick

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
