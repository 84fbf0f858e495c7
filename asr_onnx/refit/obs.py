"""OBS masks: which weights to drop, chosen from the refit's own Gram sums rather than by magnitude.

The refit minimises, per output row, the quadratic f(w) = wᵀHw − 2bᵀw with H the damped XᵀX and b its
right-hand side (:mod:`asr_onnx.refit.reconstruct`). With w* = H⁻¹b its unconstrained optimum,
f(w) − f(w*) = (w − w*)ᵀH(w − w*), so Optimal Brain Surgeon is exact for it: forcing weight j to zero and
refitting every other one costs w*_j² / [H⁻¹]_jj.

Choosing many weights at once follows SparseGPT (Frantar & Alistarh, 2023): the columns are taken in order
with the upper Cholesky factor U of H⁻¹; each column's dropped weights are zeroed and their error is carried to
the columns not taken yet (``w[j:] −= (w_j / U_jj) · U[j, j:]``, the exact refit of those with the columns
taken before held), and which weights drop is decided a block of columns at a time by that refit's error,
w_j² / U_jj², on the weights updated so far (U_jj² is [H⁻¹]_jj of the columns not taken yet). Only the
mask is kept: the refit then solves exactly on it. The count of dropped weights (per group of a Conv) is the
one the pruning allocated, each block of :data:`BLOCK` columns taking its share, or, for N:M, ``m − n`` in each
run of ``m`` along the input-channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 8  # columns whose count is set together (SparseGPT: 128; 8 and 16 did best on held-out images, RESULTS)
LAZY = 128  # columns whose errors reach the columns after them in one product (SparseGPT's lazy batch)


def upper_factor(inverse: np.ndarray) -> np.ndarray:
    """U, upper triangular, with H⁻¹ = UᵀU."""
    return np.linalg.cholesky(inverse).T


def nm_columns(length: int, kernel: int) -> np.ndarray:
    """The order of a row's columns (input channel-major, kernel offset minor: see
    :func:`asr_onnx.refit.gram.weight_rows`) in which each N:M run of input channels at one kernel offset is
    consecutive."""
    return np.arange(length).reshape(length // kernel, kernel).T.ravel()


def obs_prune(optimum: np.ndarray, inverse: np.ndarray, drop: int = 0, nm: tuple[int, int] | None = None,
              order: np.ndarray | None = None, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The keep-mask of rows that share one H, chosen by SparseGPT's blocked OBS, and SparseGPT's weights.

    Args:
        optimum: (rows, d) each row's unconstrained optimum w* = H⁻¹b.
        inverse: (d, d) H⁻¹ (of the damped Gram).
        drop: how many weights to zero in all (unstructured); ignored with ``nm``. Defaults to 0.
        nm: (n, m): keep n of each run of m consecutive columns of ``order``. Defaults to None.
        order: the order the columns are taken in (a permutation of range(d)). Defaults to range(d).
        block: columns whose unstructured mask is chosen together. Defaults to BLOCK.

    Returns:
        (keep, weights): (rows, d) bool, True where a weight is kept (exactly ``drop`` False in all, or exactly
        n True per run); the weights after SparseGPT's updates, zero where dropped (the refit solves again).
    """
    rows, d = optimum.shape
    order = np.arange(d) if order is None else np.asarray(order)
    w = optimum[:, order].astype(np.float64, copy=True)
    factor = upper_factor(inverse[np.ix_(order, order)])
    diag = np.diag(factor)
    dropped = np.zeros((rows, d), dtype=bool)
    # unstructured: the mask blocks share the count in proportion to their columns, so that the total is exact
    bounds = [round(drop * min(start, d) / d) for start in range(0, d + block, block)]
    unit = block if nm is None else nm[1]  # a mask block or an N:M run never straddles two spans
    span = unit * max(1, LAZY // unit)  # columns updated together; the columns after them once per span
    for i1 in range(0, d, span):
        i2 = min(i1 + span, d)
        part = w[:, i1:i2]  # a view: the updates below land in w
        carried = np.zeros((rows, i2 - i1))
        for j in range(i2 - i1):
            col = i1 + j
            if nm is None and col % block == 0:
                end = min(col + block, d)
                errors = part[:, j:j + end - col] ** 2 / diag[col:end] ** 2
                chosen = np.zeros(errors.size, dtype=bool)
                k = col // block
                chosen[np.argsort(errors.ravel(), kind="stable")[: bounds[k + 1] - bounds[k]]] = True
                dropped[:, col:end] = chosen.reshape(errors.shape)
            if nm is not None and col % nm[1] == 0:
                run = part[:, j:j + nm[1]] ** 2 / diag[col:col + nm[1]] ** 2
                lowest = np.argsort(run, axis=1, kind="stable")[:, : nm[1] - nm[0]]
                np.put_along_axis(dropped[:, col:col + nm[1]], lowest, True, axis=1)
            err = np.where(dropped[:, col], part[:, j], 0.0) / diag[col]
            part[:, j:] -= err[:, None] * factor[col, col:i2][None, :]
            carried[:, j] = err
        w[:, i2:] -= carried @ factor[i1:i2, i2:]
    keep, weights = np.empty_like(dropped), np.empty_like(w)
    keep[:, order], weights[:, order] = ~dropped, np.where(dropped, 0.0, w)
    return keep, weights


@dataclass(frozen=True)
class MaskRule:
    """How the refit chooses one layer's mask again (a plain value the pruning hands the refit).

    Attributes:
        nm: (n, m) for an N:M pattern along the input-channel axis, or None: the count of zeros the pruning
            allocated to each group, placed anywhere.
        kernel: columns per input channel in a row (a Conv's kernel size, 1 for Gemm and MatMul).
        block: columns whose unstructured count is set together (see :func:`obs_prune`).
    """

    nm: tuple[int, int] | None = None
    kernel: int = 1
    block: int = BLOCK

    def keep(self, optimum: np.ndarray, inverse: np.ndarray, drop: int) -> np.ndarray:
        """The keep-mask of one group's rows (see :func:`obs_prune`); ``drop``: zeros in all, without N:M."""
        order = nm_columns(optimum.shape[1], self.kernel) if self.nm is not None else None
        return obs_prune(optimum, inverse, drop, self.nm, order, self.block)[0]
