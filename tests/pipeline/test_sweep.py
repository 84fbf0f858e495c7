"""The grid runner: every cell measured once, each regime with its own settings."""

import pytest
from zoo import conv_net

from asr_onnx.pipeline.driver import Repair
from asr_onnx.pipeline.sweep import Grid, markdown, run_sweep


def test_grid_runs_every_cell_and_measures_dense_once(calib_and_eval, monkeypatch):
    import asr_onnx.measure.passes as measure

    calls = []
    real = measure.measure

    def counted(model, calib, **kw):
        return calls.append(kw.get("norms") is None) or real(model, calib, **kw)

    # both passes run through measure.measure: the dense one from measure_dense, the pruned one from measure_pruned
    monkeypatch.setattr(measure, "measure", counted)
    calib, eval_data = calib_and_eval
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


def test_each_momentum_regime_keeps_its_own_momentum(calib_and_eval, tmp_path):
    """Issue 14.12: `--recal momentum=0.1,momentum=0.3` ran 0.1 twice. Each row must equal a repair at
    its own momentum, and the two must differ."""
    from asr_onnx.cli.sweep import parse_regimes
    from asr_onnx.verify.evaluation import evaluate

    calib, eval_data = calib_and_eval
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
