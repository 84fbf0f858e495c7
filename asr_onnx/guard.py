"""The guard: is the repair better than pruning alone, on calibration samples it did not see?

Cross-fitted like ``auto``: the calibration set is cut into two halves; each half is held out in turn
while the same repair is fitted on the other half. Every sample is then scored once for the repaired
and once for the pruning-only model against the dense one, on the score that matters for the model
(:meth:`asr_onnx.evaluation.Scores.primary`): a classifier's top-1 agreement, then the relative L2 error of
all outputs; a detector's detection F1 (each image's, paired), then the standardised error; anything else's
standardised error. Pruning alone is the baseline the tool promises never to lose to, so the burden of proof
is on the repair: it is kept when it is better past two paired standard errors, or, within noise, when its
held-out error is lower; and a detector's repair is never kept with a lower held-out detection F1 (pooled
per class) than pruning alone's, whatever its errors. A fit on half the set is a little weaker than the
final fit on all of it, so the guard leans towards pruning alone, never towards the repair.
"""

from __future__ import annotations

import time

import numpy as np

from .errors import AsrError

GUARD_MODES = ("fallback", "warn", "off")
FOLDS = 2
Z = 2.0  # paired standard errors a difference must exceed to count


def guard_repair(job, calib, mode: str = "fallback", *, seed: int = 0) -> dict:
    """Scores ``job``'s repair against pruning alone on held-out calibration samples.

    The repair refitted on each fit half is the one ``job`` ran (for ``auto``, the candidate it picked on
    the whole set), least-squares refit included: a probe of a refitted job starts from the model as pruned
    and is refitted on the fit half, since a refit on the whole set has seen the held-out half. Pruning alone
    is ``job.pruned_alone``, never refitted. With ``fallback``, ``job.output`` becomes that model when the
    verdict is "pruning alone better", or a tie where the repair's held-out error is the higher (the held-out
    evidence is for the whole model, not for each site, so the choice is made as a whole).

    Args:
        job: a Repair after ``run`` (its output folded); its settings name the method and options.
        calib: the calibration set the repair used (needs ``folds``).
        mode: "fallback", "warn" or "off". Defaults to "fallback".
        seed: the folds' seed. Defaults to 0.

    Returns:
        the report's ``settings["guard"]`` entry (also stored there).

    Raises:
        AsrError: an unknown mode.
    """
    from .calib.specs import fixed_batch
    from .recal import DEFAULT_REFERENCE
    from .select import held_out_scores, score_entry

    if mode not in GUARD_MODES:
        raise AsrError(f"unknown guard mode {mode!r}; choose one of {', '.join(GUARD_MODES)}")
    fixed = fixed_batch(job.specs) or 1
    skipped = (f"{len(calib)} calibration samples are too few to hold any out" if len(calib) < 2 * FOLDS * fixed
               else f"held-out parts of a model with a fixed batch of {fixed} are not supported" if fixed > 1 else None)
    if mode == "off" or skipped:
        entry = {"mode": mode, "held_out": 0, "kept": "repair"}
        if mode != "off":
            entry["skipped"] = skipped
        job.settings["guard"] = entry
        return entry
    s = job.settings
    method = s["auto"]["picked"]["method"] if s.get("method") == "auto" else s["method"]
    options = {key: s[key] for key in ("placement", "recal", "momentum", "lambda_rule", "correct_head")}
    refit = s["reconstruct_auto"]["picked"]["reconstruct"] if s.get("reconstruct") == "auto" else s.get("reconstruct")
    reconstruct = {"method": "ls", "max_gram_mb": s["max_gram_mb"], "passes": s["refit_passes"],
                   "samples": s.get("refit_samples", 0), "seed": seed} if refit == "ls" else None
    start = time.perf_counter()
    variants = [lambda probe: probe.correct(method, **options).fold().output, lambda probe: job.pruned_alone]
    found = held_out_scores(job, calib, variants, folds=FOLDS, seed=seed, batch_size=job.batch_size,
                            measure={"sequential": s.get("sequential", False),
                                     "reference": s.get("reference", DEFAULT_REFERENCE)},
                            reconstruct=reconstruct)
    scores = [score_entry(f) for f in found]
    (metric, repair_each, repair_total), (_, pruned_each, pruned_total) = (f.primary() for f in found)
    # a classifier's ties are broken by its logit error, anything else's by the standardised error
    errors = [f.err2 for f in found] if metric == "agreement" else [f.std_err2 for f in found]
    primary_gain = repair_each - pruned_each if metric != "standardised_error" else np.zeros(1)
    verdict = _verdict(primary_gain, errors[1] - errors[0])
    if metric == "detection_f1" and verdict == "repair better" and repair_total < pruned_total:
        verdict = "tie"  # better image by image, worse pooled per class: nothing is established
    # within noise the point estimate decides, and only the error: per sample it is a real number, while top-1
    # is a coin per sample (on 64 samples of a 2-class model a few flips move it by 5 points)
    loses = verdict == "pruning alone better" or (verdict == "tie" and errors[0].sum() > errors[1].sum())
    # a detector's F1 is pooled per class: never keep a repair that finds fewer of the dense model's detections
    loses = loses or (metric == "detection_f1" and repair_total < pruned_total)
    kept = "pruned" if mode == "fallback" and loses else "repair"
    if kept == "pruned":
        job.output, job.written = job.pruned_alone, {}
    entry = {"mode": mode, "held_out": len(calib), "folds": FOLDS, "metric": metric,
             "agreement_classes": found[0].classes, "repair": scores[0],
             "pruned": scores[1], "repair_refitted": reconstruct is not None,
             "verdict": verdict, "repair_loses": bool(loses), "kept": kept, "cost_s": round(time.perf_counter() - start, 4),
             "rule": f"held out by {FOLDS}-fold cross-fitting; top-1 agreement first (a detector: detection F1; "
                     f"where neither means something, none), then each sample's squared error over all outputs "
                     f"(a detector and the rest: standardised per channel); a difference counts past {Z:g} paired "
                     f"standard errors; within noise the repair is kept only when its held-out error is lower; a "
                     f"detector's repair never with a lower held-out detection F1"}
    job.settings["guard"] = entry
    job.timings["guard"] = job.timings.get("guard", 0.0) + entry["cost_s"]
    return entry


def _verdict(top1_gain, err2_gain) -> str:
    """Agreement first, then squared error: each per-sample gain of the repair over pruning alone counts
    only past ``Z`` paired standard errors (a fallback discards the repair, so noise must not trigger it)."""
    for gain in (top1_gain, err2_gain):
        se = gain.std() / np.sqrt(max(len(gain), 1))
        if gain.mean() > Z * se and gain.mean() > 0:
            return "repair better"
        if gain.mean() < -Z * se and gain.mean() < 0:
            return "pruning alone better"
    return "tie"


def warning_line(entry: dict) -> str | None:
    """One line when the repair did not beat pruning alone on held-out samples (worse past noise, or within noise
    with the higher error), or when the guard could not run; else None."""
    if entry.get("skipped"):
        return f"warning: the guard did not run: {entry['skipped']}"
    if not entry.get("repair_loses"):
        return None
    r, p = entry["repair"], entry["pruned"]
    then = "kept the pruned model (--guard fallback)" if entry["kept"] == "pruned" else "kept the repair (--guard warn)"
    agree = "" if r["agreement"] is None else \
        f", agreement {100 * r['agreement']:.1f}% against {100 * p['agreement']:.1f}%"
    metric = entry.get("metric", "agreement")
    how = "worse than" if entry["verdict"] == "pruning alone better" else "no better than"
    noise = "" if entry["verdict"] == "pruning alone better" else ", within noise"
    if metric == "agreement":
        figures = f"relative error {r['logit_rel_l2']:.4g} against {p['logit_rel_l2']:.4g}{agree}"
    else:
        found = "" if r.get("detection_f1") is None else \
            f"detection F1 {r['detection_f1']:.3f} against {p['detection_f1']:.3f}, "
        figures = f"{found}standardised error {r['standardised_error']:.4g} against {p['standardised_error']:.4g}"
    return (f"warning: on {entry['held_out']} held-out calibration samples the repair is {how} pruning alone "
            f"({figures}{noise}); {then}")
