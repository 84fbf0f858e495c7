"""The repair report as one self-contained HTML page: no script, no network, no external file.

The page renders from a typed, validated report (:class:`asr_onnx.report.schema.Report`; a dict is
validated first), so every number on it is a number. Escaping is structural: :func:`tag` is the only
writer of markup, and :func:`text` the only place where a value becomes HTML (``html.escape``). A tag
or an attribute outside TAGS and ATTRIBUTES cannot be written, and an attribute's value must match its
pattern in ATTRIBUTES (a link is a ``#section``, an image a base64 SVG data URL), whatever the report holds.

Plots are inline SVG data (matplotlib, optional: without it each plot is a table, and the page says
why). However large the report, the page stays bounded: at most MAX_TABLE_ROWS rows a table (the most
damaged sites, the layers in graph order) and MAX_PLOT_SITES strips a plot, each with a count of the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asr_onnx.report.damage import (
    collapsed,
    damage_key,
    dead_mask,
    most_damaged,
    short_name,
    site_label,
    variance_ratio,
    worst,
)
from asr_onnx.report.markup import Markup, figure_tag, join, tag
from asr_onnx.report.search_page import with_search

SECTIONS = {"summary": "Summary", "settings": "Settings", "sparsity": "Per-layer sparsity",
            "groups": "Channel groups", "damage": "Damage per site", "channels": "Channels of one site",
            "gains": "Gains applied",
            "refit": "Refit", "guard": "Guard", "quantization": "Quantization", "eval": "Evaluation against dense"}
MAX_ROWS = 40  # channel rows shown in a table before "... more"
MAX_TABLE_ROWS = 400  # site or layer rows of one table
MAX_PLOT_SITES = 48  # a strip plot with more sites shows the PLOT_WORST most damaged
PLOT_WORST = 32
MAX_DEAD_LISTED = 200

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;margin:0;background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:20px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 10px}nav a{margin-right:12px;color:#0b5cad;text-decoration:none;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #dde1e6;border-radius:6px;padding:8px 12px;min-width:140px}
.card b{display:block;font-size:20px}.card span{color:#57606a;font-size:12px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}tr:nth-child(even) td{background:#fafbfc}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.name{overflow-wrap:anywhere;max-width:460px}
.bar{width:220px;height:11px;background:#eef1f4;border-radius:2px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b7dd8;border-radius:2px}.bar.bad span{background:#d9534f}
tr.dense td{color:#6e7781}.note{color:#57606a;font-size:13px}.warn{color:#9a6700}
.verdict{font-size:16px;font-weight:600}img.plot{width:100%;max-width:960px;display:block;margin:6px 0}
code{font-size:12px;background:#eef1f4;padding:0 3px;border-radius:3px;overflow-wrap:anywhere}
.banner{border-radius:6px;padding:10px 14px;margin:0 0 12px;border:1px solid}.banner b{font-size:17px}
.banner.usable{background:#e6f4ea;border-color:#1a7f37;color:#0f5323}
.banner.degraded{background:#fff4d6;border-color:#9a6700;color:#6b4700}
.banner.broken{background:#fde7e9;border-color:#cf222e;color:#82071e}
"""

# ---------------------------------------------------------------- pieces


def _num(value, digits: int = 3, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{max(digits - 2, 1)}f}%" if pct else f"{value:.{digits}g}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _table(header: list, rows: list, numeric=(), names=()) -> Markup:
    """A table of text or Markup cells. A row ``("dense", cells)`` is greyed; ``numeric`` columns are
    right-aligned and ``names`` columns wrap anywhere."""
    body = []
    for row in rows:
        dense = isinstance(row, tuple) and len(row) == 2 and row[0] == "dense"
        cells = row[1] if dense else row
        body.append(tag("tr", [tag("td", c, class_="n" if i in numeric else "name" if i in names else None)
                               for i, c in enumerate(cells)], class_="dense" if dense else None))
    return tag("table", tag("tr", [tag("th", h) for h in header]), body)


def _bar(fraction, bad: bool = False) -> Markup:
    width = 100 * min(max(float(fraction or 0.0), 0.0), 1.0)
    return tag("span", tag("span", style=f"width:{width:.1f}%"), class_="bar bad" if bad else "bar")


def _note(*children) -> Markup:
    return tag("p", *children, class_="note")


def _left_out(shown: int, total: int, what: str, order: str) -> Markup | str:
    if total <= shown:
        return ""
    return _note(f"{shown:,} of {total:,} {what} shown ({order}); the other {total - shown:,} are left out.")


def _plots_missing() -> str | None:
    """Why plots cannot be drawn, or None when matplotlib is there."""
    from asr_onnx.errors import AsrError
    from asr_onnx.report.plots import load_pyplot

    try:
        load_pyplot()
    except AsrError:
        return "matplotlib is not installed (pip install 'asr-onnx[plots]'), so tables stand in for the plots."
    return None


def _model_name(report) -> str:
    return Path(report.input).stem if report.input else "model"


def _method(settings) -> str:
    if settings.method == "auto" and settings.auto is not None and settings.auto.picked is not None:
        picked = settings.auto.picked
        return f"auto: {picked.method} ({picked.placement})"
    return settings.method or "-"


# ---------------------------------------------------------------- sections


def _verdict(report) -> Markup | str:
    verdict = report.verdict
    if verdict is None:
        return ""
    detail = (f"{verdict.metric} {verdict.value:.4g}; usable at {verdict.threshold_usable:.4g}, broken at "
              f"{verdict.threshold_broken:.4g}")
    return tag("div", tag("b", f"verdict: {verdict.label}"), " - ", verdict.reason,
               [" - ", tag("b", verdict.suggestion)] if verdict.suggestion else None,
               tag("div", detail, class_="note"), class_=f"banner {verdict.label}")


def _removed(entry) -> tuple[int, int]:
    """(channels removed, channels) over every group of a ``channels`` entry."""
    return sum(g.removed for g in entry.groups), sum(g.channels for g in entry.groups)


def _summary(report, why_no_plots: str | None) -> Markup:
    s, totals, layers, sites, entry = report.settings, report.totals, report.layers, report.sites, report.channels
    if entry is not None:  # whole channels: the weights left are dense, so their sparsity says nothing
        removed, total = _removed(entry)
        (p0, p1), (m0, m1) = entry.params, entry.macs
        cards = [(f"{removed:,} / {total:,}", "channels removed"), (_num(p1 / max(p0, 1), 3), "parameters kept"),
                 (_num(m1 / max(m0, 1), 3), "multiply-accumulates kept"),
                 (f"{entry.speedup:.2f}x" if entry.speedup is not None else "-", "measured speed-up")]
    else:
        cards = [(_num(totals.sparsity if totals else None, 3, pct=True), "sparsity reached"),
                 (_count(totals.prunable_weights if totals else None), "prunable weights"),
                 (f"{sum(1 for x in layers if x.pruned)} / {len(layers)}", "layers pruned")]
    cards += [(s.pattern or "-", "pattern"), (_method(s), "method"),
              (f"{sum(collapsed(x) for x in sites):,}", f"collapsed channels in {len(sites):,} sites")]
    scores = report.eval
    if scores is not None and scores.top1 is not None:
        cards.append((_num(scores.top1, 4, pct=True), f"top-1 (dense {_num(scores.dense_top1, 4, True)})"))
    if scores is not None and scores.agreement is not None:
        cards.append((_num(scores.agreement, 4, pct=True), "agreement with dense"))
    if s.guard is not None:
        from asr_onnx.verify.verdict import KEPT_NAMES

        kept = KEPT_NAMES.get(s.guard.kept or "", s.guard.kept or "-")  # "refit alone" says what was shipped
        cards.append((s.guard.verdict or "-", f"guard (kept {kept})"))
    html = tag("div", [tag("div", tag("b", value), tag("span", label), class_="card") for value, label in cards],
               class_="cards")
    return join(html, tag("p", why_no_plots, class_="warn") if why_no_plots else None)


def _setting_value(value) -> str | None:
    """A setting as one line of text, or None for a nested entry (rendered by its own table)."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
        return None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _settings(report) -> Markup:
    from asr_onnx.report.schema import to_dict

    s, tool, ort = report.settings, report.tool, report.onnxruntime
    rows = [["model", report.input or "-"], ["asr-onnx", (tool.version if tool else None) or "-"],
            ["onnxruntime", f"{(ort.version if ort else None) or '-'} ({(ort.provider if ort else None) or 'no session'})"]]
    rows += [[key, shown] for key, value in to_dict(s).items() if (shown := _setting_value(value)) is not None]
    triples = [rows[i:i + 3] for i in range(0, len(rows), 3)]  # three settings a row keep the section short
    parts = [_table(["setting", "value"] * 3, [[cell for row in t for cell in row] + ["", ""] * (3 - len(t))
                                                for t in triples], names=(1, 3, 5))]
    if report.timings_s:
        parts.append(_note("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings_s.items())))
    refit = s.reconstruct_auto
    if refit is not None and refit.candidates:
        parts.append(tag("p", f"reconstruct auto scored the refit and no refit on {_count(refit.held_out)} held-out "
                              f"calibration samples ({_count(refit.folds)} folds, corrected with "
                              f"{refit.scored_with or '-'})"))
        parts.append(_candidates(["reconstruct"], [[c.reconstruct or "-"] for c in refit.candidates],
                                 refit.candidates, refit.picked))
    auto = s.auto
    if auto is not None and auto.candidates:
        parts.append(tag("p", f"auto scored every candidate on {_count(auto.held_out)} held-out calibration samples "
                              f"({_count(auto.folds)} folds); rule: {auto.reason or '-'}"))
        parts.append(_candidates(["candidate"], [[f"{c.method} ({c.placement}, {c.lambda_rule})"]
                                                 for c in auto.candidates], auto.candidates, auto.picked))
    return join(parts)


def _candidates(header: list, names: list, candidates, picked) -> Markup:
    """The held-out scores of ``auto``'s (or the refit choice's) candidates, one row each; a detector's
    detection F1 and standardised error, which rank it, where the candidates have them."""
    detector = any(c.detection_f1 is not None for c in candidates)
    rows = [name + [_num(c.agreement, 3, True), _num(c.logit_rel_l2)]
            + ([_num(c.detection_f1), _num(c.standardised_error)] if detector else [])
            + ["yes" if c.tied else "no", "picked" if c == picked else ""] for name, c in zip(names, candidates)]
    scores = ["agreement", "logit rel-L2"] + (["detection F1", "standardised error"] if detector else [])
    return _table(header + scores + ["tied", ""], rows, numeric=tuple(range(1, 1 + len(scores))))


def _sparsity(report) -> Markup:
    layers = report.layers
    if not layers:
        return _note("This report lists no prunable layer.")
    rows = []
    for layer in layers[:MAX_TABLE_ROWS]:
        cells = [layer.name, layer.op or "", "x".join(str(d) for d in layer.shape), _bar(layer.sparsity),
                 _num(layer.sparsity, 3, pct=True), "" if layer.pruned else f"left dense: {layer.reason or '?'}"]
        rows.append(cells if layer.pruned else ("dense", cells))
    dense = sum(1 for x in layers if not x.pruned)
    return join(tag("p", f"{len(layers) - dense:,} of {len(layers):,} prunable layers pruned, {dense:,} left dense "
                         "(with the reason). Bars: the fraction of each layer's weights set to zero."),
                _table(["layer", "op", "weight", "sparsity", "", "note"], rows, numeric=(4,), names=(0,)),
                _left_out(min(len(layers), MAX_TABLE_ROWS), len(layers), "layers", "the first, in graph order"))


def _damage(report, why_no_plots: str | None, keys: list) -> Markup:
    sites = report.sites
    if not sites:
        return _note("No site statistics in this report (--method none measures nothing).")
    intro = tag("p", "Each channel's variance in the pruned network (upstream renormalised) over its reference "
                     "(the dense model's variance on the calibration data, or a BN's running variance under "
                     "--reference running): 1 is undamaged. A channel collapses when its pruned variance falls "
                     "under the site's epsilon.")
    table = range(len(sites)) if len(sites) <= MAX_TABLE_ROWS else worst(sites, MAX_TABLE_ROWS, keys)
    rows = []
    for i in table:
        site = sites[i]
        ratio = variance_ratio(site)
        middle = None if keys[i] is None else keys[i][0]
        rows.append([tag("span", site_label(site), title=site.tensor), site.norm or "-", _count(site.channels),
                     _bar(middle, middle is not None and middle < 0.1), _num(middle),
                     _num(None if middle is None or ratio is None else float(ratio.min())), f"{collapsed(site):,}"])
    parts: list = [intro]
    if why_no_plots:
        parts.append(_note(f"No plot: {why_no_plots}"))
    else:
        with_variances = [i for i, key in enumerate(keys) if key is not None]
        plotted = with_variances if len(with_variances) <= MAX_PLOT_SITES else worst(sites, PLOT_WORST, keys)
        if plotted:
            from asr_onnx.report.plots import strip_figure

            title = f"{_model_name(report)}: damage per channel, site by site"
            if len(plotted) < len(with_variances):
                title += f" (the {len(plotted)} most damaged of {len(with_variances):,} sites)"
            strips = [(short_name(site_label(sites[i])), variance_ratio(sites[i]), dead_mask(sites[i])) for i in plotted]
            parts.append(figure_tag(strip_figure(strips, "pruned / reference variance", title),
                                "per-channel variance ratio of every site"))
            if len(plotted) < len(with_variances):
                parts.append(_note(f"The plot shows the {len(plotted)} most damaged of {len(with_variances):,} sites "
                                   "with variances, in graph order; the table below lists more."))
    parts.append(_table(["layer / site", "norm", "channels", "median ratio", "", "min", "collapsed"], rows,
                        numeric=(2, 4, 5, 6), names=(0,)))
    parts.append(_left_out(len(rows), len(sites), "sites", "the most damaged, in graph order"))
    return join(parts)


def _channels(report, why_no_plots: str | None, site_name: str | None, keys: list) -> Markup:
    from asr_onnx.report.plots import channel_title

    site = most_damaged(report.sites, site_name, keys)
    if site is None or not site.has_variances:
        return _note("No per-channel variances in this report.")
    s = report.settings
    label = site_label(site)
    series = {f"dense ({site.reference or 'reference'})": site.reference_var, "pruned": site.pruned_var}
    if site.repaired_var is not None:
        series[f"repaired ({(_method(s) if s.method == 'auto' else s.method) or '?'})"] = site.repaired_var
    chosen = "the one named" if site_name else "the most damaged: lowest median pruned/reference variance"
    parts = [tag("p", "Site ", tag("code", site.tensor), f" ({chosen}). Repaired: the pruned variance "
                 "as the corrected normalisation passes it on, in the reference's units.")]
    if site.repaired_var is None:
        parts.append(_note("This report has no repaired variances (an older asr-onnx, or --method none)."))
    if not why_no_plots:
        from asr_onnx.report.plots import channel_figure

        title = channel_title(_model_name(report), short_name(label), s.sparsity, s.pattern or "")
        parts.append(figure_tag(channel_figure(series, title, site.eps), f"per-channel variance of {label}"))
        return join(parts)
    ratio, dead = variance_ratio(site), dead_mask(site)
    if ratio is None:  # has_variances said otherwise; kept for the type checker
        return join(parts)
    order = [i for i in np.argsort(ratio, kind="stable") if not dead[i]]
    parts.append(_note(f"No plot: {why_no_plots}"))
    if dead.any():
        listed = np.flatnonzero(dead)
        more = f" and {listed.size - MAX_DEAD_LISTED:,} more" if listed.size > MAX_DEAD_LISTED else ""
        parts.append(tag("p", f"{int(dead.sum()):,} dead channels (pruned variance under the epsilon {_num(site.eps)}): "
                              f"{', '.join(str(i) for i in listed[:MAX_DEAD_LISTED])}{more}."))
    rows = [[str(i)] + [_num(float(v[i])) for v in series.values()] + [_num(float(ratio[i]))] for i in order[:MAX_ROWS]]
    if len(order) > MAX_ROWS:
        rows.append([f"… {len(order) - MAX_ROWS:,} more channels"] + [""] * (len(series) + 1))
    parts += [tag("p", "The live channels, the most damaged first."),
              _table(["channel", *series, "ratio"], rows, numeric=tuple(range(1, len(series) + 2)))]
    return join(parts)


def _gain_spread(site) -> float:
    """How far a site's gains stray from 1 (|log| of the farthest), for choosing which to show."""
    gains = site.gains if site.gains is not None else [v for v in (site.gain.min, site.gain.max) if v is not None]
    gains = np.abs(np.asarray(gains, np.float64))
    return float(np.abs(np.log(np.maximum(gains, 1e-300))).max()) if gains.size else 0.0


def _largest(values: list[float], count: int) -> list[int]:
    """The indices of the ``count`` largest values, in their order."""
    return sorted(np.argsort(-np.asarray(values, np.float64), kind="stable")[:count].tolist())


def _gains(report, why_no_plots: str | None) -> Markup:
    sites = [s for s in report.sites if s.gain is not None or (s.gains is not None and s.gains.size)]
    if not sites:
        return _note("No gains in this report (--method none corrects nothing).")
    parts = [tag("p", "The per-channel variance gain each site received (1 = left as it was).")]
    spreads = [_gain_spread(s) for s in sites]
    if why_no_plots:
        parts.append(_note(f"No plot: {why_no_plots}"))
    else:
        with_gains = [i for i, s in enumerate(sites) if s.gains is not None and s.gains.size]
        plotted = with_gains if len(with_gains) <= MAX_PLOT_SITES else \
            [with_gains[j] for j in _largest([spreads[i] for i in with_gains], PLOT_WORST)]
        if plotted:
            from asr_onnx.report.plots import strip_figure

            title = f"{_model_name(report)}: gains per channel"
            if len(plotted) < len(with_gains):
                title += f" (the {len(plotted)} farthest from 1 of {len(with_gains):,} sites)"
            parts.append(figure_tag(strip_figure([(short_name(site_label(sites[i])), sites[i].gains, None)
                                              for i in plotted], "gain", title), "per-channel gains"))
            if len(plotted) < len(with_gains):
                parts.append(_note(f"The plot shows the {len(plotted)} sites whose gains stray farthest from 1, of "
                                   f"{len(with_gains):,}, in graph order."))
    shown = range(len(sites)) if len(sites) <= MAX_TABLE_ROWS else _largest(spreads, MAX_TABLE_ROWS)
    rows = []
    for i in shown:
        s = sites[i]
        spread = s.gain
        rows.append([site_label(s), s.written or "-", _num(spread.min if spread else None),
                     _num(spread.median if spread else None), _num(spread.max if spread else None), _num(s.lambda_)])
    return join(parts, _table(["layer / site", "written into", "min", "median", "max", "lambda"], rows,
                              numeric=(2, 3, 4, 5), names=(0,)),
                _left_out(len(rows), len(sites), "sites", "the gains farthest from 1, in graph order"))


def _refit(report) -> Markup:
    layers = [x for x in report.layers if x.refit is not None and (x.refit.err_after is not None or x.refit.skipped)]
    if not layers:
        return _note("Not run: this report has no reconstruction stage (", tag("code", "layers[i].refit"), ").")
    errors = [x.refit.err_after if x.refit.err_after is not None else -1.0 for x in layers]
    shown = range(len(layers)) if len(layers) <= MAX_TABLE_ROWS else _largest(errors, MAX_TABLE_ROWS)
    rows = [[layers[i].name, _num(layers[i].refit.err_before), _num(layers[i].refit.err_after),
             _bar(layers[i].refit.err_after), layers[i].refit.skipped or ""] for i in shown]
    return join(tag("p", "Each layer's output error relative to the dense model's, before and after the refit."),
                _table(["layer", "before", "after", "", "note"], rows, numeric=(1, 2), names=(0,)),
                _left_out(len(rows), len(layers), "layers", "the largest errors after the refit, in graph order"))


def _guard(report) -> Markup:
    guard = report.settings.guard
    if guard is None:
        return _note("Not run: this report has no guard verdict.")
    parts = [tag("p", f"{guard.verdict or '-'}: kept {guard.kept or '-'}", class_="verdict"),
             tag("p", f"mode {guard.mode or '-'}, on {_count(guard.held_out)} held-out samples, "
                      f"cost {_num(guard.cost_s)} s")]
    if guard.skipped:
        parts.append(_note(f"skipped: {guard.skipped}"))
    if guard.metric:
        parts.append(tag("p", f"decided on {guard.metric.replace('_', ' ')}"))
    pairs = (("repair", guard.repair), ("pruned", guard.pruned)) + ((("refit alone", guard.refit),)
                                                                    if guard.refit is not None else ())
    detector = any(scores is not None and scores.detection_f1 is not None for _, scores in pairs)
    rows = [[name, _num(scores.agreement if scores else None, 4, True), _num(scores.logit_rel_l2 if scores else None),
             _num(scores.standardised_error if scores else None)]
            + ([_num(scores.detection_f1 if scores else None)] if detector else []) for name, scores in pairs]
    header = ["candidate", "agreement with dense", "logit rel-L2", "standardised error"]
    return join(parts, _table(header + (["detection F1"] if detector else []), rows,
                              numeric=tuple(range(1, len(header) + detector))))


def _groups(report) -> Markup:
    """``--pattern channels``: every dependency group, what it lost, and why a group stays whole."""
    entry = report.channels
    if entry is None:
        return _note("Not run: pass ", tag("code", "--pattern channels"), " to ", tag("code", "repair"), ".")
    removed, total = _removed(entry)
    (p0, p1), (m0, m1) = entry.params, entry.macs
    speed = (f"; measured {entry.speedup:.2f}x faster than dense at batch {entry.speedup_batch} (onnxruntime, one "
             "thread)" if entry.speedup is not None else "")
    line = (f"{removed:,} of {total:,} channels removed (score {entry.score or '-'}); parameters {p0:,} -> {p1:,}, "
            f"multiply-accumulates {m0:,} -> {m1:,}{speed}. A group is a set of tensors whose channels must go "
            "together; heads count as one channel each.")
    rows = [[g.kind or "-", f"{g.channels:,}", f"{g.removed:,}", g.reason or ""] for g in entry.groups[:MAX_TABLE_ROWS]]
    return join(tag("p", line), _table(["kind", "channels", "removed", "why it stays whole"], rows, numeric=(1, 2),
                                       names=(3,)),
                _left_out(MAX_TABLE_ROWS, len(entry.groups), "groups", "in graph order"))


def _quantization(report) -> Markup:
    """The INT8 stage: what the model is quantized for, the held-out choices, and per layer the weight scales,
    2:4 on the integer codes, the output error quantization added and what the correction gave back (or a QDQ
    input's requantization, layer by layer)."""
    entry = report.quantization
    if entry is None:
        return _note("Not run: pass ", tag("code", "--int8"), " to ", tag("code", "repair"), ".")
    if entry.input == "quantized":
        rows = [[t.layer or "-", _count(t.channels), _count(t.kept), _count(t.rescaled), _count(t.rounded),
                 _count(t.new_scale)] for t in entry.tensors[:MAX_TABLE_ROWS]]
        note = "unchanged: the input model as given" if entry.unchanged else "pruned and repaired in float"
        return join(tag("p", f"A quantized (QDQ) input, {note}; its weights quantized again, channel by channel:"),
                    _table(["layer", "channels", "as they were", "rescaled (codes kept)", "rounded (old scale)",
                            "new scale"], rows, numeric=(1, 2, 3, 4, 5), names=(0,)),
                    _left_out(len(rows), len(entry.tensors), "layers", "the first, in graph order"))
    calibration, correction, out = entry.calibration, entry.correction, entry.output
    picked = calibration.picked if calibration is not None else None
    weights, acts, floats = entry.weights, entry.activations, entry.float_layers
    verdict = f" ({correction.verdict})" if correction is not None and correction.verdict else ""
    parts = [tag("p", f"QDQ for {entry.runtime or '-'}", class_="verdict"),
             tag("p", f"weights int8 per output channel, symmetric, up to {_count(weights.range if weights else None)}; "
                      f"activations {(acts.type if acts else None) or '-'}. Chosen on "
                      f"{_count(calibration.held_out if calibration else None)} held-out calibration samples "
                      f"(fitted on {_count(calibration.fit if calibration else None)}): calibration "
                      f"{(picked.calibration if picked else None) or '-'}, correction "
                      f"{(correction.picked if correction else None) or '-'}{verdict}; layers left in float: "
                      f"{', '.join(floats.picked) if floats and floats.picked else 'none'}.")]
    candidates = [[f"{c.calibration}, {c.weights} weights", _num(c.agreement, 4, True), _num(c.logit_rel_l2, 4)]
                  for c in (calibration.candidates if calibration else ())]
    candidates += [[f"{len(c.layers)} layers in float" + (f": {', '.join(c.layers)}" if c.layers else ""),
                    _num(c.agreement, 4, True), _num(c.logit_rel_l2, 4)] for c in (floats.candidates if floats else ())]
    candidates += [[f"correction {c.correction}", _num(c.agreement, 4, True), _num(c.logit_rel_l2, 4)]
                   for c in ((correction.candidates or ()) if correction else ())]
    parts.append(_table(["held-out candidate", "agreement with float", "logit rel-L2"], candidates, numeric=(1, 2)))
    if out is not None:
        scores = [[name, _num(s.agreement, 4, True), _num(s.logit_rel_l2, 4)]
                  for name, s in (("plain PTQ", out.ptq), ("corrected", out.corrected)) if s is not None]
        parts += [tag("p", f"Against the float model on {_count(out.samples)} calibration samples:"),
                  _table(["output", "agreement with float", "logit rel-L2"], scores, numeric=(1, 2))]
    layers = entry.layers
    rows = [[r.name, "int8" if r.quantized else "float",
             "-" if r.scale is None else f"{_num(r.scale.min)} - {_num(r.scale.max)}", r.nm_24 or "-",
             _num(r.rel_l2_ptq), _num(r.rel_l2_corrected)] for r in layers[:MAX_TABLE_ROWS]]
    parts += [_table(["layer", "weights", "weight scales", "2:4 (int8)", "output rel-L2, PTQ", "corrected"], rows,
                     numeric=(4, 5), names=(0,)),
              _left_out(len(rows), len(layers), "layers", "the first, in graph order")]
    return join(parts)


def _eval(report) -> Markup:
    scores = report.eval
    if scores is None:
        return _note("Not run: pass ", tag("code", "--eval DATA"), " to ", tag("code", "repair"), ".")
    top1, dense = scores.top1, scores.dense_top1
    rows = [["data", scores.data or "-"], ["samples", _count(scores.samples)],
            ["top-1", _num(top1, 4, True)], ["dense top-1", _num(dense, 4, True)],
            ["top-1 lost", "-" if top1 is None or dense is None else f"{100 * (dense - top1):.2f} points"],
            ["agreement with dense", _num(scores.agreement, 4, True)],
            ["logit relative L2 error", _num(scores.logit_rel_l2, 4)],
            ["standardised error", _num(scores.standardised_error, 4)]]
    found = scores.detection
    if found is not None:
        rows += [["detection F1 (mean over classes)", _num(found.f1, 4)], ["detection F1 pooled", _num(found.f1_pooled, 4)],
                 ["detection precision / recall", f"{_num(found.precision)} / {_num(found.recall)}"],
                 ["detections (dense / this model)",
                  f"{_count(found.reference_detections)} / {_count(found.detections)} in "
                  f"{_count(found.classes_scored)} classes"]]
    return _table(["measure", "value"], rows, names=(1,))


# ---------------------------------------------------------------- the page


def render(report, *, site: str | None = None, plots: bool = True) -> str:
    """The page, as HTML text.

    Args:
        report: a :class:`~asr_onnx.report.schema.Report`, or a report dict (built, or loaded from JSON),
            which is validated first.
        site: the site of the per-channel plot (tensor, layer or short name). Defaults to None (the most
            damaged).
        plots: draw plots where matplotlib is installed. Defaults to True.

    Raises:
        AsrError: the report does not validate, or ``site`` names no site of it with variances.
    """
    from asr_onnx.errors import AsrError
    from asr_onnx.report.schema import from_dict

    report = from_dict(report)
    if site is not None:
        try:
            named = most_damaged(report.sites, site)
        except KeyError:
            raise AsrError(f"no site named {site!r} in this report: name a site's tensor, layer or short name") \
                from None
        if not named.has_variances:
            raise AsrError(f"site {site!r} has no per-channel variances in this report: name another")
    why_no_plots = _plots_missing() if plots else "plots were not asked for, so tables stand in for them."
    s = report.settings
    keys = [damage_key(s) for s in report.sites]  # each site's damage, computed once
    bodies = {"summary": _summary(report, why_no_plots), "settings": _settings(report),
              "sparsity": _sparsity(report), "groups": _groups(report), "damage": _damage(report, why_no_plots, keys),
              "channels": _channels(report, why_no_plots, site, keys), "gains": _gains(report, why_no_plots),
              "refit": _refit(report), "guard": _guard(report), "quantization": _quantization(report),
              "eval": _eval(report)}
    name, s = _model_name(report), report.settings
    if report.channels is not None:
        removed, total = _removed(report.channels)
        amount = f"{removed:,} of {total:,} channels removed"
    else:
        amount = f"{_num(report.totals.sparsity if report.totals else None, 3, True)} {s.pattern or ''} sparsity"
    sub = (f"{amount}, method {s.method or '-'} · asr-onnx "
           f"{(report.tool.version if report.tool else None) or '?'}")
    links = [tag("a", title, href=f"#{key}") for key, title in SECTIONS.items()]
    sections = [tag("section", tag("h2", SECTIONS[key]), body, id=key) for key, body in bodies.items()]
    searched = with_search(report, why_no_plots)
    if searched is not None:  # asr-onnx search's trade-off curve and table come first
        links, sections = [searched[0], *links], [searched[1], *sections]
    nav = tag("nav", links)
    head = tag("head", tag("meta", charset="utf-8"), tag("title", f"asr-onnx report: {name}"), tag("style", Markup(CSS)))
    body = tag("body", tag("main", _verdict(report), tag("h1", f"Repair report: {name}"), tag("p", sub, class_="sub"),
                           nav, sections))
    return "<!doctype html>" + tag("html", head, body, lang="en") + "\n"


def load_report(path):
    """A saved JSON report, typed and validated (see :func:`asr_onnx.report.schema.read_json`).

    Raises:
        AsrError: the file is not a regular file, is too large, unreadable, not JSON, or not a valid report.
    """
    from asr_onnx.report.schema import read_json

    return read_json(path)


def write_html(report, path, *, site: str | None = None) -> Path:
    """Writes :func:`render`'s page atomically (temporary file, then rename)."""
    from asr_onnx.outputs import write_file

    page = render(report, site=site).encode("utf-8")
    return write_file(path, lambda handle: handle.write(page))
