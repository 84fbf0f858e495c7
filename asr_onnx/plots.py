"""PNG plots of a sweep (needs the ``plots`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .errors import AsrError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AsrError("plots need matplotlib: pip install 'asr-onnx[plots]', or pass --no-plots") from None
    return plt


def accuracy_vs_sparsity(result, path) -> Path:
    """Top-1 (or agreement) against sparsity, one line per (method, regime), for non-N:M patterns."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result.rows if r["sparsity"] is not None]
    metric = "top1" if rows and rows[0].get("top1") is not None else "agreement"
    lines = dict.fromkeys((r["pattern"], r["method"], r["recal"], r["placement"]) for r in rows)
    for pattern, method, recal, placement in lines:
        points = sorted((r["sparsity"], 100 * r[metric]) for r in rows
                        if (r["pattern"], r["method"], r["recal"], r["placement"]) == (pattern, method, recal, placement))
        label = method if method == "none" else f"{method} ({recal}, {placement})"
        ax.plot(*zip(*points), marker="o", label=f"{pattern}: {label}")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(result.dense["model"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def gain_vs_severity(result, path) -> Path:
    """Top-1 of ASR minus that of LW against pruning severity (the paper's Fig. 6)."""
    plt = _pyplot()
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
        ax.scatter(xs, ys, label=regime)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean pruned / reference channel variance (lower = more severe)")
    ax.set_ylabel(f"ASR - LW {metric} (points)")
    ax.set_title(result.dense["model"])
    if points:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def channel_variance(dense_var, repaired: dict, path, title: str = "") -> Path:
    """Per-channel variance after each repair against the dense model's, for one layer (the paper's Fig. 4)."""
    import numpy as np

    plt = _pyplot()
    order = np.argsort(dense_var)[::-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.asarray(dense_var)[order], color="black", lw=2, label="dense")
    for method, var in repaired.items():
        ax.plot(np.asarray(var)[order], lw=1, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("channel (sorted by dense variance)")
    ax.set_ylabel("activation variance")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sweep_plots(result, folder) -> list[Path]:
    """Every plot the sweep's data supports, written into ``folder``."""
    folder = Path(folder)
    paths = [accuracy_vs_sparsity(result, folder / "accuracy_vs_sparsity.png"),
             gain_vs_severity(result, folder / "asr_minus_lw_vs_severity.png")]
    if result.channel_var:
        site = result.channel_var
        paths.append(channel_variance(site["dense"], site["repaired"], folder / "channel_variance.png",
                                      f"{result.dense['model']}: {site['site']} at {site['cell']}"))
    return paths
