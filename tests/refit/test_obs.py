"""OBS masks (the score obs) against brute-force oracles: every refit below is an exact solve on the kept set."""

import numpy as np
import pytest
import zoo

from asr_onnx.measure.stats import GramStats
from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.pipeline.driver import Repair
from asr_onnx.prune.sparsecore import conforms_nm
from asr_onnx.refit.gram import weight_rows
from asr_onnx.refit.obs import MaskRule, nm_columns, obs_prune
from asr_onnx.refit.reconstruct import refit_rows


def problem(d: int = 10, rows: int = 4, seed: int = 0, scales=None):
    """A ridge problem H, b of correlated inputs (columns scaled by ``scales``) and its optimum w* = H⁻¹b."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * (1.0 if scales is None else scales)
    y = x @ rng.normal(size=(d, rows)) + 0.3 * rng.normal(size=(300, rows))
    h = x.T @ x + 0.01 * np.mean(np.sum(x**2, axis=0)) * np.eye(d)
    b = x.T @ y  # (d, rows)
    return h, b, np.linalg.solve(h, b).T


def rise(h, b, w, row):
    """f(w) − f(w*) for one row, f(w) = wᵀHw − 2bᵀw."""
    best = np.linalg.solve(h, b[:, row])
    return float(w @ h @ w - 2 * b[:, row] @ w - (best @ h @ best - 2 * b[:, row] @ best))


def exact_refit(h, b, keep, row):
    """The brute-force oracle: the optimum of one row with the weights off ``keep`` held at zero."""
    w, kept = np.zeros(len(h)), np.flatnonzero(keep)
    w[kept] = np.linalg.solve(h[np.ix_(kept, kept)], b[kept, row])
    return w


def held_refit(h, b, w, j, row):
    """The brute-force oracle of SparseGPT's step: weight j zeroed, the columns before it held at ``w``'s values,
    the columns after it refitted exactly."""
    out, free = w.copy(), np.arange(j + 1, len(h))
    out[j] = 0.0
    fixed = np.arange(j + 1)
    out[free] = np.linalg.solve(h[np.ix_(free, free)], b[free, row] - h[np.ix_(free, fixed)] @ out[fixed])
    return out


def test_obs_is_exact_for_the_refit_the_error_of_dropping_a_weight_is_its_rise_after_refitting_the_rest():
    h, b, optimum = problem()
    errors = optimum**2 / np.diag(np.linalg.inv(h))  # OBS: w*_j² / [H⁻¹]_jj
    for row in range(optimum.shape[0]):
        for j in range(len(h)):
            keep = np.arange(len(h)) != j
            assert errors[row, j] == pytest.approx(rise(h, b, exact_refit(h, b, keep, row), row), rel=1e-6, abs=1e-9)


def test_one_dropped_weight_is_the_cheapest_with_the_columns_before_it_held_and_its_update_is_that_refit():
    h, b, optimum = problem(d=8, rows=3)
    keep, weights = obs_prune(optimum, np.linalg.inv(h), drop=1)
    rises = np.array([[rise(h, b, held_refit(h, b, optimum[r], j, r), r) for j in range(8)] for r in range(3)])
    row, j = np.unravel_index(np.argmin(rises), rises.shape)
    assert (~keep).sum() == 1 and not keep[row, j]  # the brute-force cheapest single drop of all rows
    np.testing.assert_allclose(weights[row], held_refit(h, b, optimum[row], j, row), rtol=1e-8, atol=1e-10)
    untouched = np.arange(3) != row
    np.testing.assert_allclose(weights[untouched], optimum[untouched], rtol=1e-12)
    first = np.r_[j, np.delete(np.arange(8), j)]  # taken first, the rest all free: the update is the exact refit
    _, weights = obs_prune(optimum, np.linalg.inv(h), drop=1, order=first)
    np.testing.assert_allclose(weights[row], exact_refit(h, b, keep[row], row), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("d, drop", [(300, 0), (300, 1), (300, 2999), (257, 1200), (9, 40)])
def test_the_count_of_dropped_weights_is_exact_over_uneven_blocks(d, drop):
    h, _, optimum = problem(d=d, rows=10)
    keep, weights = obs_prune(optimum, np.linalg.inv(h), drop=drop)
    assert (~keep).sum() == drop and (weights[~keep] == 0).all() and np.isfinite(weights).all()


@pytest.mark.parametrize("n, m, kernel, channels", [(2, 4, 9, 16), (2, 4, 1, 16), (1, 4, 4, 16), (4, 8, 1, 16),
                                                     (3, 6, 1, 132)])  # 6 does not divide the 128-column spans
def test_n_m_obs_keeps_n_of_every_m_input_channels_at_each_kernel_offset(n, m, kernel, channels):
    out = 6
    h, _, optimum = problem(d=channels * kernel, rows=out)
    keep = MaskRule((n, m), kernel).keep(optimum, np.linalg.inv(h), drop=0)
    weight = keep.reshape(out, channels, kernel)  # a Conv's rows: input channel-major, kernel offset minor
    assert (weight.reshape(out, channels // m, m, kernel).sum(axis=2) == n).all()
    assert sorted(nm_columns(channels * kernel, kernel)) == list(range(channels * kernel))


def test_obs_masks_refit_better_than_magnitude_where_input_scales_mislead_magnitude():
    d, rows, drop = 24, 8, 120
    scales = np.random.default_rng(5).permutation(np.geomspace(0.05, 20, d))  # |w| says little: input scales vary
    h, b, optimum = problem(d=d, rows=rows, scales=scales, seed=3)
    keep_obs = obs_prune(optimum, np.linalg.inv(h), drop=drop)[0]
    magnitude = np.ones(rows * d, bool)
    magnitude[np.argsort(np.abs(optimum).ravel(), kind="stable")[:drop]] = False
    keep_mag = magnitude.reshape(rows, d)

    def total(keep):
        return sum(rise(h, b, exact_refit(h, b, keep[r], r), r) for r in range(rows))

    assert total(keep_obs) < 0.5 * total(keep_mag)


def test_refit_rows_with_a_rule_keeps_each_groups_count_and_refits_exactly_on_its_mask():
    rng = np.random.default_rng(1)
    groups, length, per_group = 2, 12, 3
    x = rng.normal(size=(400, groups * length)) * rng.permutation(np.geomspace(0.1, 10, groups * length))
    dense_rows = rng.normal(size=(groups * per_group, length))
    y = np.concatenate([x[:, g * length:(g + 1) * length] @ dense_rows[g * per_group:(g + 1) * per_group].T
                        for g in range(groups)], axis=1)
    gram = GramStats.of(x, y, groups)
    keep = np.abs(dense_rows) > np.quantile(np.abs(dense_rows), 0.6)
    keep[:per_group] = np.abs(dense_rows[:per_group]) > np.quantile(np.abs(dense_rows[:per_group]), 0.3)
    magnitude, info_mag = refit_rows(dense_rows, keep, gram)
    chosen, info_obs = refit_rows(dense_rows, keep, gram, rule=MaskRule())
    for g in range(groups):
        block = slice(g * per_group, (g + 1) * per_group)
        assert (chosen[block] == 0).sum() == (~keep[block]).sum()
    again, _ = refit_rows(dense_rows, chosen != 0, gram)  # the rule's mask, refitted with no rule: the same rows
    np.testing.assert_allclose(again, chosen, rtol=1e-9, atol=1e-12)
    assert info_obs["err_after"] < info_mag["err_after"]


def layer_zeros(model):
    return [int((layer.weight.values == 0).sum()) for layer in find_layers(to_graph(model))]


def test_the_score_obs_keeps_each_layers_budget_moves_the_masks_and_refits_better():
    dense, feeds = zoo.bn_kept()
    calib = zoo.DictSet(feeds)
    runs = {}
    for score in ("magnitude", "obs"):
        job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.7, allocation="lamp", score=score)
        runs[score] = job.reconstruct(calib)
    assert layer_zeros(runs["obs"].pruned) == layer_zeros(runs["magnitude"].pruned)
    assert layer_zeros(runs["obs"].pruned_alone) == layer_zeros(runs["obs"].pruned)
    moved = [(a.weight.values == 0) != (b.weight.values == 0) for a, b in
             zip(find_layers(to_graph(runs["obs"].pruned)), find_layers(to_graph(runs["obs"].pruned_alone)))]
    assert any(m.any() for m in moved)
    errors = {s: sum(r["err_after"] for r in job.refits if "err_after" in r) for s, job in runs.items()}
    assert errors["obs"] < errors["magnitude"]
    assert runs["obs"].layers[0].score == "obs"


def test_the_score_obs_under_2_4_holds_the_pattern():
    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.0, "2:4", score="obs")
    job.reconstruct(zoo.DictSet(feeds))
    pruned = [row for row in job.layers if row.pruned]
    assert pruned
    for layer, row in zip(find_layers(to_graph(job.pruned)), job.layers):
        if row.pruned:
            assert conforms_nm(layer.weight.values, 2, 4, layer.in_axis), layer.name
    assert (weight_rows(find_layers(to_graph(job.pruned))[1], find_layers(to_graph(job.pruned))[1].weight.values)
            != weight_rows(find_layers(to_graph(job.pruned_alone))[1],
                           find_layers(to_graph(job.pruned_alone))[1].weight.values)).any()


def test_the_score_obs_at_sparsity_0_is_the_identity():
    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.0, score="obs")
    job.run(zoo.DictSet(feeds), "none", reconstruct="ls")
    for got, want in zip(find_layers(to_graph(job.output)), find_layers(to_graph(dense))):
        assert np.array_equal(got.weight.values, want.weight.values)


def test_the_score_obs_without_the_refit_is_one_error_line(tmp_path):
    import subprocess
    import sys

    import onnx

    dense, feeds = zoo.bn_kept()
    model, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    onnx.save(dense, model)
    np.save(calib, feeds["input"])
    result = subprocess.run([sys.executable, "-m", "asr_onnx.cli.main", "repair", str(model), "--calib", str(calib),
                             "--score", "obs", "--reconstruct", "none", "-o", str(tmp_path / "out.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--score obs" in lines[0] and "--reconstruct none" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "m.onnx"]


@pytest.mark.parametrize("seed, length, per_group, share", [(0, 27, 16, 0.7), (1, 9, 4, 0.6), (2, 40, 8, 0.9)])
def test_a_rule_never_fits_a_group_worse_than_the_refit_on_the_allocations_mask(seed, length, per_group, share):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, length)) @ rng.normal(size=(length, length))
    dense_rows = rng.normal(size=(per_group, length))
    gram = GramStats.of(x, x @ dense_rows.T + rng.normal(size=(200, per_group)))
    keep = np.abs(dense_rows) > np.quantile(np.abs(dense_rows), share)
    plain = refit_rows(dense_rows, keep, gram)[1]["err_after"]
    rows, info = refit_rows(dense_rows, keep, gram, rule=MaskRule())
    assert info["err_after"] <= plain + 1e-12 and (rows == 0).sum() == (~keep).sum()


def test_the_summary_names_the_budget_and_the_masks():
    from asr_onnx.report.build import summary

    dense, feeds = zoo.bn_kept()
    lines = {}
    for score, pattern in (("obs", "global"), ("magnitude", "global"), ("obs", "2:4")):
        job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6, pattern, allocation="lamp"
                                                                              if pattern == "global" else "global",
                                                                              score=score)
        job.run(zoo.DictSet(feeds), "bn", reconstruct="ls")
        lines[score, pattern] = next(line for line in summary(job.report()).splitlines() if line.startswith("pattern"))
    assert lines["obs", "global"].startswith("pattern global (lamp budget, obs masks)  sparsity")
    assert lines["magnitude", "global"].startswith("pattern global (lamp budget, magnitude masks)")
    assert lines["obs", "2:4"].startswith("pattern 2:4 (obs masks)")
