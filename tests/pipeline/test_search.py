"""`asr-onnx search` (issue 32): the bisection, the held-out scores it reads (the guard's), what it writes.

The oracle of the search's curve is computed apart from it: the pruned model evaluated against the dense one
on every calibration sample (what a held-out score of pruning alone is, since pruning alone fits nothing), and
the guard's own held-out score of a plain repair at the chosen sparsity.
"""

import json
import math

import numpy as np
import onnx
import pytest
import zoo
from onnx import numpy_helper

from asr_onnx.calib import input_specs, load_calib
from asr_onnx.cli.main import main
from asr_onnx.pipeline.driver import Repair
from asr_onnx.pipeline.sparsity_search import TargetMissed, bisect, grid_top, search
from asr_onnx.prune.channels import count
from asr_onnx.verify.evaluation import evaluate

CPU = {"device": "cpu", "progress": False, "threads": 1}


def _mobilenet(tmp_path, n=64):
    """The trained MobileNetV3 fixture, and n in-distribution images as a calibration set (saved as x.npy)."""
    model = onnx.load(zoo.FIXTURES / "se_mobilenetv3.onnx")
    np.save(tmp_path / "x.npy", zoo.mobilenetv3_images(n, seed=5)[0])
    onnx.save(model, tmp_path / "m.onnx")
    return model, load_calib(tmp_path / "x.npy", input_specs(model))


def _weights(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("top", [1, 2, 9, 39])
def test_bisect_finds_every_boundary_of_a_monotone_predicate_in_log2_probes(top):
    for boundary in range(top + 1):
        asked: list = []
        found = bisect(lambda k, b=boundary, asked=asked: asked.append(k) or k <= b, top)
        assert found == boundary
        assert len(asked) == len(set(asked)) <= math.ceil(math.log2(top + 1))
        assert 0 not in asked and top + 1 not in asked  # the dense model and the grid's end are known


def test_bisect_ends_on_a_usable_point_beside_an_unusable_one_even_on_a_bumpy_curve():
    curve = [True, True, False, True, True, False, False, True, False, False]  # k = 1..10
    answers = {}
    found = bisect(lambda k: answers.setdefault(k, curve[k - 1]), len(curve))
    assert found == 0 or answers[found]
    assert found == len(curve) or answers[found + 1] is False  # the next grid point was probed and failed


def test_the_grid_of_the_default_resolution_has_39_sparsities_and_at_most_6_probes():
    assert grid_top(0.025) == 39 and math.ceil(math.log2(grid_top(0.025) + 1)) == 6
    assert grid_top(0.1) == 9 and grid_top(0.5) == 1


def test_the_search_finds_the_boundary_of_a_known_monotone_curve(tmp_path):
    """Pruning alone (--method none) on a trained MobileNetV3: its held-out agreement is its agreement on every
    sample, computed here apart, at every grid point (the oracle); the curve is monotone there."""
    model, calib = _mobilenet(tmp_path, 128)
    oracle = {}
    for k in range(1, 10):
        pruned = Repair(model, **CPU).prune(k / 10).pruned
        oracle[k] = evaluate(pruned, calib, reference=model, device="cpu", progress=False)["agreement"]
    assert all(oracle[k] >= oracle[k + 1] for k in range(1, 9)), oracle  # the precondition: a monotone curve
    target = 0.9
    boundary = max(k for k in oracle if oracle[k] >= target)
    assert 1 < boundary < 9  # the target crosses the curve inside the grid
    job, table = search(model, calib, min_agreement=target, resolution=0.1, method="none", bench_runs=0, **CPU)
    assert table.chosen.level == pytest.approx(boundary / 10)  # the boundary, within the resolution
    assert len(table.probes) <= math.ceil(math.log2(10))
    for probe in table.probes:
        assert probe.agreement == pytest.approx(oracle[round(probe.level * 10)], abs=1e-12)
        assert probe.usable == (probe.agreement >= target) and probe.kept == "pruned"
    assert table.boundary().level == pytest.approx((boundary + 1) / 10)  # the next step up was probed and failed
    plain = Repair(model, **CPU).prune(boundary / 10).run(calib, "none")
    assert _weights(job.output).keys() == _weights(plain.output).keys()
    assert all(np.array_equal(a, _weights(plain.output)[name]) for name, a in _weights(job.output).items())


@pytest.mark.parametrize("repair_options", [["--allocation", "lamp", "--score", "wanda", "--reconstruct", "none"],
                                            pytest.param(["--allocation", "lamp", "--reconstruct", "ls"],
                                                         marks=pytest.mark.slow)])
def test_the_chosen_model_is_a_plain_repair_bit_for_bit_and_the_report_holds_the_table(tmp_path, capsys,
                                                                                       repair_options):
    """CLI: search with LAMP and Wanda's scores (or a refit), then `repair` at the chosen sparsity with the same
    options."""
    _mobilenet(tmp_path)
    options = ["--calib", str(tmp_path / "x.npy"), "--device", "cpu", "--threads", "1", "--bench-runs", "3",
               "--bench-batch", "8"] + repair_options
    out, report = tmp_path / "s.onnx", tmp_path / "r.json"
    assert main(["search", str(tmp_path / "m.onnx"), "--min-agreement", "0.85", "--resolution", "0.25", "-o", str(out),
                 "--report", str(report), "--eval", str(tmp_path / "x.npy")] + options) == 0
    printed = capsys.readouterr().out
    written = json.loads(report.read_text())
    entry = written["search"]
    assert written["eval"]["samples"] == 64 and written["settings"]["guard"]["kept"] == "repair"
    chosen = entry["chosen"]
    assert chosen["usable"] and chosen["sparsity"] > 0 and "chosen: sparsity" in printed
    assert all({"sparsity", "agreement", "error", "usable", "latency_ms", "dense_latency_ms", "speedup"} <= set(p)
               for p in entry["probes"])
    assert all(p["usable"] == (p["agreement"] >= 0.85) for p in entry["probes"])
    assert entry["cost"]["full_repairs"] > 0 and entry["options"]["allocation"] == "lamp"
    options = [o for o in options if o not in ("--bench-runs", "3", "--bench-batch", "8")]
    plain = tmp_path / "plain.onnx"
    assert main(["repair", str(tmp_path / "m.onnx"), "--sparsity", str(chosen["sparsity"]), "-o", str(plain), "-q",
                 "--report", str(tmp_path / "plain.json")] + options) == 0
    searched, repaired = _weights(onnx.load(out)), _weights(onnx.load(plain))
    assert searched.keys() == repaired.keys()
    assert all(np.array_equal(searched[name], repaired[name]) for name in searched)
    guard = json.loads((tmp_path / "plain.json").read_text())["settings"]["guard"]
    if "none" in repair_options:  # the probe scored exactly what the plain repair's guard scores on the same folds
        assert guard["repair"]["agreement"] == pytest.approx(chosen["repair"]["agreement"], abs=1e-12)
        assert guard["repair"]["logit_rel_l2"] == pytest.approx(chosen["repair"]["error"], rel=1e-5)
    else:  # a probe refits each fold on its own; the repair's guard shares the refit's passes (pipeline/guard.py)
        assert guard["kept"] == chosen["kept"]
        assert guard["repair"]["agreement"] == pytest.approx(chosen["repair"]["agreement"], abs=0.1)
    assert main(["report", str(report), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="search"' in page and "(chosen)" in page and page.count("usable") >= len(entry["probes"])


@pytest.mark.parametrize("target", [["--min-agreement", "1.5"], ["--min-agreement", "1.0"], ["--max-error", "0"]])
def test_a_target_that_cannot_be_met_gets_one_line_and_no_output(tmp_path, capsys, target):
    _mobilenet(tmp_path)
    out, report = tmp_path / "s.onnx", tmp_path / "r.json"
    code = main(["search", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(out), "--report",
                 str(report), "--device", "cpu", "--threads", "1", "--bench-runs", "0", "--resolution", "0.25",
                 "--allocation", "global", "--reconstruct", "none", "-q"] + target)  # LAMP + refit agree fully at 0.25
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ")
    assert ("sparsity 0 cannot meet it" in err[0]) if target[1] == "1.5" else ("even the densest probe" in err[0])
    assert not out.exists() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.npy"]


def test_the_api_raises_target_missed_with_the_table(tmp_path):
    model, calib = _mobilenet(tmp_path)
    with pytest.raises(TargetMissed) as caught:
        search(model, calib, min_agreement=1.0, resolution=0.25, bench_runs=0, **CPU)
    table = caught.value.table
    assert table.chosen is None and [p.level for p in table.probes] == [0.5, 0.25]
    assert all(not p.usable for p in table.probes)


def test_channels_search_runs_over_kept_flops_and_benches_every_probe(tmp_path):
    """--pattern channels with a maximum error (the error target): every probe has its FLOPs target, the MACs the
    shrunk model keeps, and a measured speed-up; the chosen model is shrunk."""
    model, feeds = zoo.channels_residual()
    np.save(tmp_path / "x.npy", feeds["input"])
    calib = load_calib(tmp_path / "x.npy", input_specs(model))
    job, table = search(model, calib, max_error=0.5, resolution=0.125, pattern="channels", bench_runs=3,
                        bench_batch=4, **CPU)
    assert table.axis == "kept FLOPs" and table.chosen is not None
    for probe in table.probes:
        assert probe.flops_target == pytest.approx(1 - probe.level) and probe.sparsity is None
        if probe.note is None:
            assert probe.kept_macs is not None and probe.kept_macs < 1
            assert probe.speedup is not None and probe.latency_ms > 0 and probe.dense_latency_ms > 0
            assert probe.usable == (probe.error <= 0.5)
    assert count.params(job.output) < count.params(model)
    plain = Repair(model, **CPU).prune(0.0, "channels", flops_target=table.chosen.flops_target).run(
        calib, guard="fallback")
    assert all(np.array_equal(a, _weights(plain.output)[name]) for name, a in _weights(job.output).items())


def test_agreement_on_outputs_without_classes_is_refused_in_one_line(tmp_path, capsys):
    model, feeds = zoo.detector_head()
    onnx.save(model, tmp_path / "d.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    code = main(["search", str(tmp_path / "d.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"),
                 "--min-agreement", "0.9", "--device", "cpu", "--bench-runs", "0", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--max-error" in err[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("argv, says", [(["--pattern", "2:4"], "fixes its own sparsity"),
                                        (["--method", "auto"], "method auto"),
                                        (["--reconstruct", "auto"], "reconstruct auto")])
def test_what_a_search_cannot_vary_or_score_is_refused_before_any_work(tmp_path, capsys, argv, says):
    _mobilenet(tmp_path)
    code = main(["search", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"),
                 "--min-agreement", "0.9", "--device", "cpu", "-q"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and says in err[0]
