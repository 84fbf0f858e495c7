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


DOLLARS = "m$^$ · /a$_{x$/Conv · 90% global"  # "$^$" is not valid mathtext: parsed, it raised ValueError


def test_a_dollar_in_a_label_is_drawn_as_plain_text(tmp_path):
    """Issue 25, medium: every label is plain text, whatever a node or file name holds."""
    from asr_onnx.pipeline.sweep import SweepResult
    from asr_onnx.report.plots import accuracy_vs_sparsity, channel_figure, strip_figure, svg

    fig = channel_figure({"dense $x$": np.ones(4), "pruned $^$": np.array([1.0, 0.5, 0.5, 0.2])}, DOLLARS)
    ax = fig.axes[0]
    assert ax.get_title() == DOLLARS.replace("$", r"\$")  # "\$" draws "$", and no pair of them opens mathtext
    assert "<svg" in svg(fig)  # drawing it is what parsed the mathtext
    ticks = [t for t in ax.get_yticklabels() if t.get_text()]  # the log axis's own labels stay mathtext (10⁻¹)
    assert ticks and all(t.get_parse_math() and t.get_text().startswith("$\\mathdefault{10^") for t in ticks)
    assert "<svg" in svg(strip_figure([("/a$^$/Conv", np.ones(3), None), ("b$", np.ones(2), None)], "ratio $^$",
                                      DOLLARS))
    rows = [{"pattern": "global", "method": m, "recal": "exact", "placement": "recal", "sparsity": s, "top1": 0.5}
            for m in ("none", "bn") for s in (0.5, 0.9)]
    path = accuracy_vs_sparsity(SweepResult({"model": "m$^$"}, rows), tmp_path / "a.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_repair_writes_the_page_of_a_model_with_dollars_in_its_names(tmp_path, calib_dir):
    import onnx
    from zoo import conv_net

    model = conv_net(bn=True)
    for i, node in enumerate(model.graph.node):
        node.name = f"/blk$^${i}/{node.op_type}"
    path = tmp_path / "m$^$.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["repair", str(path), "--calib", str(calib_dir), "--batch-size", "16", "-o", str(out / "o.onnx"),
                 "--report", str(out / "r.html"), "-q"]) == 0
    page = (out / "r.html").read_text()
    assert "/blk$^$0/Conv" in page and page.count('src="data:image/svg+xml;base64,') == 3


def test_a_site_of_many_channels_draws_a_bounded_spread():
    """Past MAX_CHANNEL_POINTS (MAX_STRIP_POINTS) channels, an even spread of them is drawn, the counts of all."""
    from asr_onnx.report.plots import MAX_CHANNEL_POINTS, MAX_STRIP_POINTS, channel_figure, strip_figure

    rng = np.random.default_rng(0)
    dense = rng.uniform(1, 2, 100_000)
    pruned = dense * rng.uniform(0.1, 1, dense.size)
    pruned[:700] = 0.0
    ax = channel_figure({"dense": dense, "pruned": pruned}).axes[0]
    offsets = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
    assert set(offsets) == {"dense", "pruned (700 dead)"}
    xs = offsets["dense"][:, 0]
    assert len(xs) == MAX_CHANNEL_POINTS and xs[0] == 0 and xs[-1] == dense.size - 1
    assert offsets["dense"][0, 1] == dense.max() and offsets["dense"][-1, 1] == dense.min()
    assert "4,096 of 100,000 drawn" in ax.get_xlabel()
    dead = np.zeros(dense.size, bool)
    dead[:700] = True
    strip = strip_figure([("s", pruned, dead)], "ratio").axes[0]
    live, fallen = (np.asarray(c.get_offsets()) for c in strip.collections[:2])
    assert len(live) == MAX_STRIP_POINTS and len(fallen) == MAX_STRIP_POINTS
    assert live[:, 1].min() == pruned[700:].min() and live[:, 1].max() == pruned.max()
    assert "collapsed: 700 channels, on the floor" in [t.get_text() for t in strip.get_legend().get_texts()]
