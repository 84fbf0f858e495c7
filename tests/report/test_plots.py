"""The plots: per-channel variance markers, dead channels on a floor and counted, short titles, and the sweep's plot files."""

import json

import numpy as np
import pytest
from zoo import sweep_inputs

from asr_onnx.cli.main import main
from asr_onnx.errors import AsrError
from asr_onnx.report.damage import dead_threshold, most_damaged, short_name

pytest.importorskip("matplotlib")


def test_dead_channels_are_drawn_on_the_floor_and_counted():
    from asr_onnx.report.plots import channel_figure

    dense = np.linspace(2.0, 1.0, 8)
    pruned = np.array([1.5, 0.0, 1e-13, 0.4, 0.3, 0.0, 0.9, 0.8])  # three dead channels
    fig = channel_figure({"dense": dense, "pruned": pruned, "repaired": dense * 0.9}, "m · conv1 · 90% global")
    ax = fig.axes[0]
    assert not ax.get_lines() or all(line.get_linestyle() in ("None", ":") for line in ax.get_lines())  # no lines
    by_label = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert set(by_label) == {"dense", "pruned (3 dead)", "repaired"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pruned (3 dead)" in legend
    ys = np.asarray(by_label["pruned (3 dead)"])[:, 1]
    floor = ys.min()
    assert len(ys) == 8 and (ys == floor).sum() == 3  # every dead channel drawn, all on one floor
    assert 0 < floor < np.min(pruned[pruned > 1e-6]) / 5  # visibly below the live ones, above zero (log scale)
    assert ax.get_yscale() == "log" and ax.get_title() == "m · conv1 · 90% global"


def test_short_names_and_the_most_damaged_site():
    assert short_name("/stages/stages.8/branch/branch.2/branch.2.0/Conv") == "stages.8/branch.2.0"
    assert short_name("conv1") == "conv1" and len(short_name("/a" * 40 + "/Conv")) == 36
    sites = [{"tensor": "a", "layer": "/x/x.1/Conv", "eps": 1e-5, "reference_var": [1, 1], "pruned_var": [0.9, 0.8]},
             {"tensor": "b", "layer": "/y/Conv", "eps": 1e-5, "reference_var": [1, 2], "pruned_var": [0.1, 0.2]}]
    assert most_damaged(sites)["tensor"] == "b"
    assert most_damaged(sites, "x.1")["tensor"] == "a"
    with pytest.raises(KeyError):
        most_damaged(sites, "nowhere")


def test_sweep_channel_plot_names_its_site_cell_and_counts(tmp_path):
    from asr_onnx.pipeline.sweep import SweepResult
    from asr_onnx.report.plots import channel_figure, sweep_channel_title, sweep_series

    model, calib, _ = sweep_inputs(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", str(model), "--calib", str(calib), "--eval", str(tmp_path / "eval.npz"),
                 "--sparsity", "0.95", "--method", "none,bn", "--batch-size", "16", "-o", str(out), "-q"]) == 0
    saved = json.loads((out / "results.json").read_text())
    result = SweepResult(saved["dense"], saved["rows"], saved["channel_var"])
    watched = result.channel_var
    assert watched["pattern"] == "global" and watched["sparsity"] == 0.95
    title = sweep_channel_title(result)
    assert title == f"m · {short_name(watched['layer'])} · 95% global" and len(title) < 60
    series = sweep_series(watched)
    assert list(series) == ["dense", "pruned", "repaired: bn"]
    ax = channel_figure(series, title).axes[0]
    threshold = dead_threshold(series["dense"])
    for collection, var in zip(ax.collections, series.values()):
        dead = int((np.asarray(var) < threshold).sum())
        ys = np.asarray(collection.get_offsets())[:, 1]
        assert len(ys) == len(var)  # every channel drawn, dead ones too
        assert (f"({dead} dead)" in collection.get_label()) == (dead > 0)
        assert (ys == ys.min()).sum() >= dead
    assert main(["sweep", str(model), "--calib", str(calib), "--eval", str(tmp_path / "eval.npz"), "--sparsity",
                 "0.5", "--method", "none,bn", "--batch-size", "16", "-o", str(out), "-q", "--plot-site", "x"]) == 1


def test_a_plot_is_written_atomically_or_not_at_all(tmp_path):
    from asr_onnx.report.plots import channel_variance

    series = {"dense": np.ones(4), "pruned": np.array([1.0, 0.0, 0.5, 0.2])}
    path = channel_variance(series, tmp_path / "c.svg", "m · conv1 · 90% global")
    assert path.read_text().lstrip().startswith("<?xml") and sorted(p.name for p in tmp_path.iterdir()) == ["c.svg"]
    with pytest.raises(AsrError, match="cannot write"):
        channel_variance(series, tmp_path / "missing" / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.svg"]


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
