"""How sparse can it go: the sparsest repaired model that keeps a target agreement with the dense model (issue 32).

A probe prunes at one sparsity (under ``--pattern channels``, at one kept-FLOPs target) and scores the repair on
calibration samples it did not see, exactly as the guard does (:mod:`asr_onnx.pipeline.guard`): 2-fold cross-fitting,
the repair fitted on one half (refit, measure, correct) and scored against the dense model on the other half,
beside pruning alone; the probe's score is that of the model the repair keeps (under ``--guard fallback``,
pruning alone where the guard prefers it). Never the test set. With the refit, a probe refits each half on its
own, from the start; the final repair's guard fits its halves in the refit's own passes (each layer solved on
the other half's sums, upstream of it the full refit), which chose the same in all 19 cells of
benchmarks/results/guard_shared*.json, so the two scores are close but not equal.

The search bisects a grid, the multiples of the resolution: the sparsities k·r below 1 (kept FLOPs 1 − k·r
above 0). It assumes that the held-out score falls as the sparsity rises, and ends with the highest grid point
found usable next to the lowest found not usable (or the grid's end): the boundary lies within one step. The
dense model (level 0) is usable by definition (agreement 1, error 0), so it is never probed; a target it
cannot meet is refused before any work. With 40 grid points a search costs at most 6 probes.

What the probes share (counted in :attr:`SearchTable.shared`): the dense statistics of each fold's fit part
and the dense model's outputs on each held-out part (:func:`asr_onnx.pipeline.crossfit.cross_fit`'s ``shared``), the
dense weights (:meth:`Repair.fork`), and the masks' scores where they need data: Wanda's input norms and the
channel plan's removal orders. A refit is not shared: its Gram sums depend on every mask upstream.

The chosen level is then repaired on every calibration sample by a plain repair (prune + run with the same
options, the masks' scores reused), so its output is the one ``asr-onnx repair`` writes at that sparsity.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from asr_onnx.errors import AsrError

RESOLUTION = 0.025
BENCH_BATCH = 32
BENCH_RUNS = 10  # alternating runs per model and probe: a short bench, the probes' latencies differ by much more
BENCH_WARMUP = 2
# Repair.run options a search passes through; "method": "auto" and "reconstruct": "auto" are refused (see _check)
RUN_OPTIONS = ("method", "placement", "recal", "momentum", "lambda_rule", "correct_head", "sequential",
               "fold_bn_nodes", "reference", "reconstruct", "max_gram_mb", "refit_samples", "refit_passes")


@dataclass(frozen=True)
class Target:
    """What a usable model keeps, on held-out calibration samples, against the dense model.

    Attributes:
        min_agreement: the lowest top-1 agreement allowed, or None. Defaults to None.
        max_error: the highest relative L2 error of all outputs allowed, or None (for outputs without
            classes, where agreement means nothing). Defaults to None.
    """

    min_agreement: float | None = None
    max_error: float | None = None

    def check(self) -> "Target":
        """Refuses a target that is missing, not a number, or that even the dense model cannot meet."""
        if self.min_agreement is None and self.max_error is None:
            raise AsrError("a search needs a target: a minimum agreement or a maximum error")
        for name, value in (("minimum agreement", self.min_agreement), ("maximum error", self.max_error)):
            if value is not None and not math.isfinite(value):
                raise AsrError(f"the {name} must be a number, got {value}")
        if self.min_agreement is not None and self.min_agreement > 1:
            raise AsrError(f"no model can keep agreement >= {self.min_agreement:g}: even the dense model agrees "
                           f"with itself on 100% of samples (sparsity 0 cannot meet it)")
        if self.max_error is not None and self.max_error < 0:
            raise AsrError(f"no model can keep a relative error <= {self.max_error:g}: even the dense model's is 0")
        return self

    def met(self, agreement: float | None, error: float) -> bool:
        if self.min_agreement is not None and (agreement is None or agreement < self.min_agreement):
            return False
        return self.max_error is None or error <= self.max_error

    def describe(self) -> str:
        parts = ([] if self.min_agreement is None else [f"agreement >= {100 * self.min_agreement:g}%"]) + \
                ([] if self.max_error is None else [f"relative error <= {self.max_error:g}"])
        return "held-out " + " and ".join(parts)


@dataclass
class Probe:
    """One point of the trade-off table.

    Attributes:
        level: the grid point: the sparsity, or under channels 1 - the kept-FLOPs target.
        sparsity: the weight sparsity asked for (None under channels).
        flops_target: the kept-FLOPs target (channels only, else None).
        kept_macs: the multiply-accumulates the shrunk model keeps, as a fraction of dense (channels only).
        agreement: held-out top-1 agreement with dense of the model kept (None where top-1 means nothing).
        agreement_se: its standard error over the held-out samples (the search picks the sparsest point that
            passes, so a chosen point close to the target may owe it to noise of this size).
        error: held-out relative L2 error of all outputs of the model kept.
        kept: "repair", or "pruned" where the guard falls back to pruning alone.
        repair: the repair's held-out scores {"agreement", "error"}.
        pruned: pruning alone's held-out scores {"agreement", "error"}.
        guard: the guard's verdict on them ("repair better", "pruning alone better", "tie"; None without a method).
        usable: the target is met.
        latency_ms: median latency of the model kept (fold 1's fit; shrunk under channels), or None unbenched.
        dense_latency_ms: the dense model's median in the same alternating run.
        speedup: dense median / model median.
        seconds: the probe's cost (pruning and held-out scoring), the bench excluded.
        bench_s: the bench's cost.
        note: why a probe could not run (an unreachable FLOPs target), else None.
    """

    level: float
    sparsity: float | None = None
    flops_target: float | None = None
    kept_macs: float | None = None
    agreement: float | None = None
    agreement_se: float | None = None
    error: float = float("nan")
    kept: str = "repair"
    repair: dict = field(default_factory=dict)
    pruned: dict = field(default_factory=dict)
    guard: str | None = None
    usable: bool = False
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    speedup: float | None = None
    seconds: float = 0.0
    bench_s: float = 0.0
    note: str | None = None


@dataclass
class SearchTable:
    """The search's trade-off table and what it chose.

    Attributes:
        axis: "sparsity", or "kept FLOPs" under channels.
        target: what a usable model keeps.
        resolution: the grid step.
        held_out: calibration samples scored held-out (all of them, each once).
        folds: the cross-fitting's folds.
        options: the repair's options (pattern, allocation, score, run options, guard).
        probes: every probe, in the order run.
        chosen: the chosen probe, or None when no probe is usable.
        bench: the bench's settings (batch, runs, warm-up, threads), or None unbenched.
        shared: what the probes shared: counts of reuses, and the time of what was computed once.
        cost: seconds of the probes, the benches, the final repair, and the whole search in final repairs.
    """

    axis: str
    target: Target
    resolution: float
    held_out: int
    folds: int
    options: dict
    probes: list = field(default_factory=list)
    chosen: Probe | None = None
    bench: dict | None = None
    shared: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    def rows(self) -> list:
        """The probes by level, densest first."""
        return sorted(self.probes, key=lambda p: p.level)

    def boundary(self) -> Probe | None:
        """The densest probe found not usable above the chosen one (the other side of the boundary), or None."""
        chosen = self.chosen.level if self.chosen else 0.0
        return next((p for p in self.rows() if p.level > chosen and not p.usable), None)

    def to_json(self) -> dict:
        return {"axis": self.axis, "target": asdict(self.target), "resolution": self.resolution,
                "held_out": self.held_out, "folds": self.folds, "options": self.options,
                "probes": [_rounded(asdict(p)) for p in self.probes],
                "chosen": None if self.chosen is None else _rounded(asdict(self.chosen)),
                "bench": self.bench, "shared": self.shared, "cost": self.cost}

    def header(self) -> str:
        return (f"search: the highest {self.axis_name()} whose repair keeps {self.target.describe()} "
                f"({self.held_out} calibration samples, {self.folds}-fold cross-fitting), resolution "
                f"{self.resolution:g}")

    def axis_name(self) -> str:
        return "sparsity" if self.axis == "sparsity" else "FLOPs removed"

    def column_names(self) -> str:
        first = f"{'sparsity':>8}" if self.axis == "sparsity" else f"{'FLOPs':>6} {'kept':>6}"
        return (f"{first} {'agreement':>9} {'rel err':>8} {'kept':>6} {'verdict':>10} "
                f"{'latency ms':>10} {'dense ms':>8} {'speed-up':>8} {'time':>7}")

    def line(self, p: Probe) -> str:
        """One probe's row of the terminal table."""
        if self.axis == "sparsity":
            first = f"{p.sparsity:>8.3f}"
        else:
            kept = "-" if p.kept_macs is None else f"{p.kept_macs:.3f}"
            first = f"{p.flops_target:>6.3f} {kept:>6}"
        if p.note:
            return f"{first} {p.note}"
        agree = "-" if p.agreement is None else f"{100 * p.agreement:.1f}%"
        latency = ("-", "-", "-") if p.latency_ms is None else \
            (f"{p.latency_ms:.2f}", f"{p.dense_latency_ms:.2f}", f"{p.speedup:.2f}x")
        return (f"{first} {agree:>9} {p.error:>8.4f} {p.kept:>6} {'usable' if p.usable else 'not':>10} "
                f"{latency[0]:>10} {latency[1]:>8} {latency[2]:>8} {p.seconds:>6.1f}s")

    def format(self) -> str:
        """The whole table, densest first, the chosen row marked, and the conclusion."""
        lines = [self.header(), "  " + self.column_names()]
        for p in self.rows():
            mark = "<-" if p is self.chosen else "  "
            lines.append(f"{mark}{self.line(p)}")
        lines.append(self.conclusion())
        return "\n".join(lines)

    def conclusion(self) -> str:
        """One line: what was chosen and where the boundary lies, or why nothing was."""
        what = self.target.describe()
        if self.chosen is None:
            densest = self.rows()[0] if self.probes else None
            if densest is None:
                return f"no probe ran for {what}"
            return (f"no {self.axis_name()} keeps {what}: even the densest probe, {self._point(densest)}, "
                    f"keeps {self._score(densest)}")
        over = self.boundary()
        beyond = (f"; the next step, {self._point(over)}, keeps {self._score(over)}" if over is not None
                  else "; nothing sparser is on the grid")
        return f"chosen: {self._point(self.chosen)}, keeps {self._score(self.chosen)}{beyond}"

    def _point(self, p: Probe) -> str:
        return f"sparsity {p.sparsity:g}" if self.axis == "sparsity" else f"kept FLOPs target {p.flops_target:g}"

    def _score(self, p: Probe) -> str:
        if p.note:
            return p.note
        se = "" if p.agreement_se is None else f" (standard error {100 * p.agreement_se:.1f})"
        agree = "" if p.agreement is None else f"agreement {100 * p.agreement:.1f}%{se}, "
        return f"{agree}relative error {p.error:.4g}"


class TargetMissed(AsrError):
    """No probe met the target; ``table`` holds what the probes found."""

    def __init__(self, table: SearchTable):
        super().__init__(table.conclusion())
        self.table = table


def bisect(usable, top: int) -> int:
    """The highest k in 1..top with ``usable(k)``, or 0 when there is none.

    ``usable`` is assumed monotone: True up to a boundary, False above it. k = 0 counts as usable and top + 1
    as not, so neither is asked; ``usable`` is called at most ceil(log2(top + 1)) times, never twice for a k.
    """
    low, high = 0, top + 1
    while high - low > 1:
        middle = (low + high) // 2
        if usable(middle):
            low = middle
        else:
            high = middle
    return low


def grid_top(resolution: float) -> int:
    """The number of grid points k·resolution below 1."""
    if not 0 < resolution <= 0.5:
        raise AsrError(f"the resolution must be in (0, 0.5], got {resolution}")
    return math.ceil(round(1 / resolution, 9)) - 1


def search(model, calib, *, min_agreement: float | None = None, max_error: float | None = None,
           resolution: float = RESOLUTION, pattern: str = "global", exclude=(), keep_first: bool = False,
           keep_last: bool = False, allocation: str = "global", score: str = "magnitude", guard: str = "fallback",
           seed: int = 0, bench_batch: int = BENCH_BATCH, bench_runs: int = BENCH_RUNS, batch_size: int | None = None,
           device: str = "auto", progress: bool = True, threads: int = 0, share: bool = True, on_probe=None,
           **options):
    """Finds the highest sparsity (fewest kept FLOPs under channels) whose repair keeps the target on
    held-out calibration samples, and repairs the model there on every calibration sample.

    Args:
        model: a path or an onnx.ModelProto (the dense model).
        calib: a calib.CalibSet (cut into folds).
        min_agreement: the lowest held-out top-1 agreement with dense, or None. Defaults to None.
        max_error: the highest held-out relative L2 error of all outputs against dense, or None (for outputs
            without classes). Defaults to None; at least one of the two is given.
        resolution: the grid step of the sparsity (of the kept FLOPs under channels). Defaults to 0.025.
        pattern: "global", "uniform" or "channels" (an N:M pattern fixes its sparsity). Defaults to "global".
        exclude, keep_first, keep_last, allocation, score: as for :meth:`Repair.prune`.
        guard: the guard's mode, as for :meth:`Repair.run`; under "fallback" a probe is scored as the model
            the repair keeps. Defaults to "fallback" (the CLI's default).
        seed: the folds', the batches' and the refit subset's seed, as for :meth:`Repair.run`. Defaults to 0.
        bench_batch: the batch of each probe's latency bench (the model's own when it fixes one); 0 or
            ``bench_runs`` 0 for no bench. Defaults to 32.
        bench_runs: alternating timed runs per model and probe. Defaults to 10.
        batch_size, device, progress, threads: as for :class:`Repair`.
        share: share the dense statistics and outputs of the folds between probes. Defaults to True (False
            measures what sharing saves).
        on_probe: called with (table, probe) after each probe (for live output). Defaults to None.
        **options: :meth:`Repair.run` options (see RUN_OPTIONS), the same for every probe and the final
            repair; ``method`` defaults to "bn".

    Returns:
        (the chosen Repair, repaired on every calibration sample with ``options`` and ``guard`` as a plain
        repair would; the :class:`SearchTable`).

    Raises:
        TargetMissed: no probe meets the target (its ``table`` holds the probes); no model is made.
        AsrError: a target that even the dense model cannot meet, an unknown option, an N:M pattern,
            ``method`` or ``reconstruct`` "auto", too few calibration samples to hold any out.
    """
    from asr_onnx.pipeline import guard as guard_module
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.prune.masks import Pattern

    target = Target(min_agreement, max_error).check()
    top = grid_top(resolution)
    options = dict({"method": "bn"}, **options)
    channels = str(pattern).strip().lower() == "channels"
    _check(options, pattern, channels, guard, calib)
    if not channels:
        pattern = str(Pattern.parse(pattern))
    total_start = time.perf_counter()
    base = Repair(model, device=device, batch_size=batch_size, progress=progress, threads=threads)
    folds = guard_module.FOLDS
    table = SearchTable("kept FLOPs" if channels else "sparsity", target, resolution, len(calib), folds,
                        {"pattern": pattern, "allocation": allocation, "score": score, "exclude": list(exclude),
                         "keep_first": keep_first, "keep_last": keep_last, "guard": guard, "seed": seed, **options})
    shared_folds: list[dict] | None = [{} for _ in range(folds)] if share else None
    prune_args = _PruneArgs(pattern, exclude, keep_first, keep_last, allocation, score, calib, channels)
    start = time.perf_counter()
    prune_args.prepare(base, resolution)  # the masks' scores that need data, once
    table.shared = {"scores_s": round(time.perf_counter() - start, 4), "scores": prune_args.shared_what(),
                    "fold_dense_statistics": share, "fold_dense_outputs": share, "dense_weights": True}
    if bench_batch and bench_runs:
        table.bench = {"batch_size": bench_batch, "runs": bench_runs, "warmup": BENCH_WARMUP, "threads": threads}
    probes: dict[int, Probe] = {}

    def usable(k: int) -> bool:
        probe = _probe(base, calib, round(k * resolution, 10), prune_args, table, shared_folds, guard, seed,
                       options, device, threads)
        probes[k] = probe
        table.probes.append(probe)
        if on_probe is not None:
            on_probe(table, probe)
        return probe.usable

    best = bisect(usable, top)
    table.chosen = probes.get(best)
    probes_s = sum(p.seconds for p in table.probes) + table.shared["scores_s"]
    bench_s = sum(p.bench_s for p in table.probes)
    if table.chosen is None:
        table.cost = {"probes_s": round(probes_s, 3), "bench_s": round(bench_s, 3)}
        raise TargetMissed(table)
    start = time.perf_counter()
    job = base.fork(pruned=False)
    prune_args.prune(job, table.chosen.level)
    job.run(calib, seed=seed, guard=guard, **options)
    final_s = time.perf_counter() - start
    total_s = time.perf_counter() - total_start
    table.cost = {"probes": len(table.probes), "probes_s": round(probes_s, 3), "bench_s": round(bench_s, 3),
                  "final_s": round(final_s, 3), "total_s": round(total_s, 3),
                  # the search in units of the final repair, which is a plain repair of the chosen configuration
                  "full_repairs": round(total_s / max(final_s, 1e-9), 2),
                  "full_repairs_without_bench": round((total_s - bench_s) / max(final_s, 1e-9), 2)}
    return job, table


def _check(options: dict, pattern: str, channels: bool, guard: str, calib) -> None:
    """Refuses what a search cannot vary or score, before any work."""
    from asr_onnx.pipeline.guard import FOLDS, GUARD_MODES
    from asr_onnx.prune.masks import Pattern

    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise AsrError(f"search does not take the option {unknown[0]!r}")
    if not channels and Pattern.parse(pattern).kind == "nm":
        raise AsrError(f"the pattern {pattern} fixes its own sparsity: there is nothing to search")
    for name in ("method", "reconstruct"):
        if options.get(name) == "auto":
            raise AsrError(f"search scores one repair per probe; {name} auto picks per model: pick with "
                           f"`repair --{name} auto` at one sparsity, then search with what it picked")
    if guard not in GUARD_MODES:
        raise AsrError(f"unknown guard mode {guard!r}; choose one of {', '.join(GUARD_MODES)}")
    if not hasattr(calib, "folds") or len(calib) < 2 * FOLDS:
        raise AsrError(f"search needs a calibration set of at least {2 * FOLDS} samples that can be cut into "
                       f"{FOLDS} folds")


@dataclass
class _PruneArgs:
    """How every probe (and the final repair) prunes: the arguments of Repair.prune, and the masks' scores that
    need data (Wanda's input norms, the channel plan's removal orders), found once by :meth:`prepare`."""

    pattern: str
    exclude: tuple
    keep_first: bool
    keep_last: bool
    allocation: str
    score: str
    calib: object
    channels: bool
    norms: dict | None = None
    plan: object = None

    def prepare(self, base, resolution: float) -> None:
        from asr_onnx.prune import channels
        from asr_onnx.prune.channels import SCORES as CHANNEL_SCORES
        from asr_onnx.prune.masks import SCORES

        if self.score not in (CHANNEL_SCORES if self.channels else SCORES):
            raise AsrError(f"the score {self.score} does not apply to the pattern {self.pattern}")
        if self.channels:
            if self.score == "greedy":
                base.batch.check(len(self.calib))  # greedy's Gram pass runs with the batch a repair would use
            # any target below 1 orders every prunable group's channels; the orders do not depend on it
            self.plan = channels.plan(base.dense, flops_target=1 - resolution, score=self.score, calib=self.calib,
                                      exclude=self.exclude, batch_size=base.batch_size, device=base.device,
                                      threads=base.threads)
        elif self.score == "wanda":
            self.norms = base.input_norms(self.score, self.calib)

    def shared_what(self) -> list:
        return (["channel removal orders"] if self.channels else []) + (["wanda input norms"] if self.norms else [])

    def prune(self, job, level: float) -> None:
        """Prunes ``job`` at the grid point ``level`` with the scores found once: the masks are those a plain
        repair finds at that sparsity or target (the scores and removal orders do not depend on it)."""
        if self.channels:
            job.prune(0.0, "channels", self.exclude, score=self.score, calib=self.calib,
                      flops_target=round(1 - level, 10), channel_plan=self.plan)
        else:
            job.prune(level, self.pattern, self.exclude, self.keep_first, self.keep_last, self.allocation, self.score,
                      self.calib, input_norms=self.norms)


def _probe(base, calib, level: float, prune_args: _PruneArgs, table: SearchTable, shared_folds, guard: str,
           seed: int, options: dict, device: str, threads: int) -> Probe:
    """Prunes a fork of ``base`` at ``level``, scores its repair and pruning alone held-out as the guard does,
    and benches the model kept."""
    from asr_onnx.calib.specs import fixed_batch
    from asr_onnx.pipeline.crossfit import held_out_scores
    from asr_onnx.pipeline.guard import FOLDS, judge
    from asr_onnx.pipeline.recipe import Recipe

    start = time.perf_counter()
    probe = Probe(level, sparsity=None if prune_args.channels else level,
                  flops_target=round(1 - level, 10) if prune_args.channels else None)
    job = base.fork(pruned=False)
    try:
        prune_args.prune(job, level)
    except AsrError as e:
        if not prune_args.channels:
            raise
        probe.note = f"not reached: {e}"  # a FLOPs target below what the groups' floors allow
        probe.seconds = time.perf_counter() - start
        return probe
    job.batch.check(len(calib))  # the batch that the guard's evaluations use, as after run()
    recipe = Recipe(seed=seed, **{k: v for k, v in options.items() if k != "fold_bn_nodes"})
    method, reconstruct, correction = recipe.method, recipe.refit(), recipe.correction()
    first: dict = {}  # the first fold's repair, benched when it is the model kept
    # the final repair's guard does not run where a fixed batch > 1 cannot be cut into held-out parts, so
    # there the repair is kept whatever the held-out scores say
    falls_back = guard == "fallback" and (fixed_batch(job.specs) or 1) == 1

    def repaired(fitted):
        output = fitted.correct(**correction).fold().output if method != "none" else fitted.pruned
        first.setdefault("repair", output)
        return output

    variants = [repaired] + ([lambda fitted: job.pruned_alone] if method != "none" else [])
    measure = {"sequential": recipe.sequential, "reference": recipe.reference} if method != "none" else None
    found = held_out_scores(job, calib, variants, folds=FOLDS, seed=seed, measure=measure,
                            reconstruct=reconstruct, batch_size=job.batch_size, shared=shared_folds)
    scores: list[dict] = [{"agreement": s.agreement, "error": s.logit_rel_l2,
                           "agreement_se": None if s.matches is None else float(s.matches.std() / np.sqrt(len(s.matches)))}
                          for s in found]
    probe.repair = scores[0]
    kept = scores[0]
    if method != "none":
        probe.pruned = scores[1]
        probe.guard, loses = judge(found)
        if falls_back and loses:
            probe.kept, kept = "pruned", scores[1]
    else:
        probe.kept = "pruned" if reconstruct is None else "repair"
    if table.target.min_agreement is not None and kept["agreement"] is None:
        raise AsrError("agreement means nothing for this model's outputs (they are not class scores): "
                       "give a maximum relative error instead (--max-error)")
    probe.agreement, probe.agreement_se, probe.error = kept["agreement"], kept["agreement_se"], kept["error"]
    probe.usable = table.target.met(probe.agreement, probe.error)
    probe.seconds = time.perf_counter() - start
    if table.bench is not None:
        model = job.pruned_alone if probe.kept == "pruned" else first["repair"]
        _bench(probe, job, model, table.bench, device, threads, prune_args.channels)
    return probe


def _bench(probe: Probe, job, model, settings: dict, device: str, threads: int, channels: bool) -> None:
    """The probe's latency against dense in one short alternating run; under channels, of the shrunk model."""
    from asr_onnx.calib.specs import fixed_batch
    from asr_onnx.prune import channels as channel_surgery
    from asr_onnx.prune.channels import count
    from asr_onnx.verify.timing import bench

    start = time.perf_counter()
    plan = job.channel_plan
    if channels and plan is not None and channel_surgery.masked(plan, model):
        model = channel_surgery.shrink(model, plan.groups, plan.keep)
    if channels:
        probe.kept_macs = count.macs(model) / max(count.macs(job.dense), 1)
    result = bench(model, job.dense, batch_size=fixed_batch(job.specs) or settings["batch_size"], threads=threads,
                   device="cpu" if device == "auto" else device, runs=settings["runs"], warmup=settings["warmup"])
    probe.latency_ms = result["models"]["model"]["latency_ms"]["median"]
    probe.dense_latency_ms = result["models"]["reference"]["latency_ms"]["median"]
    probe.speedup = result["speedup"]
    probe.bench_s = time.perf_counter() - start


def _rounded(entry: dict) -> dict:
    """Floats to 6 significant digits, for the JSON report."""
    def short(value):
        if isinstance(value, float):
            return float(f"{value:.6g}") if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        return value

    return {key: short(value) for key, value in entry.items()}

