"""The search's section of the HTML report: the trade-off curve (matplotlib, optional) and its table.

It reads the report's ``search`` entry (:meth:`asr_onnx.pipeline.sparsity_search.SearchTable.to_json`) and tolerates any
missing key; a report without one gets no section.
"""

from __future__ import annotations

from asr_onnx.report.markup import figure_tag, join, tag

TITLE = "Search: how sparse can it go"


def with_search(report, why_no_plots: str | None):
    """The search's nav link and section, or None when the report holds no search (a report's top-level
    ``search`` entry, kept as validated plain JSON in the typed report's ``extra``)."""
    entry = report.extra.get("search") if hasattr(report, "extra") else (report.get("search") if report else None)
    if not isinstance(entry, dict):
        return None
    return (tag("a", "Search", href="#search"),
            tag("section", tag("h2", TITLE), section(entry, why_no_plots), id="search"))


def section(entry: dict, why_no_plots: str | None):
    """The curve (where matplotlib is there), the conclusion and the table of every probe."""
    probes = sorted((p for p in entry.get("probes") or [] if isinstance(p, dict)),
                    key=lambda p: p.get("level", 0.0) if isinstance(p.get("level"), (int, float)) else 0.0)
    chosen = entry.get("chosen") if isinstance(entry.get("chosen"), dict) else {}
    channels = entry.get("axis") == "kept FLOPs"
    target = entry.get("target") if isinstance(entry.get("target"), dict) else {}
    parts = [tag("p", _conclusion(entry, probes, channels))]
    if not why_no_plots and probes:
        parts.append(_image(figure(probes, chosen, target, channels), "held-out agreement against sparsity"))
    first = ["kept FLOPs target", "kept MACs"] if channels else ["sparsity"]
    header = first + ["held-out agreement", "held-out rel. error", "kept", "guard", "verdict", "latency ms",
                      "dense ms", "speed-up", "probe s"]
    rows = []
    for p in probes:
        mark = " (chosen)" if p.get("level") == chosen.get("level") else ""
        point = [_num(p.get("flops_target")) + mark, _num(p.get("kept_macs"))] if channels else \
            [_num(p.get("sparsity")) + mark]
        if p.get("note"):
            rows.append(point + [str(p["note"])] + [""] * (len(header) - len(point) - 1))
            continue
        speedup = p.get("speedup")
        se = p.get("agreement_se")
        agreement = _pct(p.get("agreement")) + ("" if not isinstance(se, (int, float)) else f" ± {100 * se:.2f}")
        rows.append(point + [agreement, _num(p.get("error")), str(p.get("kept", "-")), str(p.get("guard") or "-"),
                             "usable" if p.get("usable") else "not usable", _num(p.get("latency_ms")),
                             _num(p.get("dense_latency_ms")),
                             "-" if not isinstance(speedup, (int, float)) else f"{speedup:.2f}x", _num(p.get("seconds"))])
    parts.append(_table(header, rows, numeric=tuple(i for i, h in enumerate(header) if h not in ("kept", "guard", "verdict"))))
    cost = entry.get("cost") if isinstance(entry.get("cost"), dict) else {}
    if cost.get("full_repairs") is not None:
        parts.append(tag("p", f"Cost: {cost.get('probes', len(probes))} probes, {_num(cost.get('total_s'))} s in all, "
                              f"{_num(cost.get('full_repairs'))} times the final repair ({_num(cost.get('final_s'))} s); "
                              f"held out: {entry.get('held_out', '?')} calibration samples, {entry.get('folds', '?')} folds.",
                         class_="note"))
    return join(*parts)


def figure(probes: list, chosen: dict, target: dict, channels: bool):
    """Held-out agreement (or error) against sparsity (or kept FLOPs), usable points filled, the target dashed,
    the chosen point ringed; the measured speed-up on a second axis where the probes were benched."""
    from asr_onnx.report.plots import load_pyplot

    plt = load_pyplot()
    by_agreement = target.get("min_agreement") is not None and all(p.get("agreement") is not None for p in probes
                                                                   if not p.get("note"))
    scored = [p for p in probes if not p.get("note")]
    xs = [p["flops_target"] if channels else p["sparsity"] for p in scored]
    ys = [100 * p["agreement"] if by_agreement else p["error"] for p in scored]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    dense = (1.0 if channels else 0.0, 100.0 if by_agreement else 0.0)  # the dense model, the curve's start
    ax.scatter(*dense, color="grey", s=28, zorder=3, label="dense")
    ax.plot([dense[0]] + xs, [dense[1]] + ys, color="tab:blue", lw=1, alpha=0.6)
    for x, y, p in zip(xs, ys, scored):
        ax.scatter([x], [y], color="tab:blue" if p.get("usable") else "tab:red", zorder=3, s=28,
                   marker="o" if p.get("usable") else "x")
    line = 100 * target["min_agreement"] if by_agreement else target.get("max_error")
    if line is not None:
        ax.axhline(line, color="black", lw=0.8, ls="--", label="target")
    if chosen and not chosen.get("note"):
        x = chosen["flops_target"] if channels else chosen["sparsity"]
        y = 100 * chosen["agreement"] if by_agreement else chosen["error"]
        ax.scatter([x], [y], s=160, facecolors="none", edgecolors="black", zorder=4, label="chosen")
    ax.set_xlabel("kept FLOPs target" if channels else "sparsity")
    ax.set_ylabel("held-out agreement with dense (%)" if by_agreement else "held-out relative error")
    if channels:
        ax.invert_xaxis()  # sparser to the right, as for a sparsity
    speedups = [(x, p["speedup"]) for x, p in zip(xs, scored) if p.get("speedup") is not None]
    if speedups:
        twin = ax.twinx()
        twin.scatter(*zip(*speedups), marker="s", s=14, color="grey")
        twin.set_ylabel("measured speed-up (x)", color="grey")
        ax.scatter([], [], marker="s", s=14, color="grey", label="speed-up (right axis)")  # in the one legend
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _conclusion(entry: dict, probes: list, channels: bool) -> str:
    target = entry.get("target") or {}
    parts = ([] if target.get("min_agreement") is None else [f"agreement >= {100 * target['min_agreement']:g}%"]) + \
            ([] if target.get("max_error") is None else [f"relative error <= {target['max_error']:g}"])
    chosen = entry.get("chosen")
    what = " and ".join(parts) or "the target"
    if not chosen:
        return f"No probe keeps held-out {what}."
    point = f"kept FLOPs target {chosen.get('flops_target')}" if channels else f"sparsity {chosen.get('sparsity')}"
    return (f"Chosen: {point}, the sparsest of {len(probes)} probes that keeps held-out {what} "
            f"(bisection at resolution {entry.get('resolution')}).")


def _image(fig, alt: str):
    return figure_tag(fig, alt)


def _table(header: list, rows: list, numeric=()):
    """A table in the page's style; every cell is text. ``numeric``: the column indices to right-align."""
    return tag("table", tag("tr", [tag("th", h) for h in header]),
               [tag("tr", [tag("td", c, class_="n" if i in numeric else None) for i, c in enumerate(row)]) for row in rows])


def _num(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _pct(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.2f}%"
