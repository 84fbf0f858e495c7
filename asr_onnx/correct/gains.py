"""Per-channel variance gains of each repair method: pure numpy, no ONNX.

Every method is the variance part of a recalibration. For one channel with reference variance
``ref_var`` (what the original normalisation expects: the dense model's variance on the
calibration data, or a BN's running variance under ``reference="running"``) and recalibrated pruned variance ``rec_var``, the full restoration is
``sqrt((ref_var + eps) / (rec_var + eps))``. The epsilon (the BN's own, or a floor taken from the
data) keeps every division away from zero; :func:`asr_onnx.measure.norms.floor_eps` floors it, since a BN's own may be 0.
"""

from __future__ import annotations

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import TINY, floor_eps

METHODS = ("none", "bn", "lw", "naive", "asr")
def full_gain(ref_var, rec_var, eps: float) -> np.ndarray:
    """The gain that restores each channel's variance exactly (exact REFLOW), ``eps`` floored (:func:`floor_eps`)."""
    eps = floor_eps(ref_var, eps)
    return np.sqrt((ref_var + eps) / (rec_var + eps))


def layer_gain(ref_var, rec_var, eps: float) -> np.ndarray:
    """One gain for the whole layer, sqrt(sum ref / sum rec), broadcast to every channel."""
    eps = floor_eps(ref_var, eps)
    gain = np.sqrt(np.sum(ref_var + eps) / np.sum(rec_var + eps))
    return np.full(np.shape(ref_var), gain)


def shrink_lambda(rule, rec_var, eps: float) -> float:
    """ASR's per-layer constant: ``median`` or ``mean`` of the layer's pruned variances, or a float.

    Floored at ``eps`` (and float32's smallest normal number, for an epsilon-0 BN) so that the shrinkage
    is defined when most channels have collapsed.
    """
    if rule == "median":
        lam = float(np.median(rec_var))
    elif rule == "mean":
        lam = float(np.mean(rec_var))
    else:
        try:
            lam = float(rule)
        except (TypeError, ValueError):
            raise AsrError(f"unknown lambda rule {rule!r}; use median, mean or a number") from None
        if not lam >= 0:
            raise AsrError(f"lambda must be >= 0, got {rule}")
    return max(lam, float(eps), TINY)


def shrinkage(rec_var, lam: float) -> np.ndarray:
    """s = v_p / (v_p + lambda): near 0 for collapsed channels, near 1 for healthy ones (lambda floored)."""
    return rec_var / (rec_var + max(lam, TINY))


def asr_gain(ref_var, rec_var, eps: float, lam: float) -> np.ndarray:
    """ASR: gamma = s * gamma_full + (1 - s), which keeps collapsed channels near identity."""
    shrink = shrinkage(rec_var, lam)
    return shrink * full_gain(ref_var, rec_var, eps) + (1 - shrink)


def gain(method: str, ref_var, rec_var, eps: float, lam: float | None = None) -> np.ndarray:
    """The per-channel gain of ``method`` (``none`` gives ones).

    Raises:
        AsrError: unknown method.
    """
    ref_var, rec_var = np.asarray(ref_var, np.float64), np.asarray(rec_var, np.float64)
    if method in ("bn", "naive"):
        return full_gain(ref_var, rec_var, eps)
    if method == "lw":
        return layer_gain(ref_var, rec_var, eps)
    if method == "asr":
        if lam is None:
            raise AsrError("asr needs its lambda (see shrink_lambda)")
        return asr_gain(ref_var, rec_var, eps, lam)
    if method == "none":
        return np.ones_like(ref_var)
    raise AsrError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
