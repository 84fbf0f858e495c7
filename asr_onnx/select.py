"""Selection on held-out calibration data: ``auto``'s candidates, cross-fitting, and :func:`pick`.

``auto`` (which candidate?) and the guard (:mod:`asr_onnx.guard`: repair or pruning alone?) ask the same
question of different variants, so both score their variants by :func:`held_out_scores`: each variant
is fitted on some calibration folds and scored against the dense model on the fold it did not see.
"""

from __future__ import annotations

import numpy as np

from .recal import DEFAULT_REFERENCE

# every method in both placements (bn/naive coincide under recal; pre-bn bn is plain BN recalibration)
AUTO_CANDIDATES = (("bn", "recal", "median"), ("lw", "recal", "median"), ("asr", "recal", "median"),
                   ("asr", "recal", "mean"), ("bn", "pre-bn", "median"), ("naive", "pre-bn", "median"),
                   ("lw", "pre-bn", "median"), ("asr", "pre-bn", "median"))
PICK_RULE = ("lowest held-out logit error among the candidates whose top-1 agreement with the dense model trails "
             "the best by at most one paired standard error; the first candidate when it ties on both")


def choose(job, calib, candidates=AUTO_CANDIDATES, *, folds: int = 4, seed: int = 0, recal: str = "exact",
           momentum: float = 0.1, correct_head: bool = True, reference: str = DEFAULT_REFERENCE) -> tuple[dict, list[dict]]:
    """Scores every candidate of ``auto`` on held-out calibration data and picks one (see :func:`pick`).

    Args:
        job: the measured or unmeasured Repair, after prune; its probes are :meth:`Repair.fork` s of it.
        calib: a calib.CalibSet (needs ``folds``).
        candidates: (method, placement, lambda_rule) triples. Defaults to AUTO_CANDIDATES.
        folds, seed: the parts and their seed. Defaults to 4 and 0.
        recal, momentum, correct_head: as for :meth:`Repair.correct`. Defaults to "exact", 0.1 and True.
        reference: as for :meth:`Repair.measure`. Defaults to DEFAULT_REFERENCE.

    Returns:
        (the picked score, every candidate's score): each score names its method, placement and
        lambda_rule, with its held-out agreement (None where top-1 means nothing) and logit_rel_l2.
    """
    from .evaluation import logit_rel_l2

    def candidate(method, placement, rule):
        return lambda probe: probe.correct(method, placement=placement, recal=recal, momentum=momentum,
                                           lambda_rule=rule, correct_head=correct_head).fold().output

    matches, err2, ref2 = held_out_scores(job, calib, [candidate(*c) for c in candidates], folds=folds,
                                          seed=seed, measure={"reference": reference})
    no_top1 = matches[0] is None
    # no agreement where it means nothing (a detector): every candidate ties on it
    matches = [np.zeros(len(e)) for e in err2] if no_top1 else matches
    scores = [{"method": method, "placement": placement, "lambda_rule": rule,
               "agreement": None if no_top1 else float(m.mean()),
               "logit_rel_l2": logit_rel_l2(e, ref2)}
              for (method, placement, rule), m, e in zip(candidates, matches, err2)]
    return pick(scores, matches, err2), scores


def pick(scores: list[dict], matches: list, errors: list | None = None, default: int = 0) -> dict:
    """The best candidate: top-1 agreement first, where a candidate that trails the best by at most one
    standard error of the paired difference (same held-out samples) ties; the lower logit error breaks ties.
    When the default candidate ties on agreement and its logit error too is within one paired standard
    error of the winner's, the held-out data cannot tell them apart, and the default is kept.

    Args:
        scores: per candidate, a dict with "logit_rel_l2"; each gets "tied" (bool) set here.
        matches: per candidate, a bool array over the held-out samples: agrees with the dense model.
        errors: per candidate, the squared logit error of each held-out sample. Defaults to None (no
            fallback to the default).
        default: the index of the default candidate. Defaults to 0.
    """
    best = max(range(len(matches)), key=lambda i: matches[i].mean())
    for score, agrees in zip(scores, matches):
        score["tied"] = _within_one_se(matches[best].astype(np.float64) - agrees)
    winner = min((i for i, s in enumerate(scores) if s["tied"]), key=lambda i: scores[i]["logit_rel_l2"])
    if errors is not None and scores[default]["tied"] and _within_one_se(errors[default] - errors[winner]):
        return scores[default]
    return scores[winner]


def _within_one_se(diff: np.ndarray) -> bool:
    """Does a candidate trail by at most one standard error? ``diff``: how much worse it is, sample by sample."""
    return bool(diff.mean() <= diff.std() / np.sqrt(max(len(diff), 1)))


def held_out_scores(job, calib, variants, *, folds: int, seed: int, measure: dict, batch_size: int | None = None):
    """Scores every variant on every calibration sample, each time with a probe fitted on the other folds.

    Args:
        job: the Repair whose dense and pruned models the probes share.
        calib: the calibration set (needs ``folds``).
        variants: functions ``probe -> onnx.ModelProto``; a probe is a measured Repair on the fit folds (a
            :meth:`Repair.fork` of ``job``).
        folds: how many parts; each sample is held out once.
        seed: the parts' seed, and the probes' batch order.
        measure: keyword arguments of the probes' :meth:`Repair.measure`.
        batch_size: samples per evaluation run. Defaults to None (evaluate's own default).

    Returns:
        (matches, err2, ref2): per variant, each held-out sample's top-1 match with dense (None for every
        variant where top-1 means nothing, such as a detector's output) and its squared error; and the
        dense outputs' squared norm, the same for every variant.
    """
    from .evaluation import evaluate

    sizing = {} if batch_size is None else {"batch_size": batch_size}
    matches, err2, ref2 = [[] for _ in variants], [[] for _ in variants], 0.0
    for fit, held in calib.folds(folds, seed):
        probe = job.fork(batch_size=min(job.requested_batch, len(fit)), progress=False)
        probe.measure(fit, seed=seed, **measure)
        dense_outputs: list = []  # filled by the first evaluation, reused by the others
        for i, variant in enumerate(variants):
            result = evaluate(variant(probe), held, reference=job.dense, device=job.device, progress=False,
                              reference_logits=dense_outputs, per_sample=True, **sizing)
            matches[i].append(result["matches"])
            err2[i].append(result["err2"])
        ref2 += result["ref2"]
    has_top1 = all(m is not None for per_fold in matches for m in per_fold)
    return ([np.concatenate(m) for m in matches] if has_top1 else [None] * len(variants),
            [np.concatenate(e) for e in err2], ref2)
