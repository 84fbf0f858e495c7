"""Selection on held-out calibration data: ``auto``'s candidates, cross-fitting, and :func:`pick`.

``auto`` (which candidate?), ``reconstruct="auto"`` (refit or not?) and the guard (:mod:`asr_onnx.pipeline.guard`:
repair or pruning alone?) ask the same question of different variants, so all score their variants by
:func:`cross_fit`: each variant is fitted on some calibration folds and scored against the dense model on
the fold it did not see.
"""

from __future__ import annotations

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import DEFAULT_REFERENCE
from asr_onnx.verify.paired import pick

# every method in both placements (bn/naive coincide under recal; pre-bn bn is plain BN recalibration)
AUTO_CANDIDATES = (("bn", "recal", "median"), ("lw", "recal", "median"), ("asr", "recal", "median"),
                   ("asr", "recal", "mean"), ("bn", "pre-bn", "median"), ("naive", "pre-bn", "median"),
                   ("lw", "pre-bn", "median"), ("asr", "pre-bn", "median"))
RECONSTRUCT_CANDIDATES = ("none", "ls")  # the first, the cheaper one, is the default
RECONSTRUCT_FOLDS = 2  # a refit per fold: the refit is the expensive stage
PICK_RULE = ("lowest held-out logit error among the candidates whose top-1 agreement with the dense model trails "
             "the best by at most one paired standard error; the first candidate when it ties on both (a detector: "
             "detection F1 for agreement and the standardised error for the logit error; anything else: the "
             "standardised error alone)")


def choose(job, calib, candidates=AUTO_CANDIDATES, *, folds: int = 4, seed: int = 0, recal: str = "exact",
           momentum: float = 0.1, correct_head: bool = True, reference: str = DEFAULT_REFERENCE,
           layernorm: bool | None = None) -> tuple[dict, list[dict]]:
    """Scores every candidate of ``auto`` on held-out calibration data and picks one (see :func:`pick`).

    Args:
        job: the measured or unmeasured Repair, after prune; its probes are :meth:`Repair.fork` s of it.
        calib: a calib.CalibSet (needs ``folds``).
        candidates: (method, placement, lambda_rule) triples. Defaults to AUTO_CANDIDATES.
        folds, seed: the parts and their seed. Defaults to 4 and 0.
        recal, momentum, correct_head: as for :meth:`Repair.correct`. Defaults to "exact", 0.1 and True.
        reference, layernorm: as for :meth:`Repair.measure`. Defaults to DEFAULT_REFERENCE and None.

    Returns:
        (the picked score, every candidate's score): each score names its method, placement and
        lambda_rule, with its held-out :meth:`~asr_onnx.verify.scoring.Scores.entry`.
    """
    def candidate(method, placement, rule):
        return lambda probe: probe.correct(method, placement=placement, recal=recal, momentum=momentum,
                                           lambda_rule=rule, correct_head=correct_head).fold().output

    scored = held_out_scores(job, calib, [candidate(*c) for c in candidates], folds=folds, seed=seed,
                             measure={"reference": reference, "layernorm": layernorm})
    return _pick_scored([{"method": m, "placement": p, "lambda_rule": r} for m, p, r in candidates], scored)


def choose_reconstruction(job, calib, recipe, *, folds: int = RECONSTRUCT_FOLDS) -> tuple[str, dict]:
    """Scores the model refitted or not (RECONSTRUCT_CANDIDATES) on held-out calibration data, and picks one.

    For each fold, a probe starting from the model as pruned is refitted or not on the fit part only,
    measured and corrected on it as ``recipe`` says, and scored on the held-out part against the dense
    model (:func:`pick`, with "none" the default: the cheaper one is kept where the held-out data cannot
    tell them apart). The refit is the expensive candidate, so 2 folds: 2 refits on half the set.

    Args:
        job: the Repair after prune, not yet refitted.
        calib: a calib.CalibSet (needs ``folds``).
        recipe: a pipeline.Recipe: its correction (method "none": the probe as it is; "auto": "bn"), measurement
            and refit options, and seed.
        folds: the parts. Defaults to RECONSTRUCT_FOLDS (2).

    Returns:
        (the picked reconstruction, the report's ``reconstruct_auto`` entry: the picked score and every
        candidate's, each naming its ``reconstruct`` with its held-out
        :meth:`~asr_onnx.verify.scoring.Scores.entry`).
    """
    if not hasattr(calib, "folds"):
        raise AsrError("reconstruct auto needs a calibration set that can be cut into folds")
    if recipe.method == "auto":  # the probes are corrected as the recipe says; "auto" scores them with "bn"
        recipe = recipe.resolved(method="bn", placement="recal")
    correct = recipe.method != "none"
    measure = {"sequential": recipe.sequential, "reference": recipe.reference}
    seed = recipe.seed

    def fitted(_, fit):
        for refit in RECONSTRUCT_CANDIDATES:
            sites = {"layernorm": recipe.layernorm_for(refit, job.pattern)}
            probe = fit_probe(job, fit, seed=seed, measure=measure | sites if correct else None,
                              reconstruct={"method": refit, "max_gram_mb": recipe.max_gram_mb,
                                           "passes": recipe.refit_passes, "samples": recipe.refit_samples,
                                           "seed": seed})
            yield probe.correct(**recipe.correction()).fold().output if correct else probe.pruned

    scored = cross_fit(job, calib, fitted, len(RECONSTRUCT_CANDIDATES), folds=folds, seed=seed)
    best, scores = _pick_scored([{"reconstruct": refit} for refit in RECONSTRUCT_CANDIDATES], scored)
    return best["reconstruct"], {"picked": best, "candidates": scores, "folds": folds, "held_out": len(calib),
                                 "scored_with": recipe.method, "reason": PICK_RULE}


def _pick_scored(names: list[dict], scored: list) -> tuple[dict, list[dict]]:
    """Each candidate's held-out scores beside its name, and :func:`pick`'s choice (the first is the default).

    A classifier is ranked by top-1 agreement, ties broken by the logit error; a detector by detection F1
    (the paired test on each image's F1, the pooled F1 naming the best), ties broken by the standardised error;
    anything else by the standardised error alone.
    """
    metric = scored[0].primary()[0]
    scores = [name | s.entry() for name, s in zip(names, scored)]
    if metric == "agreement":
        return pick(scores, [s.matches for s in scored], [s.err2 for s in scored]), scores
    primaries = [s.primary() for s in scored]
    # no agreement where it means nothing (a regression): every candidate ties on it
    matches = [p[1] if metric == "detection_f1" else np.zeros(len(p[1])) for p in primaries]
    return pick(scores, matches, [s.std_err2 for s in scored], totals=[p[2] for p in primaries],
                error_key="standardised_error"), scores


def held_out_scores(job, calib, variants, *, folds: int, seed: int, measure: dict | None,
                    reconstruct: dict | None = None, batch_size: int | None = None, shared: list | None = None,
                    refitted: list | None = None):
    """Scores every variant on every calibration sample, each time with a probe fitted on the other folds.

    Args:
        job: the Repair whose dense and pruned models the probes share.
        calib: the calibration set (needs ``folds``).
        variants: functions ``probe -> onnx.ModelProto``; a probe is a measured Repair on the fit folds (a
            :meth:`Repair.fork` of ``job``, see :func:`fit_probe`).
        folds: how many parts; each sample is held out once.
        seed: the parts' seed, and the probes' batch order.
        measure: keyword arguments of the probes' :meth:`Repair.measure`, or None to leave them unmeasured.
        reconstruct: keyword arguments of the probes' :meth:`Repair.reconstruct`, or None to share ``job``'s
            pruned model. Defaults to None.
        batch_size: samples per evaluation run. Defaults to None (evaluate's own default).
        shared: as for :func:`cross_fit`; here each fold's entry also keeps the dense statistics of its fit
            part ("dense_stats"), which every later call on the same folds reuses. Defaults to None.
        refitted: per fold, the model as pruned and refitted on that fold's fit part only, which its probe starts
            from instead of refitting (see :func:`asr_onnx.refit.reconstruct.reconstruct`'s ``held_out``), or
            None. Defaults to None.

    Returns:
        as for :func:`cross_fit`.
    """
    if refitted is not None and (reconstruct is not None or len(refitted) != folds):
        raise AsrError(f"{len(refitted)} refitted models for {folds} folds, or a refit asked for on top of them")

    def fitted(k, fit, cache=None):
        dense_stats = None if cache is None else cache.get("dense_stats")
        probe = fit_probe(job, fit, seed=seed, measure=measure, reconstruct=reconstruct, dense_stats=dense_stats,
                          start=None if refitted is None else refitted[k])
        if cache is not None and measure is not None:
            cache["dense_stats"] = probe.measurement.dense
        return (variant(probe) for variant in variants)

    return cross_fit(job, calib, fitted, len(variants), folds=folds, seed=seed, batch_size=batch_size, shared=shared)


def fit_probe(job, fit, *, seed: int, measure: dict | None, reconstruct: dict | None = None, dense_stats=None,
              start=None):
    """A :meth:`Repair.fork` of ``job`` fitted on ``fit`` only.

    Args:
        job: the Repair to fork.
        fit: the fit part of the calibration set.
        seed: the probe's batch order.
        measure: keyword arguments of the probe's :meth:`Repair.measure`, or None to leave it unmeasured.
        reconstruct: keyword arguments of :meth:`Repair.reconstruct`: the probe starts from ``job.pruned_alone``
            and is refitted on ``fit`` (a refit on the whole set would have seen the held-out part). None
            shares ``job``'s pruned model. Defaults to None.
        dense_stats: the dense statistics of ``fit``, measured earlier with the same seed (see
            :meth:`Repair.measure`), or None to measure them. Defaults to None.
        start: the model as pruned and already refitted on ``fit`` only, which the probe starts from (with
            ``reconstruct`` None), or None. Defaults to None.
    """
    probe = job.fork(batch_size=min(job.batch.requested, len(fit)), progress=False,
                     refit=reconstruct is None and start is None)
    if start is not None:
        probe.pruned = start
    if reconstruct is not None:
        probe.reconstruct(fit, **reconstruct)
    if measure is not None:
        probe.measure(fit, dense_stats, seed=seed, **measure)
    return probe


def cross_fit(job, calib, fitted, count: int, *, folds: int, seed: int, batch_size: int | None = None,
              shared: list | None = None):
    """The fold loop of :func:`held_out_scores`, for variants that each need their own probe (such as a refit).

    Args:
        job: the Repair whose dense model is the reference (its ``output_kind`` names outputs' kinds).
        calib: the calibration set (needs ``folds``).
        fitted: ``(fold index, fit set) -> iterable of count onnx.ModelProto``, each fitted on that set only (an
            iterator is evaluated model by model, so one variant's probe at a time is held).
        count: how many models ``fitted`` gives.
        folds: how many parts; each sample is held out once.
        seed: the parts' seed.
        batch_size: samples per evaluation run. Defaults to None (evaluate's own default).
        shared: one dict per fold that outlives this call, for several calls on the same folds, seed and
            batch size (a search's probes at several sparsities): the dense model's outputs on each
            held-out part are kept there by the first call and reused by the next, and ``fitted`` is then
            called as ``fitted(k, fit, that fold's dict)``. Defaults to None (nothing kept).

    Returns:
        per variant, its :class:`asr_onnx.verify.scoring.Scores` on every held-out sample against the dense model
        (top-1 matches, errors, standardised channel errors, detection counts), pooled over the folds.
    """
    from asr_onnx.calib.specs import fixed_batch
    from asr_onnx.verify.evaluation import evaluate
    from asr_onnx.verify.scoring import Scores

    sizing = {} if batch_size is None else {"batch_size": batch_size}
    found: list[list] = [[] for _ in range(count)]
    parts, fixed = calib.folds(folds, seed), fixed_batch(job.specs) or 1
    if any(len(held) % fixed for _, held in parts):  # a fixed batch cannot run a partial one
        raise AsrError(f"the model fixes its batch at {fixed}, and {len(calib)} calibration samples do not cut into "
                       f"{folds} held-out parts of whole batches; give a multiple of {folds * fixed} samples")
    if shared is not None and len(shared) != len(parts):
        raise AsrError(f"{len(shared)} shared fold entries for {len(parts)} folds")
    for k, (fit, held) in enumerate(parts):
        cache = None if shared is None else shared[k]
        # filled by the first evaluation, reused by the others (and by later calls, when shared)
        dense_outputs: list = [] if cache is None else cache.setdefault("dense_outputs", [])
        for i, model in enumerate(fitted(k, fit) if cache is None else fitted(k, fit, cache)):
            result = evaluate(model, held, reference=job.dense, device=job.device, progress=False,
                              reference_logits=dense_outputs, per_sample=True, engine=job.engine,
                              output_kind=job.output_kind, **sizing)
            found[i].append(result["scores"])
    return [Scores.pooled(parts_of_one) for parts_of_one in found]
