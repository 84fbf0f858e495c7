"""Numpy oracles that more than one test module computes graphs with."""

import numpy as np


def conv3x3(x, w):
    """Cross-correlation with 1-pixel zero padding, in float64."""
    n, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], height, width))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i:i + height, j:j + width], w[:, :, i, j])
    return out
