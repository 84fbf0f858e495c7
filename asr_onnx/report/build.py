"""The JSON report and the one-screen terminal summary."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np


def _floats(values) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64).ravel()]


def _spread(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"min": float(f"{values.min():.6g}"), "median": float(f"{np.median(values):.6g}"),
            "max": float(f"{values.max():.6g}")}


def repaired_variance(ref, corr, pruned_var) -> np.ndarray:
    """Each pruned channel's variance as the corrected normalisation passes it on, in the reference's units.

    The corrected site computes pre_gain * scale * (x - mean) / sqrt(var + eps) where the reference
    computed (x - ref_mean) / sqrt(ref_var + eps) (both times the BN's own scale), so a pruned variance
    v reads as v * (pre_gain * scale)^2 * (ref_var + eps) / (var + eps): ref_var once fully restored,
    v itself when nothing was corrected.
    """
    pre = 1.0 if corr.pre_gain is None else corr.pre_gain
    return pruned_var * (pre * corr.scale) ** 2 * (ref.var + ref.eps) / (corr.var + ref.eps)


def build_report(job) -> dict:
    """The report of a Repair: the verdict (when it has one), settings, per-layer pruning, per-site statistics and
    gains, timings."""
    import onnxruntime as ort

    from asr_onnx import __version__
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.prune.sparsecore import layer_rows

    sites, m = [], job.measurement
    for site in m.sites if m is not None else []:
        corr, ref = job.corrections.get(site.key), m.references[site.key]
        dense = m.dense.get(site.key)
        pruned = merge_all(m.pruned[site.key])
        entry = {
            "tensor": site.key,
            "layer": site.layer.name if site.layer else None,
            "norm": site.kind,
            "written": job.written.get(site.key, "not written"),
            "channels": int(ref.var.size),
            "eps": ref.eps,
            # what the correction restores: a BN's running statistics (--reference running), else the measured
            # dense ones
            "reference": "bn running statistics" if site.bn is not None and m.reference == "running"
            else "dense calibration statistics",
            "pruned_upstream": site.key in m.touched,
            "reference_var": _floats(ref.var),
            "pruned_var": _floats(pruned.var),
            "reference_mean": _floats(ref.mean),
            "pruned_mean": _floats(pruned.mean),
        }
        if dense is not None:
            entry.update(dense_var=_floats(dense.var), dense_mean=_floats(dense.mean))
        if corr is not None:
            entry.update(lambda_=None if corr.lam is None else float(f"{corr.lam:.6g}"), gain=_spread(corr.gain),
                         gains=_floats(corr.gain), collapsed=[int(i) for i in corr.collapsed],
                         repaired_var=_floats(repaired_variance(ref, corr, pruned.var)))
        sites.append(entry)
    layers = [asdict(layer) for layer in job.layers]
    for layer, refit in zip(layers, job.refits):
        layer["refit"] = refit
    total = sum(int(np.prod(layer["shape"])) for layer in layers if layer["pruned"])
    zeros = sum(layer["sparsity"] * np.prod(layer["shape"]) for layer in layers if layer["pruned"])
    verdict = getattr(job, "verdict", None)
    return {
        "tool": {"name": "asr-onnx", "version": __version__},
        "onnxruntime": {"version": ort.__version__, "provider": m.provider if m is not None else None},
        "input": str(job.source) if job.source else None,
    } | ({"verdict": verdict.as_dict()} if verdict is not None else {}) | {
        "settings": job.settings,
        "totals": {"prunable_weights": total, "sparsity": round(float(zeros / total), 6) if total else 0.0},
        "layers": layers,
        "sites": sites,
        "sparse_core": layer_rows(job.output if job.output is not None else job.pruned),
        "timings_s": {k: round(v, 4) for k, v in job.timings.items()},
    } | ({"eval": job.evaluation} if job.evaluation else {}) \
      | ({"channels": job.channel_report} if job.channel_report else {}) \
      | ({"quantization": job.quantization} if job.quantization else {}) \
      | engine_entry(job)


def engine_entry(job) -> dict:
    """Where the passes ran: the engine's name, its workers in the pruned pass (host, device, samples) and
    each pass it sharded (label, samples, shards, seconds)."""
    return {"engine": job.engine.name, "workers": job.workers,
            "engine_passes": [record.entry() for record in job.engine.passes]}


def write_json(report, path) -> Path:
    """Writes the report (a report dict or a :class:`~asr_onnx.report.schema.Report`) as JSON, atomically."""
    from asr_onnx.report.schema import write_json as write_typed

    return write_typed(report, path)


def write_text(text: str, path) -> Path:
    """Writes ``text`` (UTF-8) to a staging file beside ``path``, then renames it into place."""
    from asr_onnx.outputs import write_file

    return write_file(path, lambda handle: handle.write(text.encode("utf-8")))


FORMATS = {".json": "json", ".html": "html", ".htm": "html"}


def report_format(path) -> str:
    """"json" or "html", from the file's extension.

    Raises:
        AsrError: any other extension.
    """
    from asr_onnx.errors import AsrError

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise AsrError(f"report {path}: the extension must be .json or .html, got {suffix or 'none'!r}")
    return FORMATS[suffix]


def write_report(report, path) -> Path:
    """Writes the report as JSON or as a self-contained HTML page, as the extension says (atomically).

    Raises:
        AsrError: a field of the report does not validate (see :func:`asr_onnx.report.schema.from_dict`).
    """
    from asr_onnx.report.schema import from_dict

    report = from_dict(report)
    if report_format(path) == "html":
        from asr_onnx.report.html import write_html

        return write_html(report, path)
    return write_json(report, path)


def _channel_lines(entry) -> list[str]:
    groups = entry.groups
    removed, total = sum(g.removed for g in groups), sum(g.channels for g in groups)
    whole = [g for g in groups if g.whole]
    (p0, p1), (m0, m1) = entry.params, entry.macs
    lines = [f"channels: {removed:,} of {total:,} removed in {len(groups) - len(whole)} prunable groups "
             f"(score {entry.score}); params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.3f}); "
             f"MACs {m0:,} -> {m1:,} ({m1 / max(m0, 1):.3f})"]
    if entry.speedup is not None:
        lines.append(f"  measured speed-up: {entry.speedup:.2f}x dense (onnxruntime, batch {entry.speedup_batch}, "
                     "one thread, median of alternating runs on this machine)")
    alike: dict[tuple, int] = {}  # a LayerNorm's stream and its output give one reason twice: count, not repeat
    for g in whole:
        alike[(g.kind, g.channels, g.reason)] = alike.get((g.kind, g.channels, g.reason), 0) + 1
    for (kind, channels, reason), times in list(alike.items())[:5]:
        lines.append(f"  whole: {f'{times} x ' if times > 1 else ''}{kind} group of {channels} ({reason})")
    if len(alike) > 5:
        lines.append(f"  ... {sum(list(alike.values())[5:])} more whole groups: the report gives each one's reason")
    return lines


def _where_all(report_path) -> str:
    """Where the rows a summary leaves out can be read: the report that was written, if any."""
    if report_path is None:
        return "--report r.json or r.html lists them all"
    return f"{'the page' if report_format(report_path) == 'html' else 'the JSON report'} {report_path} lists them all"


def _masks(settings) -> str:
    """How the weights' masks were chosen, for the summary's pattern line ("" under channels or when unknown)."""
    if settings.pattern == "channels" or not settings.score:
        return ""
    allocation = f"{settings.allocation} budget, " if settings.allocation not in (None, str(settings.pattern)) else ""
    return f" ({allocation}{settings.score} masks)"


def summary(report, report_path=None) -> str:
    """A short, human-readable summary; no line is cut (a long name makes a long line).

    Args:
        report: a report dict or a :class:`~asr_onnx.report.schema.Report`.
        report_path: the report written beside the model (its rows are mentioned only then). Defaults to
            None.

    Raises:
        AsrError: a field of the report does not validate.
    """
    from asr_onnx.report.schema import from_dict

    report = from_dict(report)
    s, totals = report.settings, report.totals
    tool, ort = report.tool, report.onnxruntime
    lines = [report.verdict.line()] if report.verdict is not None else []
    lines += [
        f"asr-onnx {tool.version if tool else '?'}  onnxruntime {ort.version if ort else '?'}"
        f" ({(ort.provider if ort else None) or 'no session'})",
        f"pattern {s.pattern}{_masks(s)}  sparsity {totals.sparsity if totals and totals.sparsity is not None else 0:.3f} over "
        f"{totals.prunable_weights if totals and totals.prunable_weights is not None else 0:,} prunable weights  "
        f"method {s.method}" + (f" (placement {s.placement}, recal {s.recal})" if s.method != "none" else ""),
    ]
    lines.append(speed_line(report))
    if s.reconstruct_auto is not None:
        lines.extend(_reconstruct_auto_lines(s.reconstruct_auto))
    if s.auto is not None:
        lines.extend(_auto_lines(s.auto))
    if s.guard is not None and s.guard.verdict:
        lines.extend(_guard_lines(s.guard))
    elif s.guard is not None and s.guard.skipped:
        lines.append(f"guard skipped: {s.guard.skipped}")
    if report.channels is not None:
        lines.extend(_channel_lines(report.channels))
    skipped = [layer for layer in report.layers if not layer.pruned]
    lines.append(f"layers: {len(report.layers)} prunable, {len(skipped)} left dense")
    for layer in skipped[:5]:
        lines.append(f"  dense: {layer.name} ({layer.reason})")
    lines.extend(_refit_lines(report.layers, s.refit_target))
    if report.sites:
        from asr_onnx.report.damage import collapsed

        rows = report.sites
        width = max(len("layer / site"), *(len(row.label) for row in rows[:12] + rows[-11:]))
        lines.append(f"{'layer / site':<{width}} {'norm':<14} {'ch':>5} {'gain min/med/max':>22} {'collapsed':>9}")
        shown = rows if len(rows) <= 24 else rows[:12] + (None,) + rows[-11:]
        for row in shown:
            if row is None:
                lines.append(f"  ... {len(rows) - 23} more sites: {_where_all(report_path)}")
                continue
            gain = row.gain
            spread = (f"{gain.min:.3g}/{gain.median:.3g}/{gain.max:.3g}" if gain and None not in
                      (gain.min, gain.median, gain.max) else "-")
            lines.append(f"{row.label:<{width}} {row.norm or '-':<14} {_count(row.channels):>5} {spread:>22}"
                         f" {collapsed(row):>9}")
    from asr_onnx.prune.sparsecore import eligibility_summary

    if report.sparse_core is not None:
        from asr_onnx.report.schema import to_dict

        rows = [to_dict(row) for row in report.sparse_core]  # every ineligible layer when nowhere lists them
        lines.extend(eligibility_summary(rows, limit=5 if report_path else len(rows)))
    if report.quantization is not None:
        lines.extend(quantization_lines(report.quantization))
    if report.eval is not None:
        lines.append(eval_line(report.eval))
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in report.timings_s.items())
    lines.extend(textwrap.wrap(f"time: {timings}", 100, subsequent_indent="  ", break_long_words=False,
                               break_on_hyphens=False) or ["time: -"])
    return "\n".join(lines)


def speed_line(report) -> str:
    """Which runtime the output is faster on, so that nobody waits for a speed-up its pattern cannot give: zeros
    make no dense kernel faster; N:M runs sparse on TensorRT's tensor cores; fewer channels are faster anywhere."""
    pattern = str(report.settings.pattern or "global")
    quantization = report.quantization
    channels = report.channels
    if pattern == "channels" and channels is not None and not any(group.removed for group in channels.groups):
        where = "no runtime: no channel was removed (each group's reason is in the channels lines)"
    elif pattern == "channels":
        where = "every runtime: the graph is smaller (asr-onnx bench times it against dense)"
    elif ":" in pattern:
        where = (f"TensorRT's sparse tensor cores (trtexec --sparsity=enable), on the layers they take; onnxruntime "
                 f"runs {pattern} zeros at dense speed")
    else:
        where = "no stock runtime: onnxruntime and TensorRT run unstructured zeros at dense speed (the file compresses)"
    if quantization is not None and quantization.input != "quantized":
        where += f"; its INT8 form is for {quantization.runtime or '-'}"
    return f"faster on: {where}"


def _count(value) -> str:
    return "-" if value is None else str(value)


def quantization_lines(entry) -> list[str]:
    """A few lines for the terminal summary: what the output is quantized for, how, and what it costs (a typed
    :class:`~asr_onnx.report.schema.Quantization`)."""
    if entry.input == "quantized":  # a QDQ input, pruned and repaired in float, quantized again
        if entry.unchanged:
            return ["int8: the quantized input model, unchanged"]
        total = {k: sum(getattr(t, k) for t in entry.tensors) for k in ("kept", "rescaled", "rounded", "new_scale")}
        return [f"int8 (QDQ input, quantized again): weight channels {total['kept']} as they were, "
                f"{total['rescaled']} rescaled (codes kept),",
                f"  {total['rounded']} rounded at their old scale, {total['new_scale']} with a new scale"]
    weights, acts, calibration = entry.weights, entry.activations, entry.calibration
    picked = calibration.picked if calibration is not None else None
    lines = [f"int8 QDQ for {entry.runtime or '-'}",
             f"  weights int8 per channel (up to {_count(weights.range if weights else None)}), activations "
             f"{(acts.type if acts else None) or '-'}; calibration {(picked.calibration if picked else None) or '-'}, "
             f"correction {(entry.correction.picked if entry.correction else None) or '-'}",
             f"  (chosen on {_count(calibration.held_out if calibration else None)} held-out calibration samples)"]
    out = entry.output

    def score(s):
        return f"{_pct1(s.agreement)} / {_err(s.logit_rel_l2, '.3g')}"

    if out is not None and out.ptq is not None:
        lines.append(f"  against float on {_count(out.samples)} calibration samples (top-1 agreement / rel err):")
        lines.append(f"    PTQ {score(out.ptq)}" + (f", corrected {score(out.corrected)}" if out.corrected else ""))
    sparse = [row for row in entry.layers if row.float_nm_24 == "yes"]
    if sparse:
        kept = sum(row.nm_24 == "yes" for row in sparse)
        lines.append(f"  2:4 in the int8 weights: {kept} of the {len(sparse)} 2:4 layers")
    floats = [row.name for row in entry.layers if row.quantized is False]
    if floats:
        lines.append(f"  left in float: {', '.join(floats[:3])}" + (" ..." if len(floats) > 3 else ""))
    return lines


def eval_line(scores) -> str:
    """``eval (N samples): top-1 a% (dense b%)  agreement c%  logit rel-L2 d  standardised error e  detection F1
    f (pooled g)`` (a dict or a typed Eval; the last two where the report has them)."""
    from asr_onnx.report.schema import Eval, Section

    if isinstance(scores, dict):
        scores = Section(Eval)(scores, "eval")

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    top1 = f"top-1 {pct(scores.top1)} (dense {pct(scores.dense_top1)})  " if scores.top1 is not None else ""
    error = "-" if scores.logit_rel_l2 is None else f"{scores.logit_rel_l2:.4f}"
    line = f"eval ({_count(scores.samples)} samples): {top1}agreement {pct(scores.agreement)}  logit rel-L2 {error}"
    if scores.standardised_error is not None:
        line += f"  standardised error {scores.standardised_error:.4f}"
    found = scores.detection
    if found is not None and found.f1 is not None:
        line += f"  detection F1 {found.f1:.3f} (pooled {_err(found.f1_pooled)})"
    return line


def _refit_lines(layers, target: str | None = None) -> list[str]:
    """How many layers the least-squares refit changed, their median relative output errors, what the last layer
    of each residual branch was refitted towards (``target`` "block"), and the skips."""
    done = [layer.refit for layer in layers if layer.refit is not None and layer.refit.err_after is not None
            and layer.refit.err_before is not None]
    skips = [(layer.name, layer.refit.skipped) for layer in layers if layer.refit is not None and layer.refit.skipped]
    if not done and not skips:
        return []
    lines = [f"refit: {len(done)} layers, median output error {np.median([r.err_before for r in done]):.3f}"
             f" -> {np.median([r.err_after for r in done]):.3f}" if done else "refit: no layer"]
    if done and target == "block":
        lines[0] += " (each residual branch's last layer against the dense block output)"
    return lines + [f"  not refitted: {name} ({reason})" for name, reason in skips[:5]]


def _candidate_name(c) -> str:
    return f"{c.method} ({c.placement}" + (f", lambda {c.lambda_rule})" if c.method == "asr" else ")")


def _pct1(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _err(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _auto_lines(auto) -> list[str]:
    """What ``auto`` picked, each candidate's held-out scores, and the rule."""
    picked = auto.picked
    # a detector is ranked by detection F1 and the standardised error: shown where the candidates have them
    detector = any(c.detection_f1 is not None for c in auto.candidates)
    extra = f" {'det F1':>6} {'std err':>7}" if detector else ""
    lines = [f"auto picked {_candidate_name(picked) if picked else '-'} on {_count(auto.held_out)} held-out "
             f"calibration samples ({_count(auto.folds)} folds)",
             f"  {'candidate':<28} {'agreement':>9} {'logit err':>9}{extra}  tied"]
    for c in auto.candidates:
        mark = "  <- picked" if c == picked else ""
        found = f" {_err(c.detection_f1):>6} {_err(c.standardised_error):>7}" if detector else ""
        lines.append(f"  {_candidate_name(c):<28} {_pct1(c.agreement):>9} {_err(c.logit_rel_l2):>9}{found}  "
                     f"{'yes' if c.tied else 'no':<4}{mark}".rstrip())
    return lines + textwrap.wrap(f"rule: {auto.reason}", 96, initial_indent="  ", subsequent_indent="    ")


def _reconstruct_auto_lines(entry) -> list[str]:
    """What ``--reconstruct auto`` picked and both candidates' held-out scores."""
    def score(c):
        agree = "" if c.agreement is None else f"agreement {100 * c.agreement:.1f}%, "
        found = "" if c.detection_f1 is None else f"detection F1 {c.detection_f1:.3f}, "
        return f"{c.reconstruct} {agree}{found}logit err {_err(c.logit_rel_l2)}"

    picked = entry.picked.reconstruct if entry.picked else "-"
    return [f"reconstruct auto picked {picked} on {_count(entry.held_out)} held-out calibration "
            f"samples ({_count(entry.folds)} folds, scored with {entry.scored_with})",
            "  " + "; ".join(score(c) for c in entry.candidates)]


def _guard_lines(guard) -> list[str]:
    """The guard's verdict, what it kept and cost, then both held-out scores."""
    def score(entry):
        if entry is None:
            return "-"
        agree = "" if entry.agreement is None else f"agreement {100 * entry.agreement:.1f}%, "
        found = "" if entry.detection_f1 is None else f"detection F1 {entry.detection_f1:.3f}, "
        standard = "" if entry.standardised_error is None else f", std err {entry.standardised_error:.4g}"
        return f"{agree}{found}rel err {_err(entry.logit_rel_l2, '.4g')}{standard}"

    verdict = guard.verdict if guard.refit is None else f"{guard.verdict} (the repair against pruning alone)"
    from asr_onnx.verify.verdict import KEPT_NAMES

    kept = KEPT_NAMES.get(guard.kept or "", guard.kept)
    return [f"guard ({guard.mode}, {_count(guard.held_out)} held-out samples): {verdict}, kept the {kept}"
            f" ({_err(guard.cost_s, '.2f')}s)", f"  repair {score(guard.repair)}; pruning alone {score(guard.pruned)}"
            + ("" if guard.refit is None else f"; the refit alone {score(guard.refit)}")]
