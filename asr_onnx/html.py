"""The repair report as one self-contained HTML page: no script, no network, no external file.

Plots are inline SVG data (matplotlib, optional: without it each plot is a table, and the page says
why). The page reads a report dict (:func:`asr_onnx.report.build_report`, or a saved JSON report of an
older run) and tolerates any missing key. Besides build_report's keys it renders, when present:

- ``settings["guard"]``: the guard's verdict (mode, held_out, repair/pruned scores, verdict, kept, cost_s);
- ``eval``: ``repair --eval`` (data, samples, top1, dense_top1, agreement, logit_rel_l2);
- ``layers[i]["refit"]`` = ``{"rel_err_before": float, "rel_err_after": float}``: the layer's output
  error relative to the dense model's, ||y - y_dense|| / ||y_dense|| over the calibration set, before
  and after a reconstruction stage refits it (no stage writes it yet).
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import numpy as np

from .damage import collapsed, most_damaged, site_label, variance_ratio

SECTIONS = {"summary": "Summary", "settings": "Settings", "sparsity": "Per-layer sparsity",
            "damage": "Damage per site", "channels": "Channels of one site", "gains": "Gains applied",
            "refit": "Refit", "guard": "Guard", "quantization": "Quantization", "eval": "Evaluation against dense"}
MAX_ROWS = 40  # channel rows shown in a table before "... more"

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
.bar{width:220px;height:11px;background:#eef1f4;border-radius:2px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b7dd8;border-radius:2px}.bar.bad span{background:#d9534f}
tr.dense td{color:#6e7781}.note{color:#57606a;font-size:13px}.warn{color:#9a6700}
.verdict{font-size:16px;font-weight:600}img.plot{width:100%;max-width:960px;display:block;margin:6px 0}
code{font-size:12px;background:#eef1f4;padding:0 3px;border-radius:3px}
"""


def _num(value, digits: int = 3, pct: bool = False) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "-" if value is None else escape(str(value))
    return f"{100 * value:.{max(digits - 2, 1)}f}%" if pct else f"{value:.{digits}g}"


def _table(header: list, rows: list, numeric=()) -> str:
    """A table; cells are already HTML. ``numeric``: the column indices to right-align."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cls = ' class="dense"' if isinstance(row, tuple) and row and row[0] == "dense" else ""
        cells = row[1] if cls else row
        body.append(f"<tr{cls}>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                           for i, c in enumerate(cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _bar(fraction, bad: bool = False) -> str:
    width = 100 * min(max(float(fraction or 0.0), 0.0), 1.0)
    return f'<span class="bar{" bad" if bad else ""}"><span style="width:{width:.1f}%"></span></span>'


def _plots_missing() -> str | None:
    """Why plots cannot be drawn, or None when matplotlib is there."""
    from .errors import AsrError
    from .plots import load_pyplot

    try:
        load_pyplot()
    except AsrError:
        return "matplotlib is not installed (pip install 'asr-onnx[plots]'), so tables stand in for the plots."
    return None


def _image(fig, alt: str) -> str:
    from .plots import svg

    data = base64.b64encode(svg(fig).encode()).decode()
    return f'<img class="plot" alt="{escape(alt)}" src="data:image/svg+xml;base64,{data}">'


def _model_name(report: dict) -> str:
    source = report.get("input")
    return Path(source).stem if source else "model"


def _summary(report: dict, why_no_plots: str | None) -> str:
    s, totals = report.get("settings") or {}, report.get("totals") or {}
    layers, sites = report.get("layers") or [], report.get("sites") or []
    method = s.get("method", "-")
    if method == "auto" and (s.get("auto") or {}).get("picked"):
        picked = s["auto"]["picked"]
        method = f"auto: {picked.get('method')} ({picked.get('placement')})"
    cards = [(_num(totals.get("sparsity"), 3, pct=True), "sparsity reached"),
             (f"{totals.get('prunable_weights', 0):,}" if "prunable_weights" in totals else "-", "prunable weights"),
             (escape(str(s.get("pattern", "-"))), "pattern"), (escape(str(method)), "method"),
             (f"{sum(1 for x in layers if x.get('pruned'))} / {len(layers)}", "layers pruned"),
             (f"{sum(collapsed(x) for x in sites)}", f"collapsed channels in {len(sites)} sites")]
    scores = report.get("eval")
    if scores and scores.get("top1") is not None:
        cards.append((_num(scores["top1"], 4, pct=True), f"top-1 (dense {_num(scores.get('dense_top1'), 4, True)})"))
    if scores and scores.get("agreement") is not None:
        cards.append((_num(scores["agreement"], 4, pct=True), "agreement with dense"))
    guard = s.get("guard")
    if guard:
        cards.append((escape(str(guard.get("verdict", "-"))), f"guard (kept {escape(str(guard.get('kept', '-')))})"))
    html = '<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{k}</span></div>" for v, k in cards)
    html += "</div>"
    if why_no_plots:
        html += f'<p class="warn">{escape(why_no_plots)}</p>'
    return html


def _settings(report: dict) -> str:
    s = report.get("settings") or {}
    tool, ort = report.get("tool") or {}, report.get("onnxruntime") or {}
    rows = [["model", escape(str(report.get("input") or "-"))],
            ["asr-onnx", escape(str(tool.get("version", "-")))],
            ["onnxruntime", escape(f"{ort.get('version', '-')} ({ort.get('provider') or 'no session'})")]]
    rows += [[escape(k), escape(str(v))] for k, v in s.items() if not isinstance(v, dict)]
    pairs = [rows[i:i + 3] for i in range(0, len(rows), 3)]  # three settings a row keep the section short
    html = _table(["setting", "value"] * 3, [[cell for row in p for cell in row] + ["", ""] * (3 - len(p)) for p in pairs])
    timings = report.get("timings_s") or {}
    if timings:
        html += f'<p class="note">time: {escape(", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))}</p>'
    refit = s.get("reconstruct_auto")
    if refit and refit.get("candidates"):
        html += (f"<p>reconstruct auto scored the refit and no refit on {refit.get('held_out', '?')} held-out "
                 f"calibration samples ({refit.get('folds', '?')} folds, corrected with "
                 f"{escape(str(refit.get('scored_with', '-')))})</p>")
        html += _table(["reconstruct", "agreement", "logit rel-L2", "tied", ""],
                       [[escape(str(c.get("reconstruct"))), _num(c.get("agreement"), 3, True),
                         _num(c.get("logit_rel_l2")), "yes" if c.get("tied") else "no",
                         "picked" if c == refit.get("picked") else ""] for c in refit["candidates"]], numeric=(1, 2))
    auto = s.get("auto")
    if auto and auto.get("candidates"):
        picked = auto.get("picked")
        html += (f"<p>auto scored every candidate on {auto.get('held_out', '?')} held-out calibration samples "
                 f"({auto.get('folds', '?')} folds); rule: {escape(str(auto.get('reason', '-')))}</p>")
        html += _table(["candidate", "agreement", "logit rel-L2", "tied", ""],
                       [[escape(f"{c.get('method')} ({c.get('placement')}, {c.get('lambda_rule')})"),
                         _num(c.get("agreement"), 3, True), _num(c.get("logit_rel_l2")),
                         "yes" if c.get("tied") else "no", "picked" if c == picked else ""]
                        for c in auto["candidates"]], numeric=(1, 2))
    return html


def _sparsity(report: dict) -> str:
    layers = report.get("layers") or []
    if not layers:
        return '<p class="note">This report lists no prunable layer.</p>'
    rows = []
    for layer in layers:
        name = layer.get("name", "?")
        cells = [f'<span title="{escape(name)}">{escape(site_label({"layer": name}))}</span>',
                 escape(str(layer.get("op", ""))), escape("x".join(str(d) for d in layer.get("shape", []))),
                 _bar(layer.get("sparsity")), _num(layer.get("sparsity"), 3, pct=True),
                 "" if layer.get("pruned", True) else escape(f"left dense: {layer.get('reason') or '?'}")]
        rows.append(cells if layer.get("pruned", True) else ("dense", cells))
    dense = sum(1 for x in layers if not x.get("pruned", True))
    return (f"<p>{len(layers) - dense} of {len(layers)} prunable layers pruned, {dense} left dense (with the "
            f"reason). Bars: the fraction of each layer's weights set to zero.</p>"
            + _table(["layer", "op", "weight", "sparsity", "", "note"], rows, numeric=(4,)))


def _dead_mask(site: dict) -> np.ndarray:
    dead = np.zeros(int(site.get("channels") or len(site.get("pruned_var") or [])), bool)
    if "collapsed" in site:
        dead[[i for i in site["collapsed"] if i < dead.size]] = True
    elif site.get("pruned_var") is not None and site.get("eps") is not None:
        dead = np.asarray(site["pruned_var"]) < site["eps"]
    return dead


def _damage(report: dict, why_no_plots: str | None) -> str:
    sites = report.get("sites") or []
    if not sites:
        return '<p class="note">No site statistics in this report (--method none measures nothing).</p>'
    html = ("<p>Each channel's variance in the pruned network (upstream renormalised) over its reference "
            "(the dense model's variance on the calibration data, or a BN's running variance under "
            "--reference running): 1 is undamaged. A channel "
            "collapses when its pruned variance falls under the site's epsilon.</p>")
    rows, strips = [], []
    for site in sites:
        ratio = variance_ratio(site)
        label = site_label(site)
        if ratio is not None and ratio.size:
            strips.append((label, ratio, _dead_mask(site)))
        median = None if ratio is None or not ratio.size else float(np.median(ratio))
        rows.append([f'<span title="{escape(str(site.get("tensor")))}">{escape(label)}</span>',
                     escape(str(site.get("norm", "-"))), str(site.get("channels", "-")), _bar(median, median is not None
                     and median < 0.1), _num(median), _num(None if ratio is None or not ratio.size
                                                            else float(ratio.min())), str(collapsed(site))])
    if why_no_plots:
        html += f'<p class="note">No plot: {escape(why_no_plots)}</p>'
    elif strips:
        from .plots import strip_figure

        html += _image(strip_figure(strips, "pruned / reference variance", f"{_model_name(report)}: damage per "
                                    "channel, site by site"), "per-channel variance ratio of every site")
    return html + _table(["site", "norm", "channels", "median ratio", "", "min", "collapsed"], rows,
                         numeric=(2, 4, 5, 6))


def _channels(report: dict, why_no_plots: str | None, site_name: str | None) -> str:
    from .plots import channel_title

    site = most_damaged(report.get("sites") or [], site_name)
    if site is None:
        return '<p class="note">No per-channel variances in this report.</p>'
    s = report.get("settings") or {}
    label = site_label(site)
    series = {f"dense ({site.get('reference', 'reference')})": site["reference_var"], "pruned": site["pruned_var"]}
    if site.get("repaired_var") is not None:
        picked = (s.get("auto") or {}).get("picked") or {}
        method = f"auto: {picked['method']}" if s.get("method") == "auto" and picked.get("method") else s.get("method")
        series[f"repaired ({method or '?'})"] = site["repaired_var"]
    chosen = "the one named" if site_name else "the most damaged: lowest median pruned/reference variance"
    html = (f"<p>Site <code>{escape(str(site.get('tensor')))}</code> ({chosen}). Repaired: the pruned variance "
            "as the corrected normalisation passes it on, in the reference's units.</p>")
    if site.get("repaired_var") is None:
        html += '<p class="note">This report has no repaired variances (an older asr-onnx, or --method none).</p>'
    eps = site.get("eps")
    if not why_no_plots:
        from .plots import channel_figure

        title = channel_title(_model_name(report), label, s.get("sparsity"), s.get("pattern", ""))
        return html + _image(channel_figure(series, title, eps), f"per-channel variance of {label}")
    values = {k: np.asarray(v, np.float64) for k, v in series.items()}
    ratio, dead = variance_ratio(site), _dead_mask(site)
    order = [i for i in np.argsort(ratio, kind="stable") if not dead[i]]
    html += f'<p class="note">No plot: {escape(why_no_plots)}</p>'
    if dead.any():
        html += (f"<p>{int(dead.sum())} dead channels (pruned variance under the epsilon {_num(eps)}): "
                 f"{escape(', '.join(str(i) for i in np.flatnonzero(dead)))}.</p>")
    rows = [[str(i)] + [_num(float(v[i])) for v in values.values()] + [_num(float(ratio[i]))] for i in
            order[:MAX_ROWS]]
    if len(order) > MAX_ROWS:
        rows.append([f"… {len(order) - MAX_ROWS} more channels in the JSON report"] + [""] * (len(values) + 1))
    return html + "<p>The live channels, the most damaged first.</p>" + _table(
        ["channel", *values, "ratio"], rows, numeric=tuple(range(1, len(values) + 2)))


def _gains(report: dict, why_no_plots: str | None) -> str:
    sites = [s for s in report.get("sites") or [] if s.get("gain") or s.get("gains")]
    if not sites:
        return '<p class="note">No gains in this report (--method none corrects nothing).</p>'
    html = "<p>The per-channel variance gain each site received (1 = left as it was).</p>"
    if why_no_plots:
        html += f'<p class="note">No plot: {escape(why_no_plots)}</p>'
    elif any(s.get("gains") for s in sites):
        from .plots import strip_figure

        html += _image(strip_figure([(site_label(s), s["gains"], None) for s in sites if s.get("gains")], "gain",
                                    f"{_model_name(report)}: gains per channel"), "per-channel gains")
    rows = []
    for s in sites:
        spread = s.get("gain") or {}
        lam = s.get("lambda", s.get("lambda_"))
        rows.append([escape(site_label(s)), escape(str(s.get("written", "-"))), _num(spread.get("min")),
                     _num(spread.get("median")), _num(spread.get("max")), _num(lam)])
    return html + _table(["site", "written into", "min", "median", "max", "lambda"], rows, numeric=(2, 3, 4, 5))


def _refit(report: dict) -> str:
    layers = [x for x in report.get("layers") or [] if x.get("refit")]
    if not layers:
        return ('<p class="note">Not run: this report has no reconstruction stage '
                "(<code>layers[i].refit</code>).</p>")
    rows = [[escape(site_label({"layer": x.get("name", "?")})), _num(x["refit"].get("rel_err_before")),
             _num(x["refit"].get("rel_err_after")), _bar(x["refit"].get("rel_err_after"))] for x in layers]
    return ("<p>Each layer's output error relative to the dense model's, before and after the refit.</p>"
            + _table(["layer", "before", "after", ""], rows, numeric=(1, 2)))


def _guard(report: dict) -> str:
    guard = (report.get("settings") or {}).get("guard")
    if not guard:
        return '<p class="note">Not run: this report has no guard verdict.</p>'
    html = (f'<p class="verdict">{escape(str(guard.get("verdict", "-")))}: kept {escape(str(guard.get("kept", "-")))}'
            f'</p><p>mode {escape(str(guard.get("mode", "-")))}, on {guard.get("held_out", "?")} held-out samples, '
            f'cost {_num(guard.get("cost_s"))} s</p>')
    rows = [[name, _num((guard.get(name) or {}).get("agreement"), 4, True),
             _num((guard.get(name) or {}).get("logit_rel_l2"))] for name in ("repair", "pruned")]
    return html + _table(["candidate", "agreement with dense", "logit rel-L2"], rows, numeric=(1, 2))


def _quantization(report: dict) -> str:
    """The INT8 stage: what the model is quantized for, the held-out choices, and per layer the weight scales,
    the output error quantization added and what the correction gave back (or a QDQ input's requantization)."""
    entry = report.get("quantization")
    if not entry:
        return '<p class="note">Not run: pass <code>--int8</code> to <code>repair</code>.</p>'
    if entry.get("input") == "quantized":
        rows = [[escape(str(t["layer"])), str(t["channels"]), str(t["kept"]), str(t["rescaled"]), str(t["rounded"]),
                 str(t["new_scale"])] for t in entry.get("tensors") or []]
        note = "unchanged: the input model as given" if entry.get("unchanged") else "pruned and repaired in float"
        return (f"<p>A quantized (QDQ) input, {note}; its weights quantized again, channel by channel:</p>"
                + _table(["layer", "channels", "as they were", "rescaled (codes kept)", "rounded (old scale)",
                          "new scale"], rows, numeric=(1, 2, 3, 4, 5)))
    calibration, correction, out = entry["calibration"], entry["correction"], entry["output"]
    html = (f'<p class="verdict">QDQ for {escape(entry["runtime"])}</p><p>weights int8 per output channel, '
            f'symmetric, up to {entry["weights"]["range"]}; activations {escape(entry["activations"]["type"])}. '
            f'Chosen on {calibration["held_out"]} held-out calibration samples (fitted on {calibration["fit"]}): '
            f'calibration {escape(calibration["picked"]["calibration"])}, correction {escape(correction["picked"])}'
            + (f' ({escape(correction["verdict"])}).' if correction.get("verdict") else ".") + "</p>")
    candidates = [[escape(f"{c['calibration']}, {c['weights']} weights"), _num(c["agreement"], 4, True),
                   _num(c["logit_rel_l2"], 4)] for c in calibration["candidates"]]
    candidates += [[escape(f"correction {c['correction']}"), _num(c["agreement"], 4, True), _num(c["logit_rel_l2"], 4)]
                   for c in correction.get("candidates") or []]
    html += _table(["held-out candidate", "agreement with float", "logit rel-L2"], candidates, numeric=(1, 2))
    scores = [[name, _num((out.get(key) or {}).get("agreement"), 4, True), _num((out.get(key) or {}).get("logit_rel_l2"), 4)]
              for name, key in (("plain PTQ", "ptq"), ("corrected", "corrected")) if out.get(key)]
    html += f"<p>Against the float model on {out['samples']} calibration samples:</p>"
    html += _table(["output", "agreement with float", "logit rel-L2"], scores, numeric=(1, 2))
    layers = [[escape(r["name"]), "int8" if r["quantized"] else "float",
               "-" if not r.get("scale") else f"{_num(r['scale']['min'])} - {_num(r['scale']['max'])}",
               escape(r["nm_24"]), _num(r.get("rel_l2_ptq"), 3), _num(r.get("rel_l2_corrected"), 3)]
              for r in entry["layers"][:MAX_ROWS]]
    more = len(entry["layers"]) - MAX_ROWS
    return html + _table(["layer", "weights", "weight scales", "2:4 (int8)", "output rel-L2, PTQ", "corrected"],
                         layers, numeric=(4, 5)) + (f'<p class="note">... {more} more in the JSON report</p>'
                                                    if more > 0 else "")


def _eval(report: dict) -> str:
    scores = report.get("eval")
    if not scores:
        return '<p class="note">Not run: pass <code>--eval DATA</code> to <code>repair</code>.</p>'
    top1, dense = scores.get("top1"), scores.get("dense_top1")
    rows = [["data", escape(str(scores.get("data", "-")))], ["samples", str(scores.get("samples", "-"))],
            ["top-1", _num(top1, 4, True)], ["dense top-1", _num(dense, 4, True)],
            ["top-1 lost", "-" if top1 is None or dense is None else f"{100 * (dense - top1):.2f} points"],
            ["agreement with dense", _num(scores.get("agreement"), 4, True)],
            ["logit relative L2 error", _num(scores.get("logit_rel_l2"), 4)]]
    return _table(["measure", "value"], rows)


def render(report: dict, *, site: str | None = None, plots: bool = True) -> str:
    """The page, as HTML text.

    Args:
        report: a report dict, as built or as loaded from JSON.
        site: the site of the per-channel plot (tensor, layer or short name). Defaults to None (the most
            damaged).
        plots: draw plots where matplotlib is installed. Defaults to True.

    Raises:
        AsrError: ``site`` names no site of the report.
    """
    from .errors import AsrError

    if site is not None:
        try:
            most_damaged(report.get("sites") or [], site)
        except KeyError:
            raise AsrError(f"no site named {site!r} in this report: name a site's tensor, layer or short name") \
                from None
    why_no_plots = _plots_missing() if plots else "plots were not asked for, so tables stand in for them."
    s = report.get("settings") or {}
    bodies = {"summary": _summary(report, why_no_plots), "settings": _settings(report),
              "sparsity": _sparsity(report), "damage": _damage(report, why_no_plots),
              "channels": _channels(report, why_no_plots, site), "gains": _gains(report, why_no_plots),
              "refit": _refit(report), "guard": _guard(report), "quantization": _quantization(report),
              "eval": _eval(report)}
    name = _model_name(report)
    tool = report.get("tool") or {}
    sub = (f"{_num((report.get('totals') or {}).get('sparsity'), 3, True)} {s.get('pattern', '')} sparsity, "
           f"method {s.get('method', '-')} · asr-onnx {tool.get('version', '?')}")
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS.items())
    sections = "".join(f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{body}</section>'
                       for key, body in bodies.items())
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>asr-onnx report: {escape(name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>Repair report: {escape(name)}</h1><p class=sub>{escape(sub)}</p><nav>{nav}</nav>"
            f"{sections}</main></body></html>\n")


def load_report(path) -> dict:
    """A JSON report from disk.

    Raises:
        AsrError: the file is missing, unreadable, not JSON, or not a report.
    """
    import json

    from .errors import AsrError

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise AsrError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AsrError(f"{path} is not a JSON report: {e}") from None
    if not isinstance(report, dict) or not {"settings", "layers", "sites"} & set(report):
        raise AsrError(f"{path} is not an asr-onnx report (no settings, layers or sites)")
    return report


def write_html(report: dict, path, *, site: str | None = None) -> Path:
    """Writes :func:`render`'s page atomically (temporary file, then rename)."""
    from .outputs import write_file

    page = render(report, site=site).encode("utf-8")
    return write_file(path, lambda handle: handle.write(page))
