"""The guard: is the repair better than pruning alone, on calibration samples it did not see?

Cross-fitted like ``auto``: the calibration set is cut into two halves; each half is held out in turn
while the same repair is fitted on the other half. Every sample is then scored once for the repaired
and once for the pruning-only model against the dense one, on the score that matters for the model
(:meth:`asr_onnx.verify.scoring.Scores.primary`): a classifier's top-1 agreement, then the relative L2 error of
all outputs; a detector's detection F1 (each image's, paired), then the standardised error; anything else's
standardised error. Pruning alone is the baseline the tool promises never to lose to, so the burden of proof
is on the repair: it is kept when it is better past two paired standard errors, or, within noise, when its
held-out error is lower; and a detector's repair is never kept with a lower held-out detection F1 (pooled
per class) than pruning alone's, whatever its errors. A fit on half the set is a little weaker than the
final fit on all of it, so the guard leans towards pruning alone, never towards the repair.

With the least-squares refit and a correction, the refit alone (the model refitted, before the correction) is
scored too, and the correction bears the same burden against it: on few calibration samples, recalibrating
a refitted network can undo what the refit gained. The guard keeps the corrected repair when it loses to
neither; else the refit alone when it does not lose to pruning alone; else the repair when it beats pruning
alone; else pruning alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.pipeline.recipe import GUARD_MODES, Recipe
from asr_onnx.verify.paired import Z, paired_sign

FOLDS = 2


@dataclass(frozen=True)
class HeldOutRefits:
    """The repair's refit without each held-out part of ``calib.folds(FOLDS, seed)``, solved from the Gram sums
    of its own passes (:func:`asr_onnx.refit.reconstruct.reconstruct`'s ``held_out``): the guard's probes start
    from them instead of refitting on each fit half.

    Attributes:
        calib: the calibration set the parts are of.
        seed: the folds' seed.
        models: per fold, the pruned model refitted on its fit part.
    """

    calib: object
    seed: int
    models: list

    def serve(self, calib, seed: int) -> list | None:
        """The models, when the guard holds out the same parts of the same set; else None."""
        return self.models if calib is self.calib and seed == self.seed else None


def refit_subset(calib, samples: int, seed: int):
    """The refit's ``samples`` of ``calib`` (all of it for 0 or at least its size): drawn evenly from the parts the
    guard holds out, so that each fold's refit has its share (a plain seeded draw would take its first part's)."""
    if not 0 < samples < len(calib):
        return calib
    if hasattr(calib, "take_across_folds") and len(calib) >= 2 * FOLDS:
        return calib.take_across_folds(samples, FOLDS, seed)
    return calib.take(samples, seed)


def held_out_parts(calib, fit, recipe: Recipe, specs) -> list | None:
    """The refit set ``fit`` (``calib``, or a subset of it) cut along the parts the guard will hold out of
    ``calib``, when the refit can fit the guard's models in its own passes (the guard on, one pass per level,
    any batch size, enough samples in every part), else None."""
    from asr_onnx.calib.specs import fixed_batch

    if (recipe.guard == "off" or recipe.refit_passes or not hasattr(calib, "folds") or fixed_batch(specs)
            or len(calib) < 2 * FOLDS):
        return None
    held = [part for _, part in calib.folds(FOLDS, recipe.seed)]
    parts = held if fit is calib else [fit.within(part) for part in held] if hasattr(fit, "within") else None
    return parts if parts and all(len(part) for part in parts) else None


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard found: the report's ``settings["guard"]`` entry, and the model to ship: "repair", "refit"
    (the refit alone, without the correction) or "pruned"."""

    entry: dict
    keep: str = "repair"


def guard_repair(job, calib, recipe: Recipe, mode: str = "fallback", *, seed: int = 0) -> GuardVerdict:
    """Scores ``job``'s repair against pruning alone on held-out calibration samples; changes nothing.

    The repair refitted on each fit half is the one ``job`` ran (for ``auto``, the candidate it picked on
    the whole set), least-squares refit included: a probe of a refitted job starts from the model as pruned
    and is refitted on the fit half, since a refit on the whole set has seen the held-out half. Pruning alone
    is ``job.pruned_alone``, never refitted. With ``fallback``, the verdict asks for that model when pruning
    alone is better, or in a tie where the repair's held-out error is the higher (the held-out evidence is for
    the whole model, not for each site, so the choice is made as a whole); the driver applies it.

    Args:
        job: a Repair after ``run`` (its output folded).
        recipe: the repair that ran, ``auto``'s picks resolved (:attr:`Repair.recipe`).
        calib: the calibration set the repair used (needs ``folds``).
        mode: "fallback", "warn" or "off". Defaults to "fallback".
        seed: the folds' seed. Defaults to 0.

    Returns:
        a GuardVerdict.

    Raises:
        AsrError: an unknown mode, no finished repair, or a calibration set that cannot be cut into folds.
    """
    from asr_onnx.calib.specs import fixed_batch
    from asr_onnx.pipeline.crossfit import held_out_scores

    if mode not in GUARD_MODES:
        raise AsrError(f"unknown guard mode {mode!r}; choose one of {', '.join(GUARD_MODES)}")
    if mode != "off" and (recipe is None or job.output is None or not hasattr(calib, "folds")):
        raise AsrError("the guard needs a repair finished by run() and a calibration set that can be cut into folds")
    if mode == "off":
        return GuardVerdict({"mode": mode, "held_out": 0, "kept": "repair"})
    fixed = fixed_batch(job.specs) or 1
    skipped = (f"{len(calib)} calibration samples are too few to hold any out" if len(calib) < 2 * FOLDS * fixed
               else f"held-out parts of a model with a fixed batch of {fixed} are not supported" if fixed > 1 else None)
    if skipped:
        return GuardVerdict({"mode": mode, "held_out": 0, "kept": "repair", "skipped": skipped})
    correction, reconstruct = recipe.correction(), recipe.refit()
    refitted = None if reconstruct is None or job.held_out_refits is None else job.held_out_refits.serve(calib, seed)
    if reconstruct is not None:
        reconstruct["seed"] = seed
    start = time.perf_counter()
    measure = {"sequential": recipe.sequential, "reference": recipe.reference, "layernorm": recipe.layernorm}
    variants = [lambda probe: probe.correct(**correction).fold().output, lambda probe: job.pruned_alone]
    if reconstruct is not None and not refitted:  # the fold's refit before its correction (the probe's pruned)
        variants.append(refit_alone)
    shared: list = [{} for _ in range(FOLDS)]  # the dense model's held-out outputs, run once for both calls
    found = held_out_scores(job, calib, variants, folds=FOLDS, seed=seed, batch_size=job.batch_size,
                            measure=measure, reconstruct=None if refitted else reconstruct, refitted=refitted,
                            shared=shared)
    verdict, loses = judge(found[:2])
    if reconstruct is not None and refitted and loses:
        # a rescue, paid only when the repair lost: the refit alone, refitted on each half from the start (the
        # fold models of the refit's passes see the full refit's activations upstream, which a correction absorbs
        # and the refit alone does not: cls at 0.8 scored 1.12 so, 0.60 refitted per half)
        found += held_out_scores(job, calib, [refit_alone], folds=FOLDS, seed=seed, batch_size=job.batch_size,
                                 measure=None, reconstruct=reconstruct, shared=shared)
    best, refit_entry = "pruned" if loses else "repair", {}
    if len(found) == 3:
        correction_loses, refit_loses = judge([found[0], found[2]])[1], judge([found[2], found[1]])[1]
        if (loses or correction_loses) and not refit_loses:
            best = "refit"
        refit_entry = {"refit": found[2].entry(), "correction_loses": bool(correction_loses)}
    kept = best if mode == "fallback" else "repair"
    entry = {"mode": mode, "held_out": len(calib), "folds": FOLDS, "metric": found[0].primary()[0],
             "agreement_classes": found[0].classes, "repair": found[0].entry(), "pruned": found[1].entry(),
             **refit_entry, "repair_refitted": reconstruct is not None, "refit_in_repair_passes": refitted is not None,
             "verdict": verdict, "repair_loses": bool(loses), "best": best, "kept": kept,
             "cost_s": round(time.perf_counter() - start, 4),
             "rule": f"held out by {FOLDS}-fold cross-fitting; top-1 agreement first (a detector: detection F1; "
                     f"where neither means something, none), then each sample's squared error over all outputs "
                     f"(a detector and the rest: standardised per channel); a difference counts past {Z:g} paired "
                     f"standard errors; within noise the repair is kept only when its held-out error is lower; a "
                     f"detector's repair never with a lower held-out detection F1; with a refit, the correction "
                     f"bears the same burden against the refit alone"}
    return GuardVerdict(entry, kept)


def refit_alone(probe):
    """A guard probe's model refitted on its fit part, before any correction (its ``pruned``)."""
    return probe.pruned


def judge(found: list) -> tuple[str, bool]:
    """The guard's verdict on the held-out scores of the repair (first) and of pruning alone (second).

    Args:
        found: per model, its :class:`asr_onnx.verify.scoring.Scores` on every held-out sample (as
            :func:`asr_onnx.pipeline.crossfit.cross_fit` returns them).

    Returns:
        (the verdict, whether the repair loses: worse past noise, or within noise with the higher error, or, a
        detector, with the lower pooled detection F1).
    """
    (metric, repair_each, repair_total), (_, pruned_each, pruned_total) = (f.primary() for f in found)
    # a classifier's ties are broken by its logit error, anything else's by the standardised error
    errors = [f.err2 for f in found] if metric == "agreement" else [f.std_err2 for f in found]
    primary_gain = repair_each - pruned_each if metric != "standardised_error" else np.zeros(1)
    verdict = _verdict(primary_gain, errors[1] - errors[0])
    detector_loses = metric == "detection_f1" and repair_total < pruned_total
    if verdict == "repair better" and detector_loses:
        verdict = "tie"  # better image by image, worse pooled per class: nothing is established
    # within noise the point estimate decides, and only the error: per sample it is a real number, while top-1
    # is a coin per sample (on 64 samples of a 2-class model a few flips move it by 5 points)
    loses = verdict == "pruning alone better" or (verdict == "tie" and errors[0].sum() > errors[1].sum())
    # a detector's F1 is pooled per class: never keep a repair that finds fewer of the dense model's detections
    return verdict, loses or detector_loses


def _verdict(top1_gain, err2_gain) -> str:
    """Agreement first, then squared error: each per-sample gain of the repair over pruning alone counts
    only past ``Z`` paired standard errors (a fallback discards the repair, so noise must not trigger it)."""
    return {1: "repair better", -1: "pruning alone better", 0: "tie"}[paired_sign(top1_gain, err2_gain)]


def warning_line(entry: dict) -> str | None:
    """One line when the repair did not beat pruning alone on held-out samples (worse past noise, or within noise
    with the higher error), or when the guard could not run; else None."""
    if entry.get("skipped"):
        return f"warning: the guard did not run: {entry['skipped']}"
    if entry.get("best", "pruned" if entry.get("repair_loses") else "repair") == "refit":
        r, f = entry["repair"], entry["refit"]
        then = ("kept the refit without it (--guard fallback)" if entry["kept"] == "refit"
                else "kept the corrected repair (--guard warn)")
        return (f"warning: on {entry['held_out']} held-out calibration samples the correction made the refitted model "
                f"worse (the repair against the refit alone: {_figures(entry, r, f)}); {then}")
    if not entry.get("repair_loses"):
        return None
    r, p = entry["repair"], entry["pruned"]
    then = "kept the pruned model (--guard fallback)" if entry["kept"] == "pruned" else "kept the repair (--guard warn)"
    how = "worse than" if entry["verdict"] == "pruning alone better" else "no better than"
    noise = "" if entry["verdict"] == "pruning alone better" else ", within noise"
    return (f"warning: on {entry['held_out']} held-out calibration samples the repair is {how} pruning alone "
            f"({_figures(entry, r, p)}{noise}); {then}")


def _figures(entry: dict, r: dict, p: dict) -> str:
    """Two held-out scores as the guard weighed them: the error and agreement, or a detector's F1 and errors."""
    agree = "" if r["agreement"] is None else \
        f", agreement {100 * r['agreement']:.1f}% against {100 * p['agreement']:.1f}%"
    if entry.get("metric", "agreement") == "agreement":
        return f"relative error {r['logit_rel_l2']:.4g} against {p['logit_rel_l2']:.4g}{agree}"
    found = "" if r.get("detection_f1") is None else \
        f"detection F1 {r['detection_f1']:.3f} against {p['detection_f1']:.3f}, "
    return f"{found}standardised error {r['standardised_error']:.4g} against {p['standardised_error']:.4g}"
