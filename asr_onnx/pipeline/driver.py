"""The driver: one repair's stage order and state (prune -> refit -> measure -> correct -> fold -> guard), and
``repair()``. What each stage does lives in its package; the choices live in a :class:`Recipe`."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import onnx

from asr_onnx.calib.calibset import CalibSet
from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.correct.recal import correct, write_all
from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import DEFAULT_REFERENCE, REFERENCES
from asr_onnx.measure.passes import SMALL_BATCH, dense_keys, dense_weights, measure, measure_pruned, site_map
from asr_onnx.measure.stats import merge_all
from asr_onnx.model.batch import BatchPolicy
from asr_onnx.model.check import check_output
from asr_onnx.model.files import load_model, save_model
from asr_onnx.pipeline.crossfit import AUTO_CANDIDATES, PICK_RULE
from asr_onnx.pipeline.recipe import Recipe
from asr_onnx.progress import stage_done
from asr_onnx.prune.masks import Pattern, check_sparsity
from asr_onnx.prune.stage import needs_data, prune_channels, prune_weights


class Repair:
    """One model's repair, stage by stage; every stage returns ``self``.

    >>> Repair("model.onnx").prune(0.9).measure(calib).correct("asr").fold().save("out.onnx")

    Args:
        model: a path or an onnx.ModelProto. A path is read once and never written.
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        batch_size: calibration samples per session run. Defaults to None: 64, or the calibration set's size
            when that is smaller (see :class:`asr_onnx.model.batch.BatchPolicy`).
        progress: progress bars on a TTY. Defaults to True.
        threads: onnxruntime intra-op threads; 0 lets onnxruntime choose. Defaults to 0.
        engine: where the calibration passes run, an :mod:`asr_onnx.model.engine` engine (``make_engine("ray")``
            shards the one-pass statistics and the evaluations over a Ray cluster; the refit's Gram passes and
            the level-by-level measurement stay in this process). Defaults to None: this process.
        output_kind: {output name: kind} for outputs whose kind (classes, detection, map, regression) is not to
            be recognised (:mod:`asr_onnx.verify.scoring`). Defaults to None.

    Attributes:
        pruned: the model every later stage works on: as pruned, then as refitted.
        pruned_alone: the model as pruned, never refitted: the guard's "pruning alone" baseline.
        output: the finished model, once :meth:`run` or :meth:`fold` ran.
        recipe: the Recipe :meth:`run` ran, with ``auto``'s picks resolved.
        verdict: usable, degraded or broken (:class:`asr_onnx.verify.verdict.Verdict`), once :meth:`run` (with the
            guard) or :meth:`evaluate` scored the output, or :meth:`judge` was given data.
    """

    def __init__(self, model, *, device: str = "auto", batch_size: int | None = None, progress: bool = True,
                 threads: int = 0, engine=None, output_kind: dict | None = None):
        from asr_onnx.model.engine import LocalEngine

        self.source = None if isinstance(model, onnx.ModelProto) else Path(model)
        self.dense = model if self.source is None else load_model(self.source)
        self.device, self.progress, self.threads = device, progress, threads
        self.engine = engine or LocalEngine()
        self.workers: list = []  # the engine's workers in the pruned pass: host, device, samples
        self.specs = input_specs(self.dense)
        try:
            self.batch = BatchPolicy.of(self.dense, fixed_batch(self.specs), batch_size, SMALL_BATCH)
        except ValueError as e:
            raise AsrError(str(e)) from None
        self.pruned = self.pruned_alone = self.dense
        self.layers, self.refits, self.settings, self.timings = [], [], {}, {}
        self.measurement = None  # a measure.Measurement, once measured
        self.corrections, self.written, self.output = {}, {}, None
        self.evaluation = self.recipe = self.verdict = None
        self.output_kind = dict(output_kind or {})
        self.channel_plan = self.channel_report = None
        self.channel_data = None  # calibration samples that a channel-pruned model is run on before it is written
        self.half_io = False  # float16 inputs and outputs (to_fp16)
        self._batch_arg = batch_size
        self._dense_weights = None  # layer name -> dense weight, read once
        self._site_map = None  # (pruned model, its measure.SiteMap): found once per pruned model

    @property
    def batch_size(self) -> int:
        return self.batch.size

    @property
    def batch_plan(self):
        return self.batch.plan

    @batch_plan.setter
    def batch_plan(self, plan) -> None:
        self.batch.plan = plan

    @property
    def result(self) -> onnx.ModelProto:
        """The model as it stands: the output once there is one, else the pruned model."""
        return self.output if self.output is not None else self.pruned

    def fork(self, *, batch_size: int | None = None, progress: bool | None = None, pruned: bool = True,
             refit: bool = True) -> "Repair":
        """A new Repair over the same dense model (its file and weights shared, nothing measured); with
        ``pruned``, from this one's pruned model (``refit`` False: from ``pruned_alone``)."""
        new = Repair(self.dense, device=self.device, batch_size=self._batch_arg if batch_size is None else batch_size,
                     progress=self.progress if progress is None else progress, threads=self.threads,
                     engine=self.engine, output_kind=self.output_kind)
        new.source, new._dense_weights = self.source, self._weights()
        if pruned:
            new.pruned_alone, new.layers = self.pruned_alone, self.layers
            new.pruned = self.pruned if refit else self.pruned_alone
            new._site_map = self._site_map  # kept only while it is of the same pruned model
        return new

    def _weights(self) -> dict:
        if self._dense_weights is None:
            self._dense_weights = dense_weights(self.dense)
        return self._dense_weights

    def _pruned_sites(self):
        """The pruned model's measure.SiteMap, found on first use after each change of the pruned model."""
        if self._site_map is None or self._site_map[0] is not self.pruned:
            self._site_map = (self.pruned, site_map(self.pruned, self._weights()))
        return self._site_map[1]

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[stage] = self.timings.get(stage, 0.0) + elapsed
        stage_done(stage, elapsed, enabled=self.progress)  # off a TTY, a line per stage instead of bars

    def _check_size(self, calib) -> None:
        if self.batch.fit(len(calib)) is not None:
            raise AsrError(f"the calibration set has {len(calib)} samples, fewer than the batch size {self.batch_size}")

    def _options(self, batch_size: int | None = None, progress: bool = True) -> dict:
        """The session options of a pass: samples per run, device, threads, and (where it shows one) progress."""
        options = dict(batch_size=batch_size or self.batch_size, device=self.device, threads=self.threads)
        return options | {"progress": self.progress} if progress else options

    def prune(self, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
              keep_last: bool = False, allocation: str = "global", score: str = "magnitude",
              calib=None, flops_target: float | None = None, channel_plan=None, input_norms=None) -> "Repair":
        """Zeroes weights of Conv, ConvTranspose, Gemm and MatMul layers (:func:`asr_onnx.prune.stage.prune_weights`),
        or under ``pattern="channels"`` removes whole channels (:func:`asr_onnx.prune.stage.prune_channels`), whose
        removed filters stay zeroed in the dense shapes until :meth:`shrink`.

        Args:
            sparsity: fraction of eligible weights to zero, in [0, 1); under "channels" of each group's channels.
                Defaults to 0.9 (ignored for N:M and a FLOPs target).
            pattern: "global", "uniform", "N:M" or "channels". Defaults to "global".
            exclude, keep_first, keep_last: layers left dense (regexes of names, the first, the last).
            allocation: "global", "lamp" or "uniform". Defaults to "global".
            score: "magnitude", "wanda" (needs ``calib``) or "rownorm"; under "channels", "magnitude",
                "bn-scale" or "greedy" (needs ``calib``). Defaults to "magnitude".
            calib: the calibration set, for "wanda" and "greedy". Defaults to None.
            flops_target: under "channels", the fraction of multiply-accumulates to keep. Defaults to None.
            channel_plan: under "channels", a plan made earlier, reused. Defaults to None.
            input_norms: with "wanda", norms from :meth:`input_norms` on ``calib``, reused. Defaults to None.
        """
        channels = str(pattern).strip().lower() == "channels"
        if not channels:
            check_sparsity(sparsity), Pattern.parse(pattern)  # refused before any data is read
        if needs_data(pattern, score, channel_plan):
            if calib is None:
                raise AsrError(f"the score {score} needs calibration data")
            self._check_size(calib)
        norms = self.input_norms(score, calib) if input_norms is None and not channels else input_norms
        with self._timed("prune"):
            if channels:
                done = prune_channels(self.dense, sparsity, score=score, calib=calib, flops_target=flops_target,
                                      exclude=exclude, channel_plan=channel_plan, **self._options(progress=False))
            else:
                done = prune_weights(self.dense, sparsity, pattern, exclude, keep_first, keep_last, allocation, score,
                                     norms)
        self.pruned = self.pruned_alone = done.model
        self.layers, self.channel_plan, self.channel_report = done.layers, done.channel_plan, None
        self.channel_data = calib if calib is not None else self.channel_data
        self.settings.update(done.settings)
        return self

    def input_norms(self, score: str, calib):
        """Wanda's per-layer input norms on the dense model, or None for a score that needs no data."""
        from asr_onnx.prune.wanda import input_norms

        if score != "wanda":
            return None
        if calib is None:
            raise AsrError("the score wanda needs calibration data")
        self._check_size(calib)
        with self._timed("input_norms"):
            return input_norms(self.dense, calib, **self._options(progress=False))

    def prune_channels(self, sparsity: float = 0.5, **options) -> "Repair":
        """:meth:`prune` with ``pattern="channels"``."""
        return self.prune(sparsity, "channels", **options)

    def shrink(self) -> "Repair":
        """Slices the removed channels out of the result, after channel pruning; counted once."""
        from asr_onnx.prune import channels

        if self.channel_plan is None:
            return self
        masked = channels.masked(self.channel_plan, self.result)
        if not masked and self.channel_report is not None:
            return self  # shrunk and counted already: the summary's shape inference is not repeated
        with self._timed("shrink"):
            shrunk = channels.Shrunk(self.result)
            if masked:  # groups found again on the repaired graph; checked against the masked model on samples
                feeds = channels.sample_feeds(self.dense, self.channel_data, required=False)
                shrunk = channels.shrink_model(self.result, *self.channel_plan.groups_keep(), feeds=feeds,
                                               device=self.device)
                self.output = shrunk.model
            self.channel_report = channels.summary(self.channel_plan, self.dense, shrunk.model, shrunk.whole)
        return self

    def reconstruct(self, calib, method: str = "ls", *, max_gram_mb: float = 256.0, passes: int = 0,
                    samples: int = 0, seed: int = 0, recipe: Recipe | None = None) -> "Repair":
        """Refits the kept weights of every layer by least squares (:func:`asr_onnx.refit.reconstruct.reconstruct`).

        ``method``: "ls" (default), "none", or "auto": refit or not, picked on 2 held-out folds with ``recipe``'s
        correction (:func:`asr_onnx.pipeline.crossfit.choose_reconstruction`). ``max_gram_mb`` (256) skips a layer
        with bigger Gram matrices; ``passes`` (0: one per depth level) the Gram passes; ``samples`` (0: all) a
        seeded subset to refit on; ``seed`` its draw and auto's folds.
        """
        from asr_onnx.pipeline.crossfit import choose_reconstruction
        from asr_onnx.refit.reconstruct import METHODS, reconstruct

        if method not in METHODS + ("auto",):
            raise AsrError(f"unknown reconstruction {method!r}; choose one of {', '.join(METHODS + ('auto',))}")
        if samples < 0 or (samples and not hasattr(calib, "take")):
            raise AsrError(f"cannot refit on {samples} samples of this calibration set")
        auto = None
        if method == "auto":
            if not hasattr(calib, "folds"):
                raise AsrError("reconstruct auto needs a calibration set that can be cut into folds")
            self._check_size(calib)
            with self._timed("reconstruct_auto"):
                recipe = recipe or Recipe(max_gram_mb=max_gram_mb, refit_passes=passes, refit_samples=samples, seed=seed)
                # the probes are corrected as the recipe says; "auto" scores them with "bn"
                probes = recipe if recipe.method != "auto" else recipe.resolved(method="bn", placement="recal")
                method, auto = choose_reconstruction(self, calib, probes)
        if method == "ls":
            fit = calib.take(samples, seed) if 0 < samples < len(calib) else calib
            self._check_size(fit)
            with self._timed("reconstruct"):
                self.pruned, self.refits, split, _ = reconstruct(self.dense, self.pruned, fit, max_gram_mb=max_gram_mb,
                                                                 passes=passes, **self._options())
            self.timings.update({f"reconstruct_{k}": v for k, v in split.items()})
        self.settings.update(reconstruct=method if auto is None else "auto", max_gram_mb=max_gram_mb,
                             refit_passes=passes, refit_samples=samples)
        if auto is not None:
            self.settings["reconstruct_auto"] = auto
        return self

    def refit_corrected(self, calib, *, max_gram_mb: float = 256.0, passes: int = 0) -> "Repair":
        """Refits the kept weights again after :meth:`fold`, from the corrected output
        (:func:`asr_onnx.refit.reconstruct.refit_corrected`); the pruned model is then measured and corrected again."""
        from asr_onnx.refit.reconstruct import refit_corrected

        if self.output is None:
            raise AsrError("refit_corrected() needs a corrected output: run fold() first")
        self._check_size(calib)
        with self._timed("reconstruct"):
            self.pruned, self.refits, split = refit_corrected(self.dense, self.pruned, self.output, calib,
                                                              max_gram_mb=max_gram_mb, passes=passes, **self._options())
        self.measurement, self.output = None, None
        for k, v in split.items():
            self.timings[f"reconstruct_{k}"] = self.timings.get(f"reconstruct_{k}", 0.0) + v
        return self

    def measure_dense(self, calib, keys=None) -> dict:
        """The dense model's per-channel statistics over ``calib`` (``keys``: these sites only): key -> ChannelStats."""
        self._check_size(calib)
        with self._timed("measure_dense"):
            batches, _ = measure(self.batch.for_stats(self.dense, self.dense), calib, desc="dense", keys=keys,
                                 source=None if self.batch.plan else self.source, engine=self.engine,
                                 **self._options(self.batch.stats_size(len(calib))))
        return {key: merge_all(b) for key, b in batches.items()}

    def measure(self, calib, dense_stats: dict | None = None, sequential: bool = False,
                all_dense: bool = False, seed: int = 0, reference: str = DEFAULT_REFERENCE) -> "Repair":
        """Per-channel statistics of the dense model, then of the pruned one with upstream renormalised
        (:func:`asr_onnx.measure.passes.measure_pruned`). ``calib``: a CalibSet, read in the seeded order ``seed``
        (no one-class batches); ``dense_stats``: the stats cache's; ``sequential``: one pass per depth of sites;
        ``all_dense``: every dense site, for the report; ``reference``: "calib" or "running" (REFLOW's target)."""
        self._check_size(calib)
        calib = calib.shuffled(seed) if isinstance(calib, CalibSet) else calib
        sites = self._pruned_sites()
        if reference not in REFERENCES:
            raise AsrError(f"unknown reference {reference!r}; use {' or '.join(REFERENCES)}")
        needed = dense_keys(sites.sites, reference)
        if dense_stats is None:
            dense_stats = self.measure_dense(calib, None if all_dense else needed) if needed or all_dense else {}
        options = self._options(self.batch.stats_size(len(calib)))
        with self._timed("measure_pruned"):
            pruned = self.batch.for_stats(self.pruned, self.dense)
            if pruned is None:  # the pruned graph's batch cannot be freed: its own batch, level by level
                pruned, options = self.pruned, self._options()
            self.measurement = measure_pruned(pruned, calib, sites, dense_stats, reference, sequential=sequential,
                                              engine=self.engine, **options)
        self.workers = self.engine.workers(len(calib), self.measurement.provider)
        self.settings.update(calib_size=len(calib), batch_size=options["batch_size"], sequential=sequential,
                             symbolic_batch=pruned is not self.pruned, reference=reference)
        return self

    def correct(self, method: str = "bn", *, placement: str = "recal", recal: str = "exact", momentum: float = 0.1,
                lambda_rule="median", correct_head: bool = True) -> "Repair":
        """Computes every site's correction (:func:`asr_onnx.correct.recal.correct`); ``correct_head`` also matches
        a classifier head's per-class logit mean and variance to the dense model's (REFLOW leaves it alone)."""
        Recipe(method=method, placement=placement, recal=recal, momentum=momentum)  # refuses an unknown choice
        if method == "auto":
            raise AsrError("method auto is a choice among corrections: use auto() or run()")
        if self.measurement is None:
            raise AsrError("measure() must run before correct()")
        m = self.measurement
        with self._timed("correct"):
            self.corrections = {
                s.key: correct(s, m.references[s.key], m.pruned[s.key],
                               "none" if (s.head and not correct_head) or s.key not in m.touched else method,
                               placement=placement, recal=recal, momentum=momentum, lambda_rule=lambda_rule)
                for s in m.sites}
        self.settings.update(method=method, placement=placement, recal=recal, momentum=momentum,
                             lambda_rule=lambda_rule, correct_head=correct_head)
        return self

    def run(self, calib, method: str = "bn", *, recipe: Recipe | None = None, dense_stats=None,
            fold_bn_nodes: bool = False, **options) -> "Repair":
        """reconstruct -> measure -> correct (or auto) -> fold -> guard, after :meth:`prune`, as ``recipe`` says
        (default: ``Recipe(method, fold_bn=fold_bn_nodes, **options)``); ``dense_stats``: the stats cache's."""
        recipe = recipe or Recipe(method=method, fold_bn=fold_bn_nodes, **options)
        self.recipe = recipe
        self.channel_data = calib if calib is not None else self.channel_data
        self.reconstruct(calib, recipe.reconstruct, max_gram_mb=recipe.max_gram_mb, passes=recipe.refit_passes,
                         samples=recipe.refit_samples, seed=recipe.seed, recipe=recipe)
        if recipe.reconstruct == "auto":
            self.recipe = recipe.resolved(reconstruct=self.settings["reconstruct_auto"]["picked"]["reconstruct"])
        if recipe.method == "none":
            self.output = self.pruned
            self.settings.update(method="none")
            return self.judge().shrink()
        for round_ in range(recipe.refit_rounds):
            if round_:
                self.refit_corrected(calib, max_gram_mb=recipe.max_gram_mb, passes=recipe.refit_passes)
            self.measure(calib, dense_stats, recipe.sequential, seed=recipe.seed, reference=recipe.reference)
            if recipe.method == "auto":
                self.auto(calib, recal=recipe.recal, momentum=recipe.momentum, seed=recipe.seed,
                          correct_head=recipe.correct_head, reference=recipe.reference)
            else:
                self.correct(**recipe.correction())
            self.fold(recipe.fold_bn and round_ == recipe.refit_rounds - 1)  # the next round refits the same graph
        self.settings.update(refit_rounds=recipe.refit_rounds)
        return self.guard(calib, recipe.guard, seed=recipe.seed).judge().shrink()

    def judge(self, calib=None) -> "Repair":
        """The verdict on the result, usable, degraded or broken (:func:`asr_onnx.verify.verdict.of_repair`): from
        the :meth:`evaluate` data when scored, else the guard's held-out samples, else, when given, ``calib``
        scored now (one pass of both models: :meth:`run` leaves the verdict None rather than pay it unasked)."""
        from asr_onnx.verify.verdict import of_repair

        with self._timed("verdict") if calib is not None else nullcontext():
            self.verdict = of_repair(self, calib)
        return self

    def guard(self, calib, mode: str = "fallback", *, seed: int = 0) -> "Repair":
        """Scores the repair and pruning alone against the dense model on held-out calibration samples
        (:mod:`asr_onnx.pipeline.guard`), and keeps the pruned model when the verdict says so ("fallback")."""
        from asr_onnx.pipeline.guard import guard_repair

        if mode != "off" and (self.recipe is None or self.output is None or not hasattr(calib, "folds")):
            raise AsrError("the guard needs a repair finished by run() and a calibration set that can be cut into folds")
        verdict = guard_repair(self, calib, self.recipe, mode, seed=seed)
        if verdict.keep_pruned:
            self.output, self.written = self.pruned_alone, {}
        self.settings["guard"] = verdict.entry
        if "cost_s" in verdict.entry:
            self.timings["guard"] = self.timings.get("guard", 0.0) + verdict.entry["cost_s"]
            stage_done("guard", verdict.entry["cost_s"], enabled=self.progress)
        return self

    def auto(self, calib, *, folds: int = 4, seed: int = 0, recal: str = "exact", momentum: float = 0.1,
             correct_head: bool = True, candidates=AUTO_CANDIDATES, reference: str | None = None) -> "Repair":
        """Picks the correction that best agrees with the dense model on held-out calibration data, each of
        ``folds`` parts held out once (:func:`asr_onnx.pipeline.crossfit.choose`), then applies it with the whole
        set. ``reference``: None is the measured one's."""
        from asr_onnx.pipeline.crossfit import choose

        reference = reference or (self.measurement.reference if self.measurement is not None else DEFAULT_REFERENCE)
        with self._timed("auto"):
            best, scores = choose(self, calib, candidates, folds=folds, seed=seed, recal=recal, momentum=momentum,
                                  correct_head=correct_head, reference=reference)
        if self.measurement is None:
            self.measure(calib, seed=seed, reference=reference)
        picked = {"method": best["method"], "placement": best["placement"], "lambda_rule": best["lambda_rule"]}
        self.correct(**picked, recal=recal, momentum=momentum, correct_head=correct_head)
        self.recipe = self.recipe.resolved(**picked) if self.recipe is not None else None
        self.settings.update(method="auto", auto={"picked": best, "candidates": scores, "folds": folds,
                                                  "held_out": len(calib), "reason": PICK_RULE})
        return self

    def fold(self, fold_bn_nodes: bool = False) -> "Repair":
        """Writes the corrections into a copy of the pruned graph (:func:`asr_onnx.correct.recal.write_all`);
        ``fold_bn_nodes`` then folds every BN that directly follows its layer into it."""
        with self._timed("fold"):
            self.output, self.written = write_all(self.pruned, self.measurement.references, self.corrections,
                                                  fold_bn_nodes, like=self.dense)
        self.settings.update(fold_bn=fold_bn_nodes)
        return self

    def evaluate(self, data, *, name: str | None = None, batch_size: int = 256) -> "Repair":
        """Scores the result against the dense model on ``data`` (:func:`asr_onnx.verify.evaluation.score`),
        for the report's ``eval`` entry, and judges it on that data (:meth:`judge`)."""
        from asr_onnx.verify.evaluation import score

        with self._timed("eval"):
            self.evaluation = score(self.result, self.dense, data, name=name, batch_size=batch_size,
                                    device=self.device, progress=self.progress, engine=self.engine,
                                    output_kind=self.output_kind)
        return self.judge()

    def verify(self) -> "Repair":
        """Runs onnx.checker on the output and loads it in onnxruntime."""
        with self._timed("verify"):
            check_output(self.output)
        return self

    def to_fp16(self, keep_io: bool = True, calib=None) -> "Repair":
        """Casts the result to float16 (``keep_io``: float32 inputs and outputs), first checked against float32
        on up to 64 samples of ``calib`` when given (:func:`asr_onnx.verify.fp16.check_fp16`)."""
        from asr_onnx.verify.fp16 import check_fp16, to_fp16

        self.shrink()  # the channel plan slices float32 constants
        with self._timed("fp16"):
            single = self.result
            half = to_fp16(single, keep_io=keep_io)
            errors = check_fp16(single, half, calib, device=self.device) if calib is not None else None
            self.output = half
        self.half_io = not keep_io
        self.settings.update(fp16=True, fp16_io=not keep_io, fp16_rel_l2=errors)
        return self

    def save(self, path, *, overwrite: bool = False) -> "Repair":
        """Checks and writes the result atomically; the input model is never overwritten unless ``overwrite``.
        A channel-pruned result is first run on a few calibration samples beside the input model and refused
        unless its outputs have the input's names, dtypes and shapes (:func:`asr_onnx.prune.channels.check.save_check`)."""
        from asr_onnx.prune.channels.check import save_check

        self.shrink()
        check = check_output
        if self.channel_plan is not None and self.channel_plan.keep:
            check = save_check(self.dense, self.channel_data, device=self.device, half_io=self.half_io)
        with self._timed("save"):
            save_model(self.result, path, overwrite=overwrite, source=self.source, check=check)
        return self

    def report(self) -> dict:
        """The JSON-ready report (:mod:`asr_onnx.report.build`)."""
        from asr_onnx.report.build import build_report

        return build_report(self.shrink())


def repair(model, calib, *, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
           keep_last: bool = False, batch_size: int | None = None, device: str = "auto", progress: bool = True,
           threads: int = 0, engine=None, output_kind: dict | None = None, **options) -> Repair:
    """Prunes and repairs a model in one call: :class:`Repair`'s arguments, :meth:`Repair.prune`'s, and
    :meth:`Repair.run`'s (``recipe``, or the Recipe's fields). Returns the finished Repair."""
    job = Repair(model, device=device, batch_size=batch_size, progress=progress, threads=threads, engine=engine,
                 output_kind=output_kind)
    return job.prune(sparsity, pattern, exclude, keep_first, keep_last).run(calib, **options)
