"""A site's reference normalisation: the BN (real or virtual) whose statistics a correction restores,
the floors under every variance divided by, and the epsilon of a virtual BN."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import ChannelStats

REFERENCES = ("calib", "running")
DEFAULT_REFERENCE = "calib"  # chosen on held-out training images and shifted data: benchmarks/RESULTS.md
ABS_VAR_FLOOR = 1e-30  # under every variance a BN with epsilon 0 divides by, in absolute terms
VIRTUAL_EPS = 1e-6  # a virtual BN's epsilon, relative to the layer's mean dense variance

REL_VAR_FLOOR = 1e-12  # the smallest epsilon any division uses, relative to the layer's mean reference variance
TINY = float(np.finfo(np.float32).tiny)  # and in absolute terms: float32's smallest normal number


def floor_eps(ref_var, eps: float) -> float:
    """The epsilon that every variance is divided with: ``eps``, floored at ``REL_VAR_FLOOR`` (1e-12) times the
    layer's mean reference variance and at float32's smallest normal number.

    ONNX allows a BatchNormalization with epsilon 0; a channel that pruning collapsed then has variance 0,
    and the floor keeps its gain finite. A BN's usual epsilon (1e-5) lies above the floor, which then
    changes nothing.
    """
    return max(float(eps), REL_VAR_FLOOR * float(np.mean(ref_var)), TINY)


@dataclass
class Norm:
    """The original normalisation of a site: y = scale * (x - mean) / sqrt(var + eps) + bias."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


def check_reference(kind: str) -> str:
    """Refuses a reference that is not one of REFERENCES; returns it."""
    if kind not in REFERENCES:
        raise AsrError(f"unknown reference {kind!r}; use {' or '.join(REFERENCES)}")
    return kind


def reference(site, dense: ChannelStats | None, kind: str = "calib") -> Norm:
    """A site's original normalisation, written with the statistics its correction restores.

    Args:
        site: the graph.Site.
        dense: the dense model's statistics at the site on the calibration data (None for a BN site
            under ``kind="running"``).
        kind: "calib": a BN is rewritten in terms of the dense calibration statistics (see
            :func:`calibrated`); "running": its own running statistics (REFLOW's target). A layer
            without BN always gets the virtual BN that the dense statistics define. Defaults to "calib".
    """
    check_reference(kind)
    if site.bn is not None:
        scale, bias, mean, var = (np.asarray(t.values, np.float64) for t in site.bn.inputs[1:5])
        own = Norm(scale, bias, mean, var, site.eps)
        if kind == "running":
            return own
    if dense is None:
        raise AsrError(f"{site.key}: its reference needs the dense model's statistics on the calibration data")
    if site.bn is not None:
        return calibrated(own, dense)
    eps = VIRTUAL_EPS * float(np.mean(dense.var)) + 1e-30
    return Norm(np.sqrt(dense.var + eps), dense.mean.copy(), dense.mean.copy(), dense.var.copy(), eps)


def magnitude(ref: Norm) -> float:
    """The size of a site's activations that its reference implies: the largest |mean| + std of a channel."""
    return float(np.max(np.abs(ref.mean) + np.sqrt(np.maximum(ref.var, 0.0)), initial=0.0))


def calibrated(bn: Norm, dense: ChannelStats) -> Norm:
    """The same BN, y = s (x - m) / sqrt(v + eps) + b, written with the dense model's calibration mean
    and variance (dm, dv) in place of its running ones: scale s sqrt(dv + eps) / sqrt(v + eps) and
    bias b + s (dm - m) / sqrt(v + eps) give the same function, so it is the identity on the dense
    model, and a recalibration then maps the pruned statistics onto the dense ones."""
    std = np.sqrt(np.maximum(bn.var + bn.eps, ABS_VAR_FLOOR))
    dense_std = np.sqrt(np.maximum(dense.var + bn.eps, ABS_VAR_FLOOR))
    return Norm(bn.scale * dense_std / std, bn.bias + bn.scale * (dense.mean - bn.mean) / std, dense.mean.copy(),
                dense.var.copy(), bn.eps)


def train_norm(ref: Norm) -> Norm:
    """The reference with its eps floored, for renormalising a site with batch statistics during measurement."""
    return replace(ref, eps=floor_eps(ref.var, ref.eps))
