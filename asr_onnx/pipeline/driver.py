"""The driver: one repair's stage order and state (prune -> refit -> measure -> correct -> fold -> guard), and
``repair()``. What each stage does lives in its package; the choices live in a :class:`Recipe`."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import onnx

from asr_onnx.calib.calibset import CalibSet
from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.correct.recal import correct_sites, write_all
from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import DEFAULT_REFERENCE
from asr_onnx.measure.passes import SMALL_BATCH, dense_keys, dense_weights, measure_batched, measure_dense, site_map
from asr_onnx.model.batch import BatchPolicy
from asr_onnx.model.engine import LocalEngine
from asr_onnx.model.files import load_model, save_model
from asr_onnx.model.requantize import QDQ_CHANNELS, HeldInFloat
from asr_onnx.pipeline.crossfit import AUTO_CANDIDATES, PICK_RULE, choose, choose_reconstruction
from asr_onnx.pipeline.guard import HeldOutRefits, guard_repair, held_out_parts, refit_subset
from asr_onnx.pipeline.recipe import Recipe, layernorm_default, refit_target_default
from asr_onnx.progress import stage_done
from asr_onnx.prune.channels import masked
from asr_onnx.prune.channels.check import written_check
from asr_onnx.prune.masks import Pattern, check_sparsity
from asr_onnx.prune.stage import is_channels, measures_errors, needs_data, prune_model, shrink_repaired
from asr_onnx.prune.wanda import input_norms as wanda_norms
from asr_onnx.quantize.int8 import to_int8
from asr_onnx.refit.reconstruct import reconstruct, refit_corrected
from asr_onnx.report.build import build_report
from asr_onnx.verify.evaluation import score as score_against_dense
from asr_onnx.verify.fp16 import half_precision
from asr_onnx.verify.verdict import of_repair


class Repair:
    """One model's repair, stage by stage; every stage returns ``self``.

    >>> Repair("model.onnx").prune(0.9).measure(calib).correct("asr").fold().save("out.onnx")

    Args:
        model: a path (read once, never written) or an onnx.ModelProto.
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        batch_size: samples per session run. Defaults to None (:class:`asr_onnx.model.batch.BatchPolicy`).
        progress: progress bars on a TTY. Defaults to True.
        threads: onnxruntime intra-op threads; 0 lets onnxruntime choose. Defaults to 0.
        engine: an :mod:`asr_onnx.model.engine` engine for the calibration passes. Defaults to None: this process.
        output_kind: {output name: kind}, where the recognised kind is wrong (:mod:`asr_onnx.verify.scoring`).

    ``pruned`` is the model as pruned, then as refitted; ``pruned_alone`` as pruned (the guard's baseline);
    ``output`` the finished model; ``recipe`` the Recipe :meth:`run` ran, with ``auto``'s picks resolved;
    ``verdict`` usable, degraded or broken (:class:`asr_onnx.verify.verdict.Verdict`) once the output is scored.
    """

    def __init__(self, model, *, device: str = "auto", batch_size: int | None = None, progress: bool = True,
                 threads: int = 0, engine=None, output_kind: dict | None = None):
        self.source = None if isinstance(model, onnx.ModelProto) else Path(model)
        # a QDQ model is repaired on its weights in float, then quantized again
        self.dense, self.qdq = HeldInFloat.split(model if self.source is None else load_model(self.source))
        self.device, self.progress, self.threads = device, progress, threads
        self.engine = engine or LocalEngine()
        self.workers: list = []  # the engine's workers in the pruned pass: host, device, samples
        self.specs = input_specs(self.dense)
        self.batch = BatchPolicy.of(self.dense, fixed_batch(self.specs), batch_size, SMALL_BATCH)
        self.pruned = self.pruned_alone = self.dense
        self.layers, self.refits, self.settings, self.timings, self.corrections = [], [], {}, {}, {}
        self.measurement, self.written, self.output, self.output_kind = None, {}, None, dict(output_kind or {})
        # auto_pick: auto()'s held-out pick; quantization: the report's entry after to_int8 or a QDQ requantization
        self.evaluation = self.recipe = self.auto_pick = self.verdict = self.quantization = None
        self.refit_method, self.half_io = "none", False  # the refit that ran ("ls" or "none"); float16 inputs, outputs
        self.held_out_refits: HeldOutRefits | None = None  # the guard's fold refits, from the refit's own passes
        # channel pruning: the plan, the report's entry, and the samples the result is run on before it is written
        self.channel_plan = self.channel_report = self.channel_data = None
        self.mask_rules: list | None = None  # the score obs: how the refit chooses each layer's mask again
        # layer name -> dense weight, read once; (pruned model, its measure.SiteMap, with LayerNorm sites or not),
        # found once per pruned model
        self._batch_arg, self._dense_weights, self._site_map = batch_size, None, None

    @property
    def pattern(self) -> str:  # the pruning pattern, as the settings hold it
        return str(self.settings.get("pattern", "global"))

    @property
    def default_refit_target(self) -> str:  # refit_target_default for this pruning and this dense model
        batchnorm = any(node.op_type == "BatchNormalization" for node in self.dense.graph.node)
        return refit_target_default(float(self.settings.get("sparsity") or 0.0), self.pattern, batchnorm)

    @property
    def batch_size(self) -> int:  # samples per session run
        return self.batch.size

    @property
    def result(self) -> onnx.ModelProto:
        """The model as it stands: the output once there is one, else the pruned model."""
        return self.output if self.output is not None else self.pruned

    def fork(self, *, batch_size: int | None = None, progress: bool | None = None, pruned: bool = True,
             refit: bool = True) -> "Repair":
        """A new Repair over the same dense model, nothing measured; ``pruned``: from this one's pruned model."""
        new = Repair(self.dense, device=self.device, batch_size=batch_size or self._batch_arg, threads=self.threads,
                     progress=self.progress if progress is None else progress, engine=self.engine,
                     output_kind=self.output_kind)
        new.source, new.qdq, new._dense_weights = self.source, self.qdq, self.dense_weights
        if pruned:  # the site map is used only while it is of the same pruned model
            new.pruned_alone, new.layers, new._site_map = self.pruned_alone, self.layers, self._site_map
            new.mask_rules = self.mask_rules
            new.pruned = self.pruned if refit else self.pruned_alone
            new.refit_method = self.refit_method if refit else "none"
            new.settings["pattern"] = self.pattern  # what the LayerNorm rule reads
        return new

    @property
    def dense_weights(self) -> dict:
        self._dense_weights = self._dense_weights or dense_weights(self.dense)
        return self._dense_weights

    def _pruned_sites(self, layernorm: bool = True):  # the pruned model's measure.SiteMap, found again after each
        # change of the model (or of whether LayerNorms are sites)
        if self._site_map is None or self._site_map[0] is not self.pruned or self._site_map[2] != layernorm:
            self._site_map = (self.pruned, site_map(self.pruned, self.dense_weights, layernorm), layernorm)
        return self._site_map[1]

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        self._took(stage, time.perf_counter() - start)

    def _took(self, stage: str, seconds: float, line: bool = True) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        stage_done(stage, seconds, enabled=self.progress and line)  # off a TTY, a line per stage instead of bars

    def _options(self, batch_size: int | None = None, progress: bool = True) -> dict:
        """The session options of a pass: samples per run, device, threads, and (where it shows one) progress."""
        shown = {"progress": self.progress} if progress else {}
        return dict(batch_size=batch_size or self.batch_size, device=self.device, threads=self.threads, **shown)

    def prune(self, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
              keep_last: bool = False, allocation: str = "global", score: str = "magnitude",
              calib=None, flops_target: float | None = None, channel_plan=None, input_norms=None) -> "Repair":
        """Zeroes weights, or masks whole channels until :meth:`shrink`, as :func:`asr_onnx.prune.stage.prune_model`
        says (its arguments); ``input_norms``: :meth:`input_norms`'s, reused."""
        channels = is_channels(pattern)
        if channels and self.qdq is not None:
            raise AsrError(QDQ_CHANNELS)
        if not channels:
            check_sparsity(sparsity), Pattern.parse(pattern)  # refused before any data is read
        if needs_data(pattern, score, channel_plan, calib, allocation):
            self.batch.check(len(calib))
        norms = self.input_norms(score, calib) if input_norms is None and not channels else input_norms
        measured = not channels and measures_errors(pattern, allocation)  # its passes show progress
        with self._timed("prune"):
            done = prune_model(self.dense, sparsity, pattern, exclude=exclude, keep_first=keep_first,
                               keep_last=keep_last, allocation=allocation, score=score, calib=calib,
                               flops_target=flops_target, channel_plan=channel_plan, norms=norms,
                               **self._options(progress=measured) if channels or measured else {})
        self.pruned = self.pruned_alone = done.model
        self.layers, self.channel_plan, self.channel_report = done.layers, done.channel_plan, None
        self.mask_rules = done.mask_rules
        self.channel_data = calib if calib is not None else self.channel_data
        self.settings.update(done.settings)
        return self

    def input_norms(self, score: str, calib):
        """Wanda's per-layer input norms on the dense model, or None for a score that needs no data."""
        if not needs_data("global", score, calib=calib):  # only wanda's weights are scored with data
            return None
        self.batch.check(len(calib))
        with self._timed("input_norms"):
            return wanda_norms(self.dense, calib, **self._options(progress=False))

    def shrink(self) -> "Repair":
        """Slices the removed channels out of the result, counted once; a QDQ input's result is quantized again."""
        if self.qdq is not None and self.quantization is None:
            with self._timed("requantize"):
                self.output, self.quantization = self.qdq.quantize_again(self.result)
        plan = self.channel_plan
        if plan is None or (self.channel_report is not None and not masked(plan, self.result)):
            return self  # shrunk and counted already: the summary's shape inference is not repeated
        with self._timed("shrink"):
            shrunk, self.channel_report = shrink_repaired(plan, self.result, self.dense, self.channel_data,
                                                          device=self.device)
        self.output = self.output if shrunk is None else shrunk
        return self

    def reconstruct(self, calib, method: str = "ls", *, max_gram_mb: float = 256.0, passes: int = 0,
                    samples: int = 0, seed: int = 0, recipe: Recipe | None = None,
                    target: str | None = None) -> "Repair":
        """Refits the kept weights (:func:`asr_onnx.refit.reconstruct.reconstruct`, ``target`` its target; None:
        :func:`asr_onnx.pipeline.recipe.refit_target_default` for the pruning's sparsity and pattern); "auto"
        picks on held-out folds."""
        if samples < 0 or (samples and not hasattr(calib, "take")):
            raise AsrError(f"cannot refit on {samples} samples of this calibration set")
        target = target or self.default_refit_target
        probes = Recipe(reconstruct=method, max_gram_mb=max_gram_mb, refit_passes=passes, refit_samples=samples,
                        seed=seed, refit_target=target) if recipe is None else recipe  # refuses an unknown choice
        if self.mask_rules is not None and method != "ls":
            raise AsrError(f"the score obs chooses its masks in the least-squares refit: it needs --reconstruct ls, "
                           f"not {method}")
        self.settings.update(reconstruct=method, max_gram_mb=max_gram_mb, refit_passes=passes, refit_samples=samples)
        if target != "layer":  # recorded only when set, so that default reports keep their keys
            self.settings["refit_target"] = target
        if method == "auto":
            self.batch.check(len(calib))
            with self._timed("reconstruct_auto"):
                method, self.settings["reconstruct_auto"] = choose_reconstruction(self, calib, probes)
        self.refit_method = method
        if method == "ls":
            fit = refit_subset(calib, samples, seed)
            self.batch.check(len(fit))
            parts = held_out_parts(calib, fit, probes, self.specs)
            with self._timed("reconstruct"):
                self.pruned, self.refits, split, _, without = reconstruct(
                    self.dense, self.pruned, fit, max_gram_mb=max_gram_mb, passes=passes, held_out=parts,
                    frontier_mb=probes.frontier_mb, masks=self.mask_rules, target=target, **self._options())
            self.held_out_refits = HeldOutRefits(calib, seed, without) if parts else None
            self.timings.update({f"reconstruct_{k}": v for k, v in split.items()})
        return self

    def refit_corrected(self, calib, *, max_gram_mb: float = 256.0, passes: int = 0) -> "Repair":
        """Refits again from the corrected output (:func:`asr_onnx.refit.reconstruct.refit_corrected`), after fold."""
        self.batch.check(len(calib))
        with self._timed("reconstruct"):
            self.pruned, self.refits, split = refit_corrected(self.dense, self.pruned, self.output, calib,
                                                              max_gram_mb=max_gram_mb, passes=passes, **self._options())
        self.measurement, self.output = None, None
        for k, v in split.items():
            self._took(f"reconstruct_{k}", v, line=False)
        return self

    def measure_dense(self, calib, keys=None) -> dict:
        """The dense model's per-channel statistics over ``calib`` (``keys``: these sites only): key -> ChannelStats."""
        self.batch.check(len(calib))
        with self._timed("measure_dense"):
            return measure_dense(self.dense, calib, self.batch, keys=keys, engine=self.engine, **self._options(),
                                 source=None if self.qdq else self.source)  # a QDQ file is not the float form

    def measure(self, calib, dense_stats: dict | None = None, sequential: bool = False,
                all_dense: bool = False, seed: int = 0, reference: str = DEFAULT_REFERENCE,
                layernorm: bool | None = None) -> "Repair":
        """Statistics of the dense, then of the renormalised pruned model (:mod:`asr_onnx.measure.passes`);
        ``layernorm``: LayerNorm outputs are sites too (:func:`asr_onnx.model.graph.layernorm_site`); None: as
        :func:`asr_onnx.pipeline.recipe.layernorm_default` says for the refit that ran and the pattern."""
        self.batch.check(len(calib))
        if layernorm is None:
            layernorm = layernorm_default(self.refit_method, self.pattern)
        calib = calib.shuffled(seed) if isinstance(calib, CalibSet) else calib
        sites = self._pruned_sites(layernorm)
        needed = dense_keys(sites.sites, reference)
        if dense_stats is None:
            dense_stats = self.measure_dense(calib, None if all_dense else needed) if needed or all_dense else {}
        with self._timed("measure_pruned"):
            self.measurement, size, symbolic = measure_batched(self.pruned, self.dense, calib, sites, dense_stats,
                                                               reference, self.batch, sequential=sequential,
                                                               engine=self.engine, **self._options())
        self.workers = self.engine.workers(len(calib), self.measurement.provider)
        self.settings.update(calib_size=len(calib), batch_size=size, sequential=sequential, symbolic_batch=symbolic,
                             reference=reference, layernorm=layernorm)
        return self

    def correct(self, method: str = "bn", *, placement: str = "recal", recal: str = "exact", momentum: float = 0.1,
                lambda_rule="median", correct_head: bool = True) -> "Repair":
        """Computes every site's correction (:func:`asr_onnx.correct.recal.correct_sites`, its arguments)."""
        Recipe(method=method, placement=placement, recal=recal, momentum=momentum)  # refuses an unknown choice
        with self._timed("correct"):
            self.corrections = correct_sites(self.measurement, method, correct_head=correct_head, placement=placement,
                                             recal=recal, momentum=momentum, lambda_rule=lambda_rule)
        self.settings.update(method=method, placement=placement, recal=recal, momentum=momentum,
                             lambda_rule=lambda_rule, correct_head=correct_head)
        return self

    def run(self, calib, method: str = "bn", *, recipe: Recipe | None = None, dense_stats=None,
            fold_bn_nodes: bool = False, **options) -> "Repair":
        """reconstruct, measure, correct (or auto), fold and guard after :meth:`prune`, as ``recipe`` says."""
        recipe = recipe or Recipe(method=method, fold_bn=fold_bn_nodes, **options)
        self.recipe = recipe = recipe.resolved(refit_target=recipe.refit_target or self.default_refit_target)
        self.channel_data = calib if calib is not None else self.channel_data
        self.reconstruct(calib, recipe.reconstruct, max_gram_mb=recipe.max_gram_mb, passes=recipe.refit_passes,
                         samples=recipe.refit_samples, seed=recipe.seed, recipe=recipe, target=recipe.refit_target)
        # auto's pick, and whether LayerNorms are sites after that refit
        self.recipe = recipe = recipe.resolved(reconstruct=self.refit_method,
                                               layernorm=recipe.layernorm_for(self.refit_method, self.pattern))
        if recipe.method == "none":
            self.output, self.settings["method"] = self.pruned, "none"
            return self.judge().shrink()
        self.measure(calib, dense_stats, recipe.sequential, seed=recipe.seed, reference=recipe.reference,
                     layernorm=bool(recipe.layernorm))
        if recipe.method == "auto":
            self.auto(calib, recal=recipe.recal, momentum=recipe.momentum, seed=recipe.seed,
                      correct_head=recipe.correct_head, reference=recipe.reference, layernorm=bool(recipe.layernorm))
        else:
            self.correct(**recipe.correction())
        self.fold(recipe.fold_bn)
        return self.guard(calib, recipe.guard, seed=recipe.seed).judge().shrink()

    def judge(self, calib=None) -> "Repair":
        """The verdict on the result (:func:`asr_onnx.verify.verdict.of_repair`); ``calib``: scored now if need be."""
        with self._timed("verdict") if calib is not None else nullcontext():
            self.verdict = of_repair(self, calib)
        return self

    def guard(self, calib, mode: str = "fallback", *, seed: int = 0) -> "Repair":
        """Keeps pruning alone where the held-out verdict asks for it (:func:`asr_onnx.pipeline.guard.guard_repair`)."""
        verdict = guard_repair(self, calib, self.recipe, mode, seed=seed)
        if verdict.keep != "repair":  # the refit alone is the pruned model as refitted, before any correction
            self.output, self.written = (self.pruned_alone if verdict.keep == "pruned" else self.pruned), {}
        self.settings["guard"] = verdict.entry
        if "cost_s" in verdict.entry:  # the guard's runs are timed by the guard ("off" costs nothing)
            self._took("guard", verdict.entry["cost_s"])
        return self

    def auto(self, calib, *, folds: int = 4, seed: int = 0, recal: str = "exact", momentum: float = 0.1,
             correct_head: bool = True, candidates=AUTO_CANDIDATES, reference: str | None = None,
             layernorm: bool | None = None) -> "Repair":
        """Picks a correction on ``folds`` held-out parts (:func:`asr_onnx.pipeline.crossfit.choose`) and applies it;
        ``reference`` and ``layernorm`` default to the measurement's."""
        if self.measurement is None:
            raise AsrError("measure() must run before auto()")
        reference = reference or self.measurement.reference
        layernorm = self.settings.get("layernorm", True) if layernorm is None else layernorm
        with self._timed("auto"):
            best, scores = choose(self, calib, candidates, folds=folds, seed=seed, recal=recal, momentum=momentum,
                                  correct_head=correct_head, reference=reference, layernorm=layernorm)
        picked = {key: best[key] for key in ("method", "placement", "lambda_rule")}
        self.correct(**picked, recal=recal, momentum=momentum, correct_head=correct_head)
        self.recipe, self.auto_pick = self.recipe.resolved(**picked) if self.recipe is not None else None, best
        self.settings.update(method="auto", auto={"picked": best, "candidates": scores, "folds": folds,
                                                  "held_out": len(calib), "reason": PICK_RULE})
        return self

    def fold(self, fold_bn_nodes: bool = False) -> "Repair":
        """Writes the corrections into a copy of the pruned graph (:func:`asr_onnx.correct.recal.write_all`)."""
        with self._timed("fold"):
            self.output, self.written = write_all(self.pruned, self.measurement.references, self.corrections,
                                                  fold_bn_nodes, like=self.dense)
        self.settings.update(fold_bn=fold_bn_nodes)
        return self

    def evaluate(self, data, *, name: str | None = None, batch_size: int = 256) -> "Repair":
        """Scores the result against dense on ``data`` (:func:`asr_onnx.verify.evaluation.score`), and judges it."""
        with self._timed("eval"):
            self.evaluation = score_against_dense(self.result, self.dense, data, name=name, batch_size=batch_size,
                                                  device=self.device, progress=self.progress, engine=self.engine,
                                                  output_kind=self.output_kind)
        return self.judge()

    def time_channels(self, *, batch_size: int = 32, runs: int = 10, threads: int = 1) -> float | None:
        """Times the shrunk output against dense (:func:`asr_onnx.verify.timing.bench`, alternating runs) and
        keeps the speed-up in the channel report. A fixed batch is timed as it is; an input with other free axes
        (a detector's H and W) is not timed: None."""
        from asr_onnx.verify.timing import bench

        self.shrink()
        if self.channel_report is None or not any(g["removed"] for g in self.channel_report["groups"]):
            return None
        batch = fixed_batch(input_specs(self.dense)) or batch_size
        try:
            with self._timed("bench"):
                timed = bench(self.result, self.dense, batch_size=batch, threads=threads, runs=runs, warmup=2,
                              device=self.device)
        except AsrError:
            return None
        self.channel_report.update(speedup=timed["speedup"], speedup_batch=batch)
        return timed["speedup"]

    def to_fp16(self, keep_io: bool = True, calib=None) -> "Repair":
        """Casts the result to float16, checked on ``calib`` (:func:`asr_onnx.verify.fp16.half_precision`)."""
        self.shrink()  # first: the channel plan slices float32 constants
        with self._timed("fp16"):
            self.output, errors = half_precision(self.result, keep_io, calib, self.device)
        self.half_io = not keep_io
        self.settings.update(fp16=True, fp16_io=not keep_io, fp16_rel_l2=errors)
        return self

    def to_int8(self, calib, *, target: str = "cpu", calibration: str = "auto", correction: str = "auto",
                seed: int = 0, float_layers: str = "auto") -> "Repair":
        """Quantizes the result to QDQ, its choices held out on ``calib`` (:func:`asr_onnx.quantize.int8.to_int8`)."""
        single = self.shrink().result  # first: the channel plan slices float32 constants
        with self._timed("int8"):
            self.output, self.quantization = to_int8(single, calib, target=target, calibration=calibration,
                                                     correction=correction, seed=seed, batch_size=self.batch_size,
                                                     threads=self.threads, progress=self.progress,
                                                     float_layers=float_layers)
        self.settings.update(int8=True, int8_target=target)
        return self

    def save(self, path, *, overwrite: bool = False) -> "Repair":
        """Checks (:func:`asr_onnx.prune.channels.check.written_check`) and writes the result atomically."""
        check = written_check(self.shrink().channel_plan, self.dense, self.channel_data, device=self.device,
                              half_io=self.half_io)
        with self._timed("save"):
            save_model(self.result, path, overwrite=overwrite, source=self.source, check=check)
        return self

    def report(self) -> dict:
        """The JSON-ready report (:mod:`asr_onnx.report.build`)."""
        return build_report(self.shrink())


def repair(model, calib, *, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
           keep_last: bool = False, batch_size: int | None = None, device: str = "auto", progress: bool = True,
           threads: int = 0, engine=None, output_kind: dict | None = None, **options) -> Repair:
    """Prunes and repairs a model in one call: :class:`Repair`'s arguments, :meth:`Repair.prune`'s, and
    :meth:`Repair.run`'s (``recipe``, or the Recipe's fields). Returns the finished Repair."""
    job = Repair(model, device=device, batch_size=batch_size, progress=progress, threads=threads, engine=engine,
                 output_kind=output_kind)
    return job.prune(sparsity, pattern, exclude, keep_first, keep_last).run(calib, **options)
