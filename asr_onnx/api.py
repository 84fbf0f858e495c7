"""The public pipeline: prune -> measure -> correct -> fold -> verify -> save, and ``repair()``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import onnx

from .batch import free_batch
from .calib.calibset import CalibSet
from .calib.specs import fixed_batch, input_specs
from .errors import AsrError
from .gains import METHODS
from .graph import find_layers, find_sites, to_graph, to_model
from .measure import SMALL_BATCH, dense_keys, dense_weights, measure, measure_pruned, site_map
from .modelio import load_model, save_model
from .prune import Pattern, check_sparsity, prune_layers
from .recal import DEFAULT_REFERENCE, REFERENCES, correct, fold_bn, write
from .select import AUTO_CANDIDATES, PICK_RULE
from .stats import merge_all
from .validate import check_output

DEFAULT_BATCH = 64  # calibration samples per session run, unless the model fixes its batch or the set is smaller


class Repair:
    """One model's repair, stage by stage; every stage returns ``self``.

    >>> Repair("model.onnx").prune(0.9).measure(calib).correct("asr").fold().save("out.onnx")

    Args:
        model: a path or an onnx.ModelProto. A path is read once and never written.
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        batch_size: calibration samples per session run. Defaults to None: 64, or the calibration set's size
            when that is smaller; only a batch size given here refuses a smaller calibration set. A model that
            fixes a batch under 8 is measured with a symbolic batch of min(batch_size, calibration samples)
            where shape inference proves that safe (see :mod:`asr_onnx.batch`), else with its own batch.
        progress: progress bars on a TTY. Defaults to True.
        threads: onnxruntime intra-op threads; 0 lets onnxruntime choose. Defaults to 0.

    Attributes:
        pruned: the model every later stage works on: as pruned, then as refitted by :meth:`reconstruct`.
        pruned_alone: the model as pruned, never refitted: the guard's "pruning alone" baseline.
        output: the finished model, once :meth:`run` or :meth:`fold` ran.
    """

    def __init__(self, model, *, device: str = "auto", batch_size: int | None = None, progress: bool = True,
                 threads: int = 0):
        from .quantize_correct import dequantize_weights

        self.source = None if isinstance(model, onnx.ModelProto) else Path(model)
        given = model if self.source is None else load_model(self.source)
        # a QDQ model's weights are held in float while it is repaired, and quantized again at the end
        self.dense, self.qdq_tensors = dequantize_weights(given)
        self.quantized_input = given if self.qdq_tensors else None
        self.device, self.progress, self.threads = device, progress, threads
        self.specs = input_specs(self.dense)
        fixed = fixed_batch(self.specs)
        self.requested_batch = int(DEFAULT_BATCH if batch_size is None else batch_size)
        self._adapt_batch = not fixed and batch_size is None  # a default adapts to a small set (issue 17)
        self.batch_size = fixed or self.requested_batch
        if self.batch_size < 1 or self.requested_batch < 1:
            raise AsrError(f"batch size must be >= 1, got {batch_size}")
        # too few samples per run for batch statistics: measure with a symbolic batch where that is safe
        self.batch_plan = free_batch(self.dense, fixed) if fixed and fixed < SMALL_BATCH else None
        self.pruned = self.pruned_alone = self.dense
        self.layers, self.refits, self.settings, self.timings = [], [], {}, {}
        self.measurement = None  # a measure.Measurement, once measured
        self.corrections, self.written, self.output = {}, {}, None
        self.evaluation = None
        self.quantization = None  # the report's quantization entry, after to_int8 or a QDQ input's requantize
        self.channel_plan = self.channel_report = None
        self._batch_arg = batch_size
        self._dense_weights = None  # layer name -> dense weight, read once
        self._site_map = None  # (pruned model, its measure.SiteMap): found once per pruned model

    def fork(self, *, batch_size: int | None = None, progress: bool | None = None, pruned: bool = True,
             refit: bool = True) -> "Repair":
        """A new Repair over the same dense model (its file and weights shared, nothing measured).

        Args:
            batch_size: as for :class:`Repair`. Defaults to None: this one's.
            progress: as for :class:`Repair`. Defaults to None: this one's.
            pruned: start from this one's pruned model (its layers and sites shared) instead of the dense
                one. Defaults to True.
            refit: with ``pruned``, start from the refitted model; False starts from ``pruned_alone``, to be
                refitted on other data. Defaults to True.
        """
        new = Repair(self.dense, device=self.device, batch_size=self._batch_arg if batch_size is None else batch_size,
                     progress=self.progress if progress is None else progress, threads=self.threads)
        new.source, new._dense_weights = self.source, self._weights()
        if pruned:
            new.pruned_alone, new.layers = self.pruned_alone, self.layers
            new.pruned = self.pruned if refit else self.pruned_alone
            new._site_map = self._site_map  # kept only while it is of the same pruned model
        return new

    def _weights(self) -> dict:
        """The dense model's layer weights, read on first use."""
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
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def prune(self, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
              keep_last: bool = False, allocation: str = "global", score: str = "magnitude",
              calib=None, flops_target: float | None = None) -> "Repair":
        """Zeroes weights of Conv, ConvTranspose, Gemm and MatMul layers, or removes whole channels.

        Args:
            sparsity: fraction of eligible weights to zero, in [0, 1); under "channels" the fraction of each
                prunable group's channels removed. Defaults to 0.9 (ignored for N:M and a FLOPs target).
            pattern: "global", "uniform", "N:M" or "channels" (see :meth:`prune_channels`). Defaults to "global".
            exclude: regexes of node or weight names to leave dense. Defaults to none.
            keep_first: leave the first prunable layer dense. Defaults to False.
            keep_last: leave the last prunable layer dense. Defaults to False.
            allocation: "global", "lamp" or "uniform" (see :func:`asr_onnx.prune.prune_layers`). Defaults
                to "global".
            score: "magnitude" (|w|), "wanda" (|w| times its input channel's norm on ``calib``) or "rownorm"
                (|w| over its output channel's weight norm, blind to a folded BN's gamma / sigma); under
                "channels", "magnitude", "bn-scale" or "greedy". Defaults to "magnitude".
            calib: the calibration set, needed by "wanda" and "greedy". Defaults to None.
            flops_target: under "channels", the fraction of multiply-accumulates to keep instead of a
                sparsity. Defaults to None.
        """
        if str(pattern).strip().lower() == "channels":
            return self.prune_channels(sparsity, score=score, calib=calib, flops_target=flops_target,
                                       exclude=exclude)
        sparsity, parsed = check_sparsity(sparsity), Pattern.parse(pattern)
        norms = self._input_norms(score, calib)
        with self._timed("prune"):
            graph = to_graph(self.dense)
            self.layers = prune_layers(find_layers(graph), sparsity, parsed, exclude, keep_first, keep_last,
                                       allocation, norms, score)
            self.pruned = to_model(graph, self.dense)
            self.pruned_alone = self.pruned
        used = self.layers[0].allocation if self.layers else allocation  # "uniform" for the pattern uniform
        self.settings.update(sparsity=sparsity, pattern=str(parsed), exclude=list(exclude),
                             keep_first=keep_first, keep_last=keep_last, allocation=used, score=score)
        return self

    def prune_channels(self, sparsity: float = 0.5, *, score: str = "magnitude", calib=None,
                       flops_target: float | None = None, exclude=(), channel_plan=None) -> "Repair":
        """Removes whole output channels, group by group (see :mod:`asr_onnx.channels`).

        Until :meth:`run` ends, ``pruned`` and ``output`` keep the dense shapes with the removed filters zeroed
        (every stage works on them); run then shrinks the output. Arguments as for :meth:`prune`, and
        ``channel_plan``: a plan of this model made earlier (:func:`asr_onnx.channels.plan`), whose removal
        orders are reused at this sparsity or target. Defaults to None.
        """
        from . import channels

        if self.qdq_tensors:
            raise AsrError("channel pruning of a quantized (QDQ) model is not supported: its integer weights and "
                           "scales would have to be sliced too; prune its float model, then use --int8")
        sparsity = check_sparsity(sparsity)
        target = None if flops_target is None else channels.check_flops_target(flops_target)
        if score == "greedy" and channel_plan is None:
            self._check_size(calib)
        with self._timed("prune"):
            if channel_plan is not None:
                self.channel_plan = channels.choose(channel_plan, sparsity=None if target else sparsity,
                                                    flops_target=target)
            else:
                self.channel_plan = channels.plan(self.dense, sparsity=None if target else sparsity,
                                                  flops_target=target, score=score, calib=calib, exclude=exclude,
                                                  batch_size=self.batch_size, device=self.device, threads=self.threads)
            self.pruned = channels.mask(self.dense, self.channel_plan.groups, self.channel_plan.keep)
            self.pruned_alone = self.pruned
        self.layers, self.channel_report = [], None
        self.settings.update(sparsity=sparsity, pattern="channels", flops_target=target, exclude=list(exclude),
                             score=score)
        return self

    def shrink(self) -> "Repair":
        """Slices the removed channels out of the output (or the pruned model), after :meth:`prune_channels`;
        :meth:`run`, :meth:`save` and :meth:`report` call it; a shrunk output is left as it is."""
        from . import channels

        masked = self.output if self.output is not None else self.pruned
        if self.channel_plan is None:
            return self.requantize()
        if not channels.masked(self.channel_plan, masked) and self.channel_report is not None:
            return self  # shrunk and counted already: the summary's shape inference is not repeated
        with self._timed("shrink"):
            if channels.masked(self.channel_plan, masked):
                self.output = channels.shrink(masked, self.channel_plan.groups, self.channel_plan.keep)
            self.channel_report = channels.summary(self.channel_plan, self.dense,
                                                   masked if self.output is None else self.output)
        return self

    def requantize(self) -> "Repair":
        """A QDQ input's output gets integer weights again (see :func:`asr_onnx.quantize_correct.requantize`:
        the original scales where the repaired weights still fit them); an output that the repair left as
        it was is the input model itself. :meth:`shrink` calls it; a float model is left as it is."""
        from .quantize_correct import requantize, same_model

        single = self.output if self.output is not None else self.pruned
        if not self.qdq_tensors or single is self.quantized_input or self.quantization is not None:
            return self
        with self._timed("requantize"):
            channels: list = []
            same = same_model(single, self.dense)
            self.output = self.quantized_input if same else requantize(single, self.qdq_tensors, channels)
        self.quantization = {"format": "QDQ", "input": "quantized", "unchanged": same, "tensors": channels}
        return self

    def _input_norms(self, score: str, calib):
        """Wanda's per-layer input norms on the dense model, or None for a score that needs no data."""
        from .gram import input_norms
        from .prune import SCORES

        if score not in SCORES:
            raise AsrError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        if score != "wanda":
            return None
        if calib is None:
            raise AsrError("the score wanda needs calibration data")
        self._check_size(calib)
        with self._timed("input_norms"):
            return input_norms(self.dense, calib, batch_size=self.batch_size, device=self.device, threads=self.threads)

    def reconstruct(self, calib, method: str = "ls", *, max_gram_mb: float = 256.0, passes: int = 0,
                    samples: int = 0, correction: dict | None = None, measure: dict | None = None,
                    seed: int = 0) -> "Repair":
        """Refits the kept weights of every layer by least squares (see :mod:`asr_onnx.reconstruct`), after prune.

        "auto" refits only where that helps on held-out calibration data: with 2 folds (the refit is the
        expensive stage), each fold's probe is refitted or not on the fit part, corrected with
        ``correction`` and scored on the other part against the dense model
        (:func:`asr_onnx.select.choose_reconstruction`; "none" is kept where they tie). The pick is then
        applied with the whole set, and the verdict goes to ``settings["reconstruct_auto"]``. It costs two
        refits on half the set, plus the final one when "ls" wins.

        Args:
            calib: the calibration set ("auto": a calib.CalibSet, which has ``folds``).
            method: "ls", "none" or "auto". Defaults to "ls".
            max_gram_mb: skip a layer whose Gram matrices would exceed this many MB. Defaults to 256.
            passes: Gram passes over the calibration set, 0 for one per depth level (exactly sequential);
                see :func:`asr_onnx.reconstruct.reconstruct`. Defaults to 0.
            samples: refit on a seeded ``samples`` of the calibration samples (``calib.take(samples, seed)``),
                0 for all of them; the Gram passes cost in proportion. Defaults to 0.
            correction: with "auto", keyword arguments of :meth:`correct` for the probes (method "none"
                scores them uncorrected). Defaults to None: ``{"method": "bn"}``.
            measure: with "auto", keyword arguments of :meth:`measure` for the probes. Defaults to None
                (its defaults).
            seed: the seed of ``samples``' draw; with "auto", also the folds' seed and the probes' batch
                order. Defaults to 0.
        """
        from .reconstruct import METHODS, reconstruct

        if method not in METHODS + ("auto",):
            raise AsrError(f"unknown reconstruction {method!r}; choose one of {', '.join(METHODS + ('auto',))}")
        if method == "auto":
            return self._reconstruct_auto(calib, max_gram_mb, passes, samples, correction or {"method": "bn"},
                                          measure or {}, seed)
        if samples < 0 or (samples and not hasattr(calib, "take")):
            raise AsrError(f"cannot refit on {samples} samples of this calibration set")
        if method == "ls":
            fit = calib.take(samples, seed) if 0 < samples < len(calib) else calib
            self._check_size(fit)
            with self._timed("reconstruct"):
                self.pruned, self.refits, split, _ = reconstruct(self.dense, self.pruned, fit,
                                                                 max_gram_mb=max_gram_mb, passes=passes,
                                                                 **self._refit_options())
            self.timings.update({f"reconstruct_{k}": v for k, v in split.items()})
        self.settings.update(reconstruct=method, max_gram_mb=max_gram_mb, refit_passes=passes, refit_samples=samples)
        return self

    def _reconstruct_auto(self, calib, max_gram_mb: float, passes: int, samples: int, correction: dict,
                          measure: dict, seed: int) -> "Repair":
        """:meth:`reconstruct` "auto": picks "none" or "ls" on held-out folds, then applies it to the whole set."""
        from .select import PICK_RULE, RECONSTRUCT_FOLDS, choose_reconstruction

        if not hasattr(calib, "folds"):
            raise AsrError("reconstruct auto needs a calibration set that can be cut into folds")
        self._check_size(calib)
        with self._timed("reconstruct_auto"):
            best, scores = choose_reconstruction(self, calib, correction, measure=measure, seed=seed,
                                                 max_gram_mb=max_gram_mb, passes=passes, samples=samples)
        self.reconstruct(calib, best["reconstruct"], max_gram_mb=max_gram_mb, passes=passes, samples=samples,
                         seed=seed)
        self.settings.update(reconstruct="auto", reconstruct_auto={
            "picked": best, "candidates": scores, "folds": RECONSTRUCT_FOLDS, "held_out": len(calib),
            "scored_with": correction["method"], "reason": PICK_RULE})
        return self

    def refit_corrected(self, calib, *, max_gram_mb: float = 256.0, passes: int = 0) -> "Repair":
        """Refits the kept weights again, after :meth:`fold`: each layer's input now comes from the corrected
        output, and each layer keeps the correction folded into it while it is refitted. The pruned model
        takes the new weights (its masks unchanged), so it must be measured and corrected again.

        Args:
            calib, max_gram_mb, passes: as for :meth:`reconstruct`.
        """
        from .reconstruct import reconstruct, row_scales, unscaled_refit

        if self.output is None:
            raise AsrError("refit_corrected() needs a corrected output: run fold() first")
        self._check_size(calib)
        with self._timed("reconstruct"):
            scales = row_scales(self.pruned, self.output)
            refitted, self.refits, split, _ = reconstruct(self.dense, self.output, calib, max_gram_mb=max_gram_mb,
                                                          passes=passes, row_scales=scales, **self._refit_options())
            self.pruned = unscaled_refit(self.pruned, refitted, scales, self.refits)
        self.measurement, self.output = None, None
        for k, v in split.items():
            self.timings[f"reconstruct_{k}"] = self.timings.get(f"reconstruct_{k}", 0.0) + v
        return self

    def _check_size(self, calib) -> None:
        if self._adapt_batch and len(calib) >= 1:
            self.batch_size = min(DEFAULT_BATCH, len(calib))
        if len(calib) < self.batch_size:
            raise AsrError(f"the calibration set has {len(calib)} samples, fewer than the batch size {self.batch_size}")

    def _refit_options(self) -> dict:
        """The Gram passes run the model as it is, so with its own batch."""
        return dict(batch_size=self.batch_size, device=self.device, progress=self.progress, threads=self.threads)

    def _stats_batch(self, calib) -> int:
        """Samples per statistics run: the model's own batch, or with a symbolic batch as many as asked and held."""
        return min(self.requested_batch, len(calib)) if self.batch_plan else self.batch_size

    def _for_stats(self, model):
        """The model that the statistics graphs are built from: with a symbolic batch where planned, else None.

        The pruned model gets its own plan: importing it may have folded a Shape-computed Reshape target
        into a constant that names the batch.
        """
        if self.batch_plan is None:
            return model
        plan = self.batch_plan if model is self.dense else free_batch(model, self.batch_plan.batch)
        return plan.apply(model) if plan else None

    def _session_options(self, calib) -> dict:
        return dict(batch_size=self._stats_batch(calib), device=self.device, progress=self.progress,
                    threads=self.threads)

    def measure_dense(self, calib, keys=None) -> dict:
        """The dense model's per-channel statistics over ``calib``: site key -> ChannelStats.

        Args:
            calib: the calibration set.
            keys: the sites to measure. Defaults to None (every site).

        Raises:
            AsrError: the calibration set is smaller than one batch.
        """
        self._check_size(calib)
        with self._timed("measure_dense"):
            # the file runs as given: a QDQ input's own file is not the float form the repair measures
            batches, _ = measure(self._for_stats(self.dense), calib, desc="dense", keys=keys,
                                 source=None if self.batch_plan or self.qdq_tensors else self.source,
                                 **self._session_options(calib))
        return {key: merge_all(b) for key, b in batches.items()}

    def measure(self, calib, dense_stats: dict | None = None, sequential: bool = False,
                all_dense: bool = False, seed: int = 0, reference: str = DEFAULT_REFERENCE) -> "Repair":
        """Per-channel statistics of the dense model, then of the pruned one with upstream renormalised.

        Under ``reference="running"`` a real BN's reference is its own running statistics, so the dense
        pass only measures the sites that have no BN (layers that get a virtual one, such as a
        classifier head); under "calib" it measures every site. A site that
        no pruned layer reaches sees the dense activations: it is measured but not renormalised, and
        its correction is the identity (so ``sparsity 0`` changes nothing).

        Args:
            calib: a calib.CalibSet (or anything with ``__len__`` and ``batches(batch_size)``).
            dense_stats: site key -> ChannelStats from an earlier run (see stats cache). Defaults to None.
            sequential: measure the pruned model level by level, each level with every shallower site
                fixed at its whole-set statistics: exact layer-by-layer recalibration, at one pass per
                depth of sites. Defaults to False (one pass, upstream renormalised with batch statistics).
            all_dense: measure every site of the dense model, BN sites too, for the report. Defaults to False.
            seed: a CalibSet is read in this seeded random order, so that no batch holds one class
                only (batch statistics renormalise the pruned pass). Another kind of set is read in its
                own order. Defaults to 0.
            reference: what a BN site's correction restores: "calib", the dense model's statistics at
                the BN's input on the calibration data (the identity where nothing changed), or
                "running", the BN's running statistics (REFLOW's target, for calibration data drawn
                from the training distribution). Defaults to DEFAULT_REFERENCE.

        Raises:
            AsrError: the calibration set is smaller than one batch.
        """
        self._check_size(calib)
        calib = calib.shuffled(seed) if isinstance(calib, CalibSet) else calib
        sites = self._pruned_sites()
        if reference not in REFERENCES:
            raise AsrError(f"unknown reference {reference!r}; use {' or '.join(REFERENCES)}")
        needed = dense_keys(sites.sites, reference)
        if dense_stats is None:
            dense_stats = self.measure_dense(calib, None if all_dense else needed) if needed or all_dense else {}
        options = self._session_options(calib)
        with self._timed("measure_pruned"):
            pruned = self._for_stats(self.pruned)
            if pruned is None:  # the pruned graph's batch cannot be freed: its own batch, level by level
                pruned, options = self.pruned, dict(options, batch_size=self.batch_size)
            self.measurement = measure_pruned(pruned, calib, sites, dense_stats, reference, sequential=sequential,
                                              **options)
        self.settings.update(calib_size=len(calib), batch_size=options["batch_size"], sequential=sequential,
                             symbolic_batch=pruned is not self.pruned, reference=reference)
        return self

    def correct(self, method: str = "bn", *, placement: str = "recal", recal: str = "exact", momentum: float = 0.1,
                lambda_rule="median", correct_head: bool = True) -> "Repair":
        """Computes every site's correction (see :func:`asr_onnx.recal.correct` for the options).

        Args:
            correct_head: also match a classifier head's per-class logit mean and variance to the dense
                model's (a BN-free layer whose output is a graph output). BN recalibration alone
                (PyTorch's REFLOW) leaves the head as it is. Defaults to True.
        """
        if method not in METHODS:
            raise AsrError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if self.measurement is None:
            raise AsrError("measure() must run before correct()")
        m = self.measurement
        with self._timed("correct"):
            self.corrections = {
                s.key: correct(s, m.references[s.key], m.pruned[s.key],
                               "none" if (s.head and not correct_head) or s.key not in m.touched else method,
                               placement=placement,
                               recal=recal, momentum=momentum, lambda_rule=lambda_rule)
                for s in m.sites
            }
        self.settings.update(method=method, placement=placement, recal=recal, momentum=momentum,
                             lambda_rule=lambda_rule, correct_head=correct_head)
        return self

    def run(self, calib, method: str = "bn", *, placement: str = "recal", recal: str = "exact",
            momentum: float = 0.1, lambda_rule="median", correct_head: bool = True, dense_stats=None,
            sequential: bool = False, fold_bn_nodes: bool = False, seed: int = 0,
            reference: str = DEFAULT_REFERENCE, reconstruct: str = "none", max_gram_mb: float = 256.0,
            refit_passes: int = 0, refit_samples: int = 0, refit_rounds: int = 1, guard: str = "off") -> "Repair":
        """reconstruct -> measure -> correct (or auto) -> fold -> guard, after :meth:`prune`.

        Args:
            calib: the calibration set.
            method: none, bn, lw, naive, asr or auto. Defaults to "bn". With "none" nothing is measured
                and the output is the pruned model.
            placement, recal, momentum, lambda_rule, correct_head: as for :meth:`correct`.
            dense_stats, sequential, reference: as for :meth:`measure`. Defaults to None, False and
                DEFAULT_REFERENCE.
            fold_bn_nodes: as for :meth:`fold`. Defaults to False.
            seed: the seed of the calibration batches' order and of "auto"'s folds. Defaults to 0.
            reconstruct, max_gram_mb, refit_passes, refit_samples: as for :meth:`reconstruct` (``passes``,
                ``samples``). Defaults to "none", 256, 0 and 0. "auto" scores its probes with this run's method and options; when
                ``method`` is "auto" too, the reconstruction is chosen first, with "bn" (the default
                method), and then auto picks the method on the result.
            refit_rounds: with "ls", how many times refit and correction run: each round after the first
                refits again from the corrected output (:meth:`refit_corrected`) and corrects again.
                Defaults to 1.
            guard: "fallback", "warn" or "off", as for :meth:`guard`. Defaults to "off" (the CLI's default
                is "fallback").
        """
        if refit_rounds != 1 and (refit_rounds < 1 or reconstruct != "ls" or method == "none"):
            raise AsrError(f"refit_rounds {refit_rounds}: more than one round needs reconstruct ls and a method")
        correction = {"method": method, "placement": placement, "recal": recal, "momentum": momentum,
                      "lambda_rule": lambda_rule, "correct_head": correct_head}
        if method == "auto":  # the reconstruction is chosen first, with the default method
            correction.update(method="bn", placement="recal")
        self.reconstruct(calib, reconstruct, max_gram_mb=max_gram_mb, passes=refit_passes, samples=refit_samples,
                         correction=correction,
                         measure={"sequential": sequential, "reference": reference}, seed=seed)
        if method == "none":
            self.output = self.pruned
            self.settings.update(method="none")
            return self.shrink()
        for round_ in range(refit_rounds):
            if round_:
                self.refit_corrected(calib, max_gram_mb=max_gram_mb, passes=refit_passes)
            self.measure(calib, dense_stats, sequential, seed=seed, reference=reference)
            if method == "auto":
                self.auto(calib, recal=recal, momentum=momentum, seed=seed, correct_head=correct_head,
                          reference=reference)
            else:
                self.correct(method, placement=placement, recal=recal, momentum=momentum, lambda_rule=lambda_rule,
                             correct_head=correct_head)
            self.fold(fold_bn_nodes and round_ == refit_rounds - 1)  # the next round refits the same graph
        self.settings.update(refit_rounds=refit_rounds)
        if guard == "off":
            self.settings.update(guard={"mode": "off", "held_out": 0, "kept": "repair"})
            return self.shrink()
        return self.guard(calib, guard, seed=seed).shrink()

    def guard(self, calib, mode: str = "fallback", *, seed: int = 0) -> "Repair":
        """Scores the repair and pruning alone against the dense model on held-out calibration samples
        (2-fold cross-fitting, see :mod:`asr_onnx.guard`); the verdict goes to ``settings["guard"]``.

        Args:
            calib: the calibration set the repair used (needs ``folds``, as a calib.CalibSet has).
            mode: "fallback" keeps the pruned model when it scores better; "warn" only reports it; "off"
                does nothing. Defaults to "fallback".
            seed: the folds' seed. Defaults to 0.
        """
        from .guard import guard_repair

        if self.output is None or not hasattr(calib, "folds"):
            raise AsrError("the guard needs a finished repair and a calibration set that can be cut into folds")
        guard_repair(self, calib, mode, seed=seed)
        return self

    def auto(self, calib, *, folds: int = 4, seed: int = 0, recal: str = "exact", momentum: float = 0.1,
             correct_head: bool = True, candidates=AUTO_CANDIDATES, reference: str | None = None) -> "Repair":
        """Picks the method that best agrees with the dense model on held-out calibration data.

        Cross-fitted: ``calib`` is cut into ``folds`` parts; each part is held out in turn while every
        candidate is repaired with statistics from the other parts. Each candidate is scored, label-free,
        on every calibration sample it did not see: top-1 agreement with the dense model, with paired
        ties broken by logit error (see :func:`asr_onnx.select.pick`). The winner is then applied with the
        whole set.

        Args:
            calib: a calib.CalibSet (needs ``folds``).
            folds: how many parts; each sample is held out once. Defaults to 4.
            seed: the parts' seed. Defaults to 0.
            recal, momentum, correct_head: as in :meth:`correct`.
            candidates: (method, placement, lambda_rule) triples. Defaults to AUTO_CANDIDATES.
            reference: as for :meth:`measure`. Defaults to None: the one of the last measure, else
                DEFAULT_REFERENCE.
        """
        from .select import choose

        reference = reference or self.settings.get("reference", DEFAULT_REFERENCE)
        with self._timed("auto"):
            best, scores = choose(self, calib, candidates, folds=folds, seed=seed, recal=recal, momentum=momentum,
                                  correct_head=correct_head, reference=reference)
        if self.measurement is None:
            self.measure(calib, seed=seed, reference=reference)
        self.correct(best["method"], placement=best["placement"], recal=recal, momentum=momentum,
                     lambda_rule=best["lambda_rule"], correct_head=correct_head)
        self.settings.update(method="auto", auto={"picked": best, "candidates": scores, "folds": folds,
                                                  "held_out": len(calib), "reason": PICK_RULE})
        return self

    def fold(self, fold_bn_nodes: bool = False) -> "Repair":
        """Writes the corrections into a copy of the pruned graph (BN nodes, or layer weights and biases).

        Args:
            fold_bn_nodes: afterwards fold every BN that directly follows its layer into that layer.
                Defaults to False.
        """
        with self._timed("fold"):
            graph = to_graph(self.pruned)
            sites = find_sites(graph, find_layers(graph))
            self.written = {s.key: write(graph, s, self.measurement.references[s.key], self.corrections[s.key])
                            for s in sites if s.key in self.corrections}
            if fold_bn_nodes:
                for site in sites:
                    if site.bn is not None and site.layer is not None:
                        fold_bn(graph, site)
            graph.cleanup().toposort()
            self.output = to_model(graph, self.dense)
        self.settings.update(fold_bn=fold_bn_nodes)
        return self

    def evaluate(self, data, *, name: str | None = None, batch_size: int = 256) -> "Repair":
        """Scores the output against the dense model on ``data``, for the report's ``eval`` entry.

        The dense model runs once: its logits give agreement, logit error and, with labels, its own top-1.

        Args:
            data: a calib.CalibSet, labelled or not.
            name: what the report calls the data. Defaults to None ("given").
            batch_size: samples per run. Defaults to 256.
        """
        from .evaluation import agreement, evaluate
        from .output_kinds import output_kinds

        dense_logits: list = []  # the dense model runs once: its outputs also give its own top-1
        with self._timed("eval"):
            scores = evaluate(self.output if self.output is not None else self.pruned, data, reference=self.dense,
                              batch_size=batch_size, device=self.device, progress=self.progress,
                              reference_logits=dense_logits)
        dense_top1 = None
        if data.labels is not None and scores.get("top1") is not None:  # the first output is (N, classes)
            dense_top1 = agreement(dense_logits, output_kinds(self.dense), data.labels)["top1"]
        self.evaluation = {"data": name or "given", "samples": scores["samples"], "top1": scores.get("top1"),
                           "dense_top1": dense_top1, "agreement": scores.get("agreement"),
                           "logit_rel_l2": scores["logit_rel_l2"]}
        return self

    def verify(self) -> "Repair":
        """Runs onnx.checker on the output and loads it in onnxruntime."""
        with self._timed("verify"):
            check_output(self.output)
        return self

    def to_fp16(self, keep_io: bool = True, calib=None) -> "Repair":
        """Casts the output's weights and arithmetic to float16 for deployment.

        Args:
            keep_io: keep float32 graph inputs and outputs (Casts at the edges). Defaults to True.
            calib: compare the float16 output with the float32 one on up to 64 of these samples first
                (see :func:`asr_onnx.fp16.check_fp16`). Defaults to None (no comparison).

        Raises:
            AsrError: the float16 output is not finite or is too far from the float32 one on ``calib``.
        """
        from .fp16 import check_fp16, to_fp16

        if self.qdq_tensors or self.quantization is not None:
            raise AsrError("fp16: the output is quantized (QDQ); it cannot be cast to float16 as well")
        self.shrink()  # the channel plan slices float32 constants
        with self._timed("fp16"):
            single = self.output if self.output is not None else self.pruned
            half = to_fp16(single, keep_io=keep_io)
            errors = check_fp16(single, half, calib, device=self.device) if calib is not None else None
            self.output = half
        self.settings.update(fp16=True, fp16_io=not keep_io, fp16_rel_l2=errors)
        return self

    def to_int8(self, calib, *, target: str = "cpu", calibration: str = "auto", correction: str = "auto",
                seed: int = 0) -> "Repair":
        """Quantizes the output to QDQ form with onnxruntime's static quantizer (see :mod:`asr_onnx.int8`):
        per-channel symmetric int8 weights, activations calibrated on ``calib``, the calibration method
        and the quantization correction chosen on held-out calibration data. Zeros and 2:4 patterns are
        checked on the integer weights first; the report gains a ``quantization`` entry.

        Args:
            calib: the calibration set (a calib.CalibSet: it is cut in two for the held-out choices).
            target: "cpu" (onnxruntime's integer kernels) or "tensorrt". Defaults to "cpu".
            calibration: "auto", "MinMax", "Percentile" or "Entropy". Defaults to "auto".
            correction: "auto", "none" or "bn". Defaults to "auto".
            seed: the held-out split's seed. Defaults to 0.

        Raises:
            AsrError: an unknown option, a quantized model, or a check that fails (nothing is then set).
        """
        from .int8 import to_int8

        if self.qdq_tensors:
            raise AsrError("int8: the model is quantized already (QDQ weights); its repair keeps them int8 "
                           "without --int8")
        self.shrink()  # the channel plan slices float32 constants
        with self._timed("int8"):
            single = self.output if self.output is not None else self.pruned
            self.output, self.quantization = to_int8(single, calib, target=target, calibration=calibration,
                                                     correction=correction, seed=seed,
                                                     batch_size=self.requested_batch, device="cpu",
                                                     threads=self.threads, progress=self.progress)
        self.settings.update(int8=True, int8_target=target)
        return self

    def save(self, path, *, overwrite: bool = False) -> "Repair":
        """Checks and writes the output atomically; the input model is never overwritten unless ``overwrite``."""
        self.shrink()
        with self._timed("save"):
            save_model(self.output if self.output is not None else self.pruned, path, overwrite=overwrite,
                       source=self.source, check=check_output)
        return self

    def report(self) -> dict:
        """The JSON-ready report (see :mod:`asr_onnx.report`)."""
        from .report import build_report

        return build_report(self.shrink())


def repair(model, calib, *, sparsity: float = 0.9, pattern: str = "global", exclude=(), keep_first: bool = False,
           keep_last: bool = False, batch_size: int | None = None, device: str = "auto", progress: bool = True,
           threads: int = 0, **options) -> Repair:
    """Prunes and repairs a model in one call.

    Args:
        model, batch_size, device, progress, threads: as for :class:`Repair`.
        calib: the calibration set (unused with ``method="none"``).
        sparsity, pattern, exclude, keep_first, keep_last: as for :meth:`Repair.prune`.
        **options: as for :meth:`Repair.run` (method, placement, recal, momentum, lambda_rule,
            correct_head, dense_stats, sequential, fold_bn_nodes).

    Returns:
        the finished Repair: ``.output`` is the repaired onnx.ModelProto, ``.report()`` its report.
    """
    job = Repair(model, device=device, batch_size=batch_size, progress=progress, threads=threads)
    return job.prune(sparsity, pattern, exclude, keep_first, keep_last).run(calib, **options)
