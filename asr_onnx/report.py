"""The JSON report and the one-screen terminal summary."""

from __future__ import annotations

import json
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
    """The report of a Repair: settings, per-layer pruning, per-site statistics and gains, timings."""
    import onnxruntime as ort

    from . import __version__
    from .int8 import sparse_rows
    from .stats import merge_all

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
    return {
        "tool": {"name": "asr-onnx", "version": __version__},
        "onnxruntime": {"version": ort.__version__, "provider": m.provider if m is not None else None},
        "input": str(job.source) if job.source else None,
        "settings": job.settings,
        "totals": {"prunable_weights": total, "sparsity": round(float(zeros / total), 6) if total else 0.0},
        "layers": layers,
        "sites": sites,
        "sparse_core": sparse_rows(job.output if job.output is not None else job.pruned),
        "timings_s": {k: round(v, 4) for k, v in job.timings.items()},
    } | ({"eval": job.evaluation} if job.evaluation else {}) \
      | ({"channels": job.channel_report} if job.channel_report else {}) \
      | ({"quantization": job.quantization} if job.quantization else {})


def write_json(report: dict, path) -> Path:
    """Writes the report atomically (a staging file, then rename)."""
    text = json.dumps(report, indent=1, sort_keys=False).replace('"lambda_"', '"lambda"')
    return write_text(text + "\n", path)


def write_text(text: str, path) -> Path:
    """Writes ``text`` (UTF-8) to a staging file beside ``path``, then renames it into place."""
    from .outputs import write_file

    return write_file(path, lambda handle: handle.write(text.encode("utf-8")))


FORMATS = {".json": "json", ".html": "html", ".htm": "html"}


def report_format(path) -> str:
    """"json" or "html", from the file's extension.

    Raises:
        AsrError: any other extension.
    """
    from .errors import AsrError

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise AsrError(f"report {path}: the extension must be .json or .html, got {suffix or 'none'!r}")
    return FORMATS[suffix]


def write_report(report: dict, path) -> Path:
    """Writes the report as JSON or as a self-contained HTML page, as the extension says (atomically)."""
    if report_format(path) == "html":
        from .html import write_html

        return write_html(report, path)
    return write_json(report, path)


def _channel_lines(entry: dict) -> list[str]:
    groups = entry["groups"]
    removed, total = sum(g["removed"] for g in groups), sum(g["channels"] for g in groups)
    whole = [g for g in groups if g["whole"]]
    (p0, p1), (m0, m1) = entry["params"], entry["macs"]
    lines = [f"channels: {removed:,} of {total:,} removed in {len(groups) - len(whole)} prunable groups "
             f"(score {entry['score']}); params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.3f}); "
             f"MACs {m0:,} -> {m1:,} ({m1 / max(m0, 1):.3f})"]
    lines += [f"  whole: {g['kind']} group of {g['channels']} ({g['whole']})" for g in whole[:5]]
    return lines


def summary(report: dict, width: int = 100) -> str:
    """A one-screen, human-readable summary."""
    s = report["settings"]
    lines = [
        f"asr-onnx {report['tool']['version']}  onnxruntime {report['onnxruntime']['version']}"
        f" ({report['onnxruntime']['provider'] or 'no session'})",
        f"pattern {s.get('pattern')}  sparsity {report['totals']['sparsity']:.3f} over "
        f"{report['totals']['prunable_weights']:,} prunable weights  method {s.get('method')}"
        + (f" (placement {s.get('placement')}, recal {s.get('recal')})" if s.get("method") != "none" else ""),
    ]
    if s.get("reconstruct_auto"):
        lines.extend(_reconstruct_auto_lines(s["reconstruct_auto"]))
    if s.get("auto"):
        lines.extend(_auto_lines(s["auto"]))
    if s.get("guard", {}).get("verdict"):
        lines.extend(_guard_lines(s["guard"]))
    elif s.get("guard", {}).get("skipped"):
        lines.append(f"guard skipped: {s['guard']['skipped']}")
    if report.get("channels"):
        lines.extend(_channel_lines(report["channels"]))
    skipped = [layer for layer in report["layers"] if not layer["pruned"]]
    lines.append(f"layers: {len(report['layers'])} prunable, {len(skipped)} left dense")
    for layer in skipped[:5]:
        lines.append(f"  dense: {layer['name']} ({layer['reason']})")
    lines.extend(_refit_lines(report["layers"]))
    if report["sites"]:
        lines.append(f"{'site':<40} {'norm':<14} {'ch':>5} {'gain min/med/max':>22} {'collapsed':>9}")
        rows = report["sites"]
        shown = rows if len(rows) <= 24 else rows[:12] + [None] + rows[-11:]
        for row in shown:
            if row is None:
                lines.append(f"  ... {len(rows) - 23} more sites in the JSON report")
                continue
            gain = row.get("gain")
            spread = f"{gain['min']:.3g}/{gain['median']:.3g}/{gain['max']:.3g}" if gain else "-"
            lines.append(f"{row['tensor'][:40]:<40} {row['norm']:<14} {row['channels']:>5} {spread:>22}"
                         f" {len(row.get('collapsed', [])):>9}")
    from .sparsecore import eligibility_summary

    if report.get("sparse_core") is not None:
        lines.extend(eligibility_summary(report["sparse_core"]))
    if report.get("quantization"):
        from .int8 import summary_lines

        lines.extend(summary_lines(report["quantization"]))
    if report.get("eval"):
        lines.append(eval_line(report["eval"]))
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items())
    lines.append(f"time: {timings}")
    return "\n".join(line[:width] for line in lines)


def eval_line(scores: dict) -> str:
    """``eval (N samples): top-1 a% (dense b%)  agreement c%  logit rel-L2 d``."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    top1 = (f"top-1 {pct(scores.get('top1'))} (dense {pct(scores.get('dense_top1'))})  "
            if scores.get("top1") is not None else "")
    return (f"eval ({scores.get('samples')} samples): {top1}agreement {pct(scores.get('agreement'))}  "
            f"logit rel-L2 {scores.get('logit_rel_l2', float('nan')):.4f}")

def _refit_lines(layers: list[dict]) -> list[str]:
    """How many layers the least-squares refit changed, their median relative output errors, and the skips."""
    done = [layer["refit"] for layer in layers if "err_after" in layer.get("refit", {})]
    skips = [(layer["name"], layer["refit"]["skipped"]) for layer in layers if "skipped" in layer.get("refit", {})]
    if not done and not skips:
        return []
    lines = [f"refit: {len(done)} layers, median output error {np.median([r['err_before'] for r in done]):.3f}"
             f" -> {np.median([r['err_after'] for r in done]):.3f}" if done else "refit: no layer"]
    return lines + [f"  not refitted: {name} ({reason})" for name, reason in skips[:5]]


def _auto_lines(auto: dict) -> list[str]:
    """What ``auto`` picked, each candidate's held-out scores, and the rule."""
    def name(c):
        return f"{c['method']} ({c['placement']}" + (f", lambda {c['lambda_rule']})" if c["method"] == "asr" else ")")

    picked = auto["picked"]
    lines = [f"auto picked {name(picked)} on {auto['held_out']} held-out calibration samples ({auto['folds']} folds)",
             f"  {'candidate':<28} {'agreement':>9} {'logit err':>9}  tied"]
    for c in auto["candidates"]:
        mark = "  <- picked" if c == picked else ""
        agreement = "-" if c["agreement"] is None else f"{100 * c['agreement']:.1f}%"
        lines.append(f"  {name(c):<28} {agreement:>9} {c['logit_rel_l2']:>9.3f}  "
                     f"{'yes' if c['tied'] else 'no':<4}{mark}".rstrip())
    return lines + textwrap.wrap(f"rule: {auto['reason']}", 96, initial_indent="  ", subsequent_indent="    ")


def _reconstruct_auto_lines(entry: dict) -> list[str]:
    """What ``--reconstruct auto`` picked and both candidates' held-out scores."""
    def score(c):
        agree = "" if c["agreement"] is None else f"agreement {100 * c['agreement']:.1f}%, "
        return f"{c['reconstruct']} {agree}logit err {c['logit_rel_l2']:.3f}"

    return [f"reconstruct auto picked {entry['picked']['reconstruct']} on {entry['held_out']} held-out calibration "
            f"samples ({entry['folds']} folds, scored with {entry['scored_with']})",
            "  " + "; ".join(score(c) for c in entry["candidates"])]


def _guard_lines(guard: dict) -> list[str]:
    """The guard's verdict, what it kept and cost, then both held-out scores."""
    def score(entry):
        agree = "" if entry["agreement"] is None else f"agreement {100 * entry['agreement']:.1f}%, "
        return f"{agree}rel err {entry['logit_rel_l2']:.4g}"

    return [f"guard ({guard['mode']}, {guard['held_out']} held-out samples): {guard['verdict']}, kept {guard['kept']}"
            f" ({guard['cost_s']:.2f}s)", f"  repair {score(guard['repair'])}; pruning alone {score(guard['pruned'])}"]
