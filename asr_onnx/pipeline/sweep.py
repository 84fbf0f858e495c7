"""A grid of repairs (pattern x sparsity x method x recalibration), evaluated against the dense model.

Dense statistics are measured once per model and calibration set, pruned statistics once per
(pattern, sparsity), and the dense model's logits once per evaluation set.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from asr_onnx.pipeline.driver import Repair
from asr_onnx.pipeline.recipe import Recipe
from asr_onnx.verify.evaluation import evaluate


@dataclass
class Grid:
    """The axes of a sweep.

    Attributes:
        sparsities: fractions for global/uniform patterns. Defaults to (0.5, 0.7, 0.8, 0.9, 0.95).
        patterns: "global", "uniform" or "N:M". Defaults to ("global",).
        methods: none, bn, lw, naive, asr, auto, and reflow (bn without the head correction,
            i.e. BN recalibration only). Defaults to none, bn, lw, naive, asr.
        regimes: (recal, placement) or (recal, placement, correct_head) tuples, e.g.
            ("exact", "recal") or ("momentum", "pre-bn", False) for the paper's pipeline; recal may name
            its own momentum, "momentum=0.3". A pair takes ``correct_head``. Defaults to (("exact", "recal"),).
        lambda_rule: ASR's lambda rule. Defaults to "median".
        momentum: for a regime that says "momentum" without a value. Defaults to 0.1.
        correct_head: as for Repair.correct, for regimes that do not say. Defaults to True.
    """

    sparsities: tuple = (0.5, 0.7, 0.8, 0.9, 0.95)
    patterns: tuple = ("global",)
    methods: tuple = ("none", "bn", "lw", "naive", "asr")
    regimes: tuple = (("exact", "recal"),)
    lambda_rule: str = "median"
    momentum: float = 0.1
    correct_head: bool = True

    def recal(self, text: str) -> tuple[str, float]:
        """A regime's recal text, "exact", "momentum" or "momentum=M", as (mode, momentum)."""
        mode, _, value = str(text).partition("=")
        return mode, float(value) if value else self.momentum

    def cells(self):
        """(pattern, sparsity) pairs; an N:M pattern has one cell whatever the sparsity."""
        for pattern in self.patterns:
            if ":" in str(pattern):
                yield pattern, None
            else:
                yield from ((pattern, s) for s in self.sparsities)


@dataclass
class SweepResult:
    dense: dict
    rows: list = field(default_factory=list)
    channel_var: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"dense": self.dense, "rows": self.rows, "channel_var": self.channel_var}

    def write(self, folder) -> tuple[Path, Path]:
        """Writes results.json and results.md into ``folder`` (each atomically)."""
        from asr_onnx.outputs import write_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.to_json(), indent=1)), ("results.md", markdown(self))):
            write_file(folder / name, lambda handle, text=text: handle.write((text + "\n").encode()))
        return folder / "results.json", folder / "results.md"


RESULT_FILES = ("results.json", "results.md")


def run_sweep(model, calib, eval_data, grid: Grid | None = None, *, name: str | None = None, batch_size: int | None = None,
              device: str = "auto", progress: bool = True, dense_stats=None, on_row=None,
              watch: bool = True, watch_site: str | None = None) -> SweepResult:
    """Runs every cell of ``grid`` on one model.

    Args:
        model: path or onnx.ModelProto of the dense model.
        calib: calibration CalibSet.
        eval_data: evaluation CalibSet (labels give top-1; agreement with the dense model is always given).
        grid: the axes. Defaults to None (``Grid()``).
        name: the model's name in the rows. Defaults to the file name.
        batch_size: calibration batch size. Defaults to None (64, or the set's size when smaller).
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        progress: progress bars on a TTY. Defaults to True.
        dense_stats: cached dense statistics. Defaults to None (measured once here).
        on_row: called with each row as it is produced (for live output). Defaults to None.
        watch: record per-channel variances after each method at the sparsest cell (an extra short
            pass per method, for the channel-variance plot). Defaults to True.
        watch_site: the site to watch (its tensor, layer or short name). Defaults to None: the site whose
            median pruned/reference variance ratio is lowest.
    """
    name = name or (Path(model).name if not hasattr(model, "graph") else "model")
    dense_logits: list = []
    base = Repair(model, device=device, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    dense = evaluate(base.dense, eval_data, reference=base.dense, device=device, progress=progress,
                     reference_logits=dense_logits)
    result = SweepResult({"model": name, "top1": dense.get("top1"), "eval_s": time.perf_counter() - start})
    grid = grid or Grid()
    cells, scored = list(grid.cells()), {}
    regimes = [tuple(r) if len(r) == 3 else (*r, grid.correct_head) for r in grid.regimes]
    watched = max((c for c in cells if c[1] is not None), key=lambda c: c[1], default=None)
    for pattern, sparsity in cells:
        job = base.fork(pruned=False)
        job.prune(0.0 if sparsity is None else sparsity, pattern)
        start = time.perf_counter()
        if any(m != "none" for m in grid.methods):
            job.measure(calib, dense_stats)
            dense_stats = job.measurement.dense
        measure_s = time.perf_counter() - start
        ratio = variance_ratio(job.measurement) if job.measurement is not None else None
        for recal, placement, head in regimes:
            for method in grid.methods:
                if method == "none" and (recal, placement, head) != regimes[0]:
                    continue  # pruning alone does not depend on the regime
                if method == "auto" and placement != next(p for r, p, _ in regimes if r == recal):
                    continue  # auto chooses its own placement
                start = time.perf_counter()
                mode, momentum = grid.recal(recal)
                corrects_head = head and method != "reflow"  # "reflow" is bn with the head left alone
                if method == "none":
                    output = job.pruned
                else:
                    recipe = Recipe(method="bn" if method == "reflow" else method, placement=placement, recal=mode,
                                    momentum=momentum, lambda_rule=grid.lambda_rule, correct_head=corrects_head)
                    if method == "auto":
                        job.auto(calib, recal=recipe.recal, momentum=recipe.momentum, correct_head=head)
                    else:
                        job.correct(**recipe.correction())
                    output = job.fold().output
                repair_s = time.perf_counter() - start
                digest = hashlib.sha256(output.SerializeToString(deterministic=True)).hexdigest()
                if digest not in scored:  # identical models (bn and naive under recal) are evaluated once
                    scored[digest] = evaluate(output, eval_data, reference=base.dense, device=device,
                                              progress=progress, reference_logits=dense_logits)
                scores = scored[digest]
                row = {"model": name, "pattern": pattern, "sparsity": sparsity, "method": method, "recal": recal,
                       "placement": placement, "head": corrects_head, **scores, "variance_ratio": ratio,
                       "measure_s": round(measure_s, 3), "repair_s": round(repair_s, 3)}
                if method == "auto":
                    row["picked"] = job.auto_pick
                result.rows.append(row)
                if watch and job.measurement is not None and (pattern, sparsity) == watched and (recal, placement, head) == regimes[0]:
                    _watch(result, job, output, method, calib, pattern, sparsity, device, watch_site)
                if on_row:
                    on_row(row)
    return result


def _watch(result, job, output, method, calib, pattern: str, sparsity: float, device: str, site: str | None = None,
           samples: int = 256) -> None:
    """Records the measured per-channel variance after ``method`` at one site: the named one, else the one
    with the lowest median pruned/reference variance ratio (the paper's Fig. 4)."""
    from asr_onnx.errors import AsrError
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.report.damage import most_damaged

    subset = calib.take(samples) if hasattr(calib, "take") else calib
    if not result.channel_var:
        m = job.measurement
        entries = [{"tensor": s.key, "layer": s.layer.name if s.layer else None, "eps": m.references[s.key].eps,
                    "reference_var": m.references[s.key].var, "pruned_var": merge_all(m.pruned[s.key]).var}
                   for s in m.sites]
        try:
            chosen = most_damaged(entries, site)
        except KeyError:
            raise AsrError(f"no site named {site!r}: name a site's tensor, layer or short name") from None
        key = chosen["tensor"]
        result.channel_var = {"site": key, "layer": chosen["layer"], "pattern": pattern, "sparsity": sparsity,
                              "cell": f"{pattern} {sparsity:g}", "repaired": {},
                              "dense": output_variance(job.dense, subset, key, job.batch_size, device).tolist()}
    key = result.channel_var["site"]
    result.channel_var["repaired"][method] = output_variance(output, subset, key, job.batch_size, device).tolist()


def output_variance(model, data, key: str, batch_size: int, device: str):
    """The measured per-channel variance after a site's normalisation (its BN output, or the layer output)."""
    from asr_onnx.measure.passes import measure
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.model.graph import find_layers, find_sites, to_graph

    batches, _ = measure(model, data, batch_size=min(batch_size, len(data)), device=device, progress=False)
    var = merge_all(batches[key]).var
    graph = to_graph(model)
    site = next(s for s in find_sites(graph, find_layers(graph)) if s.key == key)
    if site.bn is None:
        return var
    scale, _, _, running_var = (t.values.astype("float64") for t in site.bn.inputs[1:5])
    return var * scale**2 / (running_var + site.eps)


def variance_ratio(measurement) -> float:
    """Pruning severity: the mean over sites and channels of pruned / reference variance (1 = no damage).

    Args:
        measurement: a measure.Measurement.
    """
    import numpy as np

    from asr_onnx.measure.stats import merge_all

    ratios = [np.mean(np.minimum(merge_all(measurement.pruned[k]).var / np.maximum(ref.var, ref.eps), 1.0))
              for k, ref in measurement.references.items()]
    return round(float(np.mean(ratios)), 6)


def _cell(row) -> str:
    top1 = f"{100 * row['top1']:.2f}" if row.get("top1") is not None else "-"
    agreement = "-" if row.get("agreement") is None else f"{100 * row['agreement']:.1f}"  # None: not a classifier
    return f"{top1} ({agreement})"


def markdown(result: SweepResult) -> str:
    """One table per model: a row per (pattern, sparsity, regime), a column per method.

    Cells read ``top-1 (agreement with dense)`` in percent.
    """
    methods = list(dict.fromkeys(r["method"] for r in result.rows))
    keys = list(dict.fromkeys((r["pattern"], r["sparsity"], r["recal"], r["placement"]) for r in result.rows))
    none_rows = {(r["pattern"], r["sparsity"]): r for r in result.rows if r["method"] == "none"}
    dense = result.dense
    lines = [f"**{dense['model']}**: dense top-1 {100 * dense['top1']:.2f}%" if dense.get("top1") is not None
             else f"**{dense['model']}**",
             "",
             "| pattern | sparsity | recal | placement | " + " | ".join(methods) + " | best |",
             "|---|---|---|---|" + "---|" * (len(methods) + 1)]
    for pattern, sparsity, recal, placement in keys:
        cells, best, best_score = [], "-", None
        for method in methods:
            row = next((r for r in result.rows if (r["pattern"], r["sparsity"], r["recal"], r["placement"],
                                                    r["method"]) == (pattern, sparsity, recal, placement, method)),
                       none_rows.get((pattern, sparsity)) if method == "none" else None)
            cells.append(_cell(row) if row else "")
            score = row and (row.get("top1") if row.get("top1") is not None else row["agreement"])
            if row and method != "none" and (best_score is None or score > best_score):
                best, best_score = method, score
        shown = "-" if sparsity is None else f"{sparsity:g}"
        lines.append(f"| {pattern} | {shown} | {recal} | {placement} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)
