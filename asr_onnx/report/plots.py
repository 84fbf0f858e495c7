"""The plots of a sweep and of the report page (needs the ``plots`` extra: matplotlib).

Every label from a model or a report is drawn as plain text (:func:`plain`): a ``$`` in a node or file
name is a character, never mathtext (the log axes' own tick labels stay mathtext).
A figure draws at most MAX_CHANNEL_POINTS channels of a site and MAX_STRIP_POINTS of each strip
(an even spread over the sorted values, so the extremes stay), whatever the report holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from asr_onnx.errors import AsrError

PLAIN_TEXT = {"text.usetex": False, "svg.fonttype": "path"}  # no TeX run, and no <text> in an SVG
MAX_CHANNEL_POINTS = 4096
MAX_STRIP_POINTS = 400


def load_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AsrError("plots need matplotlib: pip install 'asr-onnx[plots]', or pass --no-plots") from None
    return plt


def plain(text) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped, so that no pair opens mathtext."""
    return str(text).replace("$", r"\$")


@contextlib.contextmanager
def plain_text():
    """Builds and draws figures without TeX (tick labels are made as late as the drawing)."""
    plt = load_pyplot()
    with plt.rc_context(PLAIN_TEXT):
        yield plt


def _spread(count: int, limit: int):
    """At most ``limit`` indices spread evenly over range(count), the first and the last included."""
    import numpy as np

    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def accuracy_vs_sparsity(result, path) -> Path:
    """Top-1 (or agreement) against sparsity, one line per (method, regime), for non-N:M patterns."""
    with plain_text() as plt:
        return save(_accuracy_figure(plt, result), path)


def _accuracy_figure(plt, result):
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result.rows if r["sparsity"] is not None]
    metric = "top1" if rows and rows[0].get("top1") is not None else "agreement"
    lines = dict.fromkeys((r["pattern"], r["method"], r["recal"], r["placement"]) for r in rows)
    for pattern, method, recal, placement in lines:
        points = sorted((r["sparsity"], 100 * r[metric]) for r in rows
                        if (r["pattern"], r["method"], r["recal"], r["placement"]) == (pattern, method, recal, placement))
        label = method if method == "none" else f"{method} ({recal}, {placement})"
        ax.plot(*zip(*points), marker="o", label=plain(f"{pattern}: {label}"))
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(plain(result.dense["model"]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def gain_vs_severity(result, path) -> Path:
    """Top-1 of ASR minus that of LW against pruning severity (the paper's Fig. 6)."""
    with plain_text() as plt:
        return save(_severity_figure(plt, result), path)


def _severity_figure(plt, result):
    metric = "top1" if result.rows and result.rows[0].get("top1") is not None else "agreement"
    by_key = {(r["pattern"], r["sparsity"], r["recal"], r["placement"], r["method"]): r for r in result.rows}
    points = []
    for (pattern, sparsity, recal, placement, method), row in by_key.items():
        lw = by_key.get((pattern, sparsity, recal, placement, "lw"))
        if method == "asr" and lw is not None and row.get("variance_ratio") is not None:
            points.append((row["variance_ratio"], 100 * (row[metric] - lw[metric]), f"{recal}/{placement}"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime in sorted({p[2] for p in points}):
        xs, ys = zip(*[(x, y) for x, y, r in points if r == regime])
        ax.scatter(xs, ys, label=plain(regime))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean pruned / reference channel variance (lower = more severe)")
    ax.set_ylabel(f"ASR - LW {metric} (points)")
    ax.set_title(plain(result.dense["model"]))
    if points:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


MARKERS = ("o", "x", "s", "+", "^", "D", "v")  # the first (dense) filled, the others hollow so that overlaps show


def channel_figure(series: dict, title: str = "", dead_below: float | None = None):
    """Per-channel variance of one site, one marker per channel and series (the paper's Fig. 4).

    Channels are sorted by the first series (the dense reference). A channel under ``dead_below`` is
    dead: it is drawn on a dotted floor a decade below the lowest live value, and counted in the legend.
    Past MAX_CHANNEL_POINTS channels, an even spread of the sorted channels is drawn (the counts are of all).

    Args:
        series: label -> per-channel variance; the first is the reference.
        title: the figure's title. Defaults to none.
        dead_below: the dead-channel threshold. Defaults to damage.dead_threshold of the first series.

    Returns:
        the matplotlib Figure (its first axes holds one scatter per series, labelled as in the legend).
    """
    import numpy as np

    from asr_onnx.report.damage import dead_threshold

    values = {label: np.asarray(var, np.float64).ravel() for label, var in series.items()}
    reference = next(iter(values.values()))
    dead_below = dead_threshold(reference) if dead_below is None else dead_below
    live = np.concatenate([v[v >= dead_below] for v in values.values()])
    floor = (live.min() if live.size else dead_below) / 10
    x = _spread(reference.size, MAX_CHANNEL_POINTS)
    order = np.argsort(-reference, kind="stable")[x]
    with plain_text() as plt:
        return _channel_axes(plt, values, order, x, floor, dead_below, title, reference.size)


def _channel_axes(plt, values: dict, order, x, floor: float, dead_below: float, title: str, channels: int):
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, full) in enumerate(values.items()):
        var = full[order]
        dead = int((full < dead_below).sum())
        marker, color = MARKERS[i % len(MARKERS)], "black" if i == 0 else colors[(i - 1) % len(colors)]
        paint = {"color": color} if i == 0 or marker in "x+" else {"facecolors": "none", "edgecolors": color}
        ax.scatter(x, np.where(var < dead_below, floor, var), s=20 if i == 0 else 26, marker=marker, linewidths=1,
                   zorder=4 if i == 0 else 3, **paint,
                   label=plain(f"{label} ({dead} dead)" if dead else label))
    ax.axhline(floor, color="grey", lw=0.8, ls=":", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("channel (sorted by dense variance)" if len(x) == channels else
                  f"channel (sorted by dense variance; {len(x):,} of {channels:,} drawn, evenly spread)")
    ax.set_ylabel("activation variance")
    ax.set_title(plain(title), fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
              title=f"dead: variance < {dead_below:.0e},\ndrawn on the dotted floor", title_fontsize=7)
    fig.tight_layout()
    return fig


def channel_variance(series: dict, path, title: str = "", dead_below: float | None = None) -> Path:
    """Writes :func:`channel_figure` as a PNG."""
    return save(channel_figure(series, title, dead_below), path)


def strip_figure(rows: list, ylabel: str, title: str = "", dead_label: str = "collapsed"):
    """One column of per-channel markers per site, on a log scale (damage or gains at a glance).

    Args:
        rows: (site label, per-channel values, dead channels as a bool array or None), in graph order.
            Dead channels are drawn on a dotted floor a decade below the lowest live value, and counted
            in the legend (no floor and no legend when every row's mask is None).
        ylabel: the y axis's label.
        title: the title. Defaults to none.
        dead_label: what the legend calls the dead channels. Defaults to "collapsed".

    Each strip draws at most MAX_STRIP_POINTS live channels (an even spread of its sorted values) and as
    many dead ones; the legend counts them all.
    """
    import numpy as np

    values = [np.asarray(v, np.float64).ravel() for _, v, _ in rows]
    deads = [np.zeros(v.size, bool) if d is None else np.asarray(d, bool) | ~(v > 0) for v, (_, _, d) in
             zip(values, rows)]
    lives = [v[~d] for v, d in zip(values, deads)]  # channel order, or an even spread of the sorted values
    lives = [v if v.size <= MAX_STRIP_POINTS else np.sort(v)[_spread(v.size, MAX_STRIP_POINTS)] for v in lives]
    low = [v.min() for v in lives if v.size]
    floor = min(low) / 10 if low else 1e-12
    with plain_text() as plt:
        fig, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(rows) + 2), 14.0), 3.6))
        for i, (live, dead) in enumerate(zip(lives, deads)):
            shown_dead = min(int(dead.sum()), MAX_STRIP_POINTS)
            jitter = (np.arange(live.size + shown_dead) % 9 - 4) * 0.06
            ax.scatter(i + jitter[:live.size], live, s=7, color="tab:blue", alpha=0.55, linewidths=0)
            ax.scatter(i + jitter[live.size:], np.full(shown_dead, floor), s=12, marker="v", color="tab:red")
        _strip_frame(ax, rows, deads, floor, ylabel, title, dead_label)
    return fig


def _strip_frame(ax, rows, deads, floor: float, ylabel: str, title: str, dead_label: str) -> None:
    if any(d is not None for _, _, d in rows):
        total = int(sum(d.sum() for d in deads))
        ax.scatter([], [], s=7, color="tab:blue", label="one channel")
        ax.scatter([], [], s=12, marker="v", color="tab:red",
                   label=plain(f"{dead_label}: {total} channels, on the floor"))
        ax.axhline(floor, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [plain(label) for label, _, _ in rows], rotation=60, ha="right", fontsize=6)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylabel(plain(ylabel), fontsize=8)
    ax.set_title(plain(title), fontsize=10)
    ax.grid(alpha=0.25, axis="y")
    ax.figure.tight_layout()


def save(fig, path) -> Path:
    """Writes a figure (PNG, or SVG by the extension) atomically, and closes it."""
    from asr_onnx.outputs import write_file

    kind = Path(path).suffix.lstrip(".").lower() or "png"
    with plain_text() as plt:
        try:
            write_file(path, lambda handle: fig.savefig(handle, format=kind, dpi=120,
                                                        metadata={"Date": None} if kind == "svg" else None))
        finally:
            plt.close(fig)
    return Path(path)


def svg(fig) -> str:
    """A figure as SVG text (text drawn as paths, so the page needs no font), closed afterwards."""
    import io

    buffer = io.StringIO()
    with plain_text() as plt:
        try:
            fig.savefig(buffer, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    return buffer.getvalue()


def channel_title(model: str, site: str, sparsity, pattern: str) -> str:
    """``resnet20_bn · stages.8/branch.2.0 · 90% global`` (an N:M pattern names no sparsity)."""
    amount = "" if sparsity is None or ":" in str(pattern) else f"{100 * float(sparsity):g}% "
    model = str(model).removesuffix(".onnx")
    return f"{model} · {site} · {amount}{pattern}"


PLOT_FILES = ("accuracy_vs_sparsity.png", "asr_minus_lw_vs_severity.png", "channel_variance.png")


def sweep_plots(result, folder) -> list[Path]:
    """Every plot the sweep's data supports (named in PLOT_FILES), written into ``folder``."""
    folder = Path(folder)
    paths = [accuracy_vs_sparsity(result, folder / PLOT_FILES[0]), gain_vs_severity(result, folder / PLOT_FILES[1])]
    if result.channel_var:
        paths.append(channel_variance(sweep_series(result.channel_var), folder / PLOT_FILES[2],
                                      sweep_channel_title(result)))
    return paths


def sweep_series(watched: dict) -> dict:
    """dense, pruned (the ``none`` method) and each repair's measured variance at the watched site."""
    repaired = dict(watched["repaired"])
    series = {"dense": watched["dense"]}
    if "none" in repaired:
        series["pruned"] = repaired.pop("none")
    return series | {f"repaired: {method}": var for method, var in repaired.items()}


def sweep_channel_title(result) -> str:
    from asr_onnx.report.damage import short_name

    watched = result.channel_var
    return channel_title(result.dense["model"], short_name(watched.get("layer") or watched["site"]),
                         watched.get("sparsity"), watched.get("pattern", watched.get("cell", "")))
