"""The grid runner, the statistics cache, auto, and the plot files."""

import json

import numpy as np
import onnx
import pytest
from asr_onnx_cli.main import main
from models import conv_net, random_inputs, sweep_inputs

from asr_onnx.api import Repair
from asr_onnx.cache import load_stats, save_stats, stats_key
from asr_onnx.calib import InputSpec, load_calib
from asr_onnx.errors import AsrError
from asr_onnx.sweep import Grid, markdown, run_sweep

SPECS = [InputSpec("input", ("N", 3, 8, 8), np.float32)]


@pytest.fixture
def data(tmp_path):
    np.save(tmp_path / "calib.npy", random_inputs(64, seed=7))
    x = random_inputs(40, seed=8)
    np.savez(tmp_path / "eval.npz", x=x, y=np.arange(40) % 10)
    return load_calib(tmp_path / "calib.npy", SPECS), load_calib(tmp_path / "eval.npz", SPECS)


def test_grid_runs_every_cell_and_measures_dense_once(data, monkeypatch):
    import asr_onnx.api as api

    calls = []
    real = api.measure
    monkeypatch.setattr(api, "measure", lambda model, calib, **kw: calls.append(kw.get("norms") is None) or real(model, calib, **kw))
    calib, eval_data = data
    grid = Grid(sparsities=(0.5, 0.8), patterns=("global", "2:4"), methods=("none", "bn", "asr"),
                regimes=(("exact", "recal"), ("momentum", "pre-bn")))
    result = run_sweep(conv_net(bn=True), calib, eval_data, grid, batch_size=16, device="cpu", progress=False,
                       watch=False)
    cells = [(r["pattern"], r["sparsity"], r["method"], r["recal"]) for r in result.rows]
    assert len(cells) == len(set(cells)) == 3 * (1 + 2 * 2)  # 3 cells x (none + 2 methods x 2 regimes)
    assert calls.count(True) == 1 and calls.count(False) == 3  # dense once, pruned once per cell
    assert all(0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1 for r in result.rows)
    table = markdown(result)
    assert table.count("\n| global |") == 4 and "| 2:4 | - |" in table


def test_stats_cache_hit_miss_and_invalidation(data, tmp_path):
    calib, _ = data
    model = conv_net(bn=True)
    job = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.5).measure(calib)
    path = save_stats(tmp_path / "stats.npz", job.dense_stats, stats_key(model, calib))
    loaded = load_stats(path, stats_key(model, calib))  # hit
    for key, stats in job.dense_stats.items():
        np.testing.assert_array_equal(loaded[key].m2, stats.m2)
    again = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.5).measure(calib, loaded)
    assert again.dense_stats is loaded  # used as given, not measured again
    for key in job.pruned_stats:
        np.testing.assert_allclose(again.pruned_stats[key][0].mean, job.pruned_stats[key][0].mean)
    changed = conv_net(bn=True, seed=1)  # another model: a miss
    with pytest.raises(AsrError, match="another model"):
        load_stats(path, stats_key(changed, calib))
    with pytest.raises(AsrError, match="another model"):
        load_stats(path, stats_key(model, calib.take(32)))  # other data


def test_stats_cli_roundtrip_and_stale_cache(tmp_path, capsys):
    model, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(conv_net(bn=False), model)
    calib.mkdir()
    np.save(calib / "x.npy", random_inputs(32))
    stats = tmp_path / "s.npz"
    assert main(["stats", str(model), "--calib", str(calib), "-o", str(stats), "--batch-size", "16", "-q"]) == 0
    out = tmp_path / "o.onnx"
    assert main(["repair", str(model), "--calib", str(calib), "--stats", str(stats), "-o", str(out),
                 "--batch-size", "16", "-q"]) == 0
    onnx.save(conv_net(bn=False, seed=3), model)  # the model changed under the cache
    assert main(["repair", str(model), "--calib", str(calib), "--stats", str(stats), "-o", str(out),
                 "--batch-size", "16", "-q", "--overwrite"]) == 1
    assert "another model" in capsys.readouterr().err


def test_auto_reports_its_choice_and_matches_a_candidate(data):
    calib, _ = data
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
    from asr_onnx.api import pick

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
    from asr_onnx.api import pick

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



def test_folds_hold_out_every_sample_exactly_once(data):
    calib, _ = data
    parts = calib.folds(4, seed=1)
    held = np.concatenate([h._indices for _, h in parts])
    assert sorted(held.tolist()) == sorted(calib._indices.tolist())
    for fit, h in parts:
        assert not set(fit._indices.tolist()) & set(h._indices.tolist())
        assert len(fit) + len(h) == len(calib)
    with pytest.raises(AsrError):
        calib.folds(len(calib) + 1)


def test_sweep_cli_writes_results_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, calib, _ = sweep_inputs(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", str(model), "--calib", str(calib), "--eval", str(tmp_path / "eval.npz"),
                 "--sparsity", "0.5,0.9", "--method", "none,bn,lw,asr", "--batch-size", "16", "-o", str(out),
                 "-q"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 8 and (out / "results.md").read_text().count("| global |") == 2
    for name in ("accuracy_vs_sparsity.png", "asr_minus_lw_vs_severity.png", "channel_variance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_momentum_regime_keeps_its_own_momentum(data, tmp_path):
    """Issue 14.12: `--recal momentum=0.1,momentum=0.3` ran 0.1 twice. Each row must equal a repair at
    its own momentum, and the two must differ."""
    from asr_onnx_cli.sweep import parse_regimes

    from asr_onnx.verify import evaluate

    calib, eval_data = data
    regimes = parse_regimes("momentum=0.1,momentum=0.3", "pre-bn")
    grid = Grid(sparsities=(0.8,), methods=("bn",), regimes=regimes)
    model = conv_net(bn=True)
    rows = run_sweep(model, calib, eval_data, grid, batch_size=16, device="cpu", progress=False, watch=False).rows
    assert [r["recal"] for r in rows] == ["momentum=0.1", "momentum=0.3"]
    for row, momentum in zip(rows, (0.1, 0.3)):
        job = Repair(model, device="cpu", batch_size=16, progress=False).prune(0.8).measure(calib)
        job.correct("bn", placement="pre-bn", recal="momentum", momentum=momentum).fold()
        direct = evaluate(job.output, eval_data, reference=model, device="cpu", progress=False)
        assert row["logit_rel_l2"] == pytest.approx(direct["logit_rel_l2"], rel=1e-9)
    assert rows[0]["logit_rel_l2"] != pytest.approx(rows[1]["logit_rel_l2"], rel=1e-6)
