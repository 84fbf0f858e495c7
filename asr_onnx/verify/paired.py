"""Choices between candidates scored on the same held-out samples: the paired rules that ``auto``, the guard
and the INT8 stage share.

:func:`pick` is ``auto``'s (a candidate ties when it trails the best by at most one paired standard error);
:func:`paired_sign` is the guard's (a difference counts only past ``Z`` paired standard errors). Both read
agreement first, then each sample's squared error; both are pure numpy.
"""

from __future__ import annotations

import numpy as np

Z = 2.0  # paired standard errors a difference must exceed to count


def pick(scores: list[dict], matches: list, errors: list | None = None, default: int = 0, *,
         totals: list | None = None, error_key: str = "logit_rel_l2") -> dict:
    """The best candidate: top-1 agreement first, where a candidate that trails the best by at most one
    standard error of the paired difference (same held-out samples) ties; the lower logit error breaks ties.
    When the default candidate ties on agreement and its logit error too is within one paired standard
    error of the winner's, the held-out data cannot tell them apart, and the default is kept.

    Args:
        scores: per candidate, a dict with ``error_key``; each gets "tied" (bool) set here.
        matches: per candidate, per held-out sample, how well it agrees with the dense model (top-1: 0/1; a
            detector: the image's detection F1).
        errors: per candidate, the squared error of each held-out sample. Defaults to None (no
            fallback to the default).
        default: the index of the default candidate. Defaults to 0.
        totals: per candidate, the pooled score that names the best (a detector's F1 is pooled per class, not
            averaged over images). Defaults to None: the mean of ``matches``.
        error_key: the scores' key of the error that breaks ties. Defaults to "logit_rel_l2".
    """
    totals = [float(np.mean(m)) for m in matches] if totals is None else totals
    best = max(range(len(matches)), key=lambda i: totals[i])
    for score, agrees in zip(scores, matches):
        score["tied"] = _within_one_se(np.asarray(matches[best], np.float64) - agrees)
    winner = min((i for i, s in enumerate(scores) if s["tied"]), key=lambda i: scores[i][error_key])
    if errors is not None and scores[default]["tied"] and _within_one_se(errors[default] - errors[winner]):
        return scores[default]
    return scores[winner]


def _within_one_se(diff: np.ndarray) -> bool:
    """Does a candidate trail by at most one standard error? ``diff``: how much worse it is, sample by sample."""
    return bool(diff.mean() <= diff.std() / np.sqrt(max(len(diff), 1)))


def paired_sign(top1_gain, err2_gain) -> int:
    """Agreement first, then squared error: 1 when a candidate's per-sample gain over its baseline is positive
    past ``Z`` paired standard errors, -1 when negative past them, 0 within noise (a tie)."""
    for gain in (top1_gain, err2_gain):
        se = gain.std() / np.sqrt(max(len(gain), 1))
        if gain.mean() > Z * se and gain.mean() > 0:
            return 1
        if gain.mean() < -Z * se and gain.mean() < 0:
            return -1
    return 0
