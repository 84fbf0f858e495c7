"""Pruning masks: how the sparsity is allocated between layers (global, LAMP, uniform, or from measured errors:
:mod:`asr_onnx.prune.error_budget`), and N:M along the input-channel axis."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from asr_onnx.errors import AsrError


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``global``, ``uniform`` or ``N:M`` (``n`` kept of every ``m``)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Parses ``global``, ``uniform`` or ``N:M`` such as ``2:4``.

        Raises:
            AsrError: unknown text, or N:M with N < 1 or N >= M.
        """
        text = str(text).strip().lower()
        if text in ("global", "uniform"):
            return cls(text)
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise AsrError(f"unknown pattern {text!r}; use global, uniform or N:M such as 2:4")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise AsrError(f"pattern {text}: N:M needs 0 < N < M")
        return cls("nm", n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def check_sparsity(sparsity) -> float:
    """Returns ``sparsity`` as a float in [0, 1), or raises AsrError."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise AsrError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise AsrError(f"sparsity must be in [0, 1), got {value}")
    return value


def smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """A mask of exactly the ``k`` smallest entries of a flat array; ties go to the lower index."""
    drop = np.zeros(scores.size, dtype=bool)
    if k <= 0:
        return drop
    if k >= scores.size:
        return ~drop
    kth = np.partition(scores, k - 1)[k - 1]
    drop = scores < kth
    ties = np.flatnonzero(scores == kth)[: k - int(drop.sum())]
    drop[ties] = True
    return drop


def global_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks that zero the ``sparsity`` fraction of smallest |w| across all weights together."""
    scores = np.concatenate([np.abs(w.astype(np.float32, copy=False)).ravel() for w in weights])
    drop = smallest(scores, round(sparsity * scores.size))
    bounds = np.cumsum([0] + [w.size for w in weights])
    return [~drop[a:b].reshape(w.shape) for w, a, b in zip(weights, bounds[:-1], bounds[1:])]


ALLOCATIONS = ("global", "lamp", "uniform", "error")
SCORES = ("magnitude", "wanda", "rownorm", "obs")


def lamp_scores(weight: np.ndarray) -> np.ndarray:
    """LAMP scores (Lee et al., ICLR 2021): w_u^2 over the sum of w_v^2 for every v at least as large as u.

    Ranking these across layers keeps the largest weight of every layer (score 1), so no layer is pruned away.
    Ties in |w| are ordered by index, as :func:`smallest` breaks them.
    """
    square = np.square(weight.astype(np.float64, copy=False)).ravel()
    order = np.argsort(square, kind="stable")  # ascending; equal values keep index order
    tail = np.cumsum(square[order][::-1])[::-1]  # sum over this weight and every later (larger) one
    scores = np.empty_like(square)
    scores[order] = square[order] / np.maximum(tail, np.finfo(np.float64).tiny)
    return scores.reshape(weight.shape)


def lamp_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks that zero the ``sparsity`` fraction of all weights with the smallest LAMP scores."""
    scores = np.concatenate([lamp_scores(w).ravel() for w in weights])
    drop = smallest(scores, round(sparsity * scores.size))
    bounds = np.cumsum([0] + [w.size for w in weights])
    return [~drop[a:b].reshape(w.shape) for w, a, b in zip(weights, bounds[:-1], bounds[1:])]


def uniform_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """A keep-mask that zeroes the ``sparsity`` fraction of smallest |w| of one weight."""
    scores = np.abs(weight.astype(np.float32, copy=False)).ravel()
    return ~smallest(scores, round(sparsity * scores.size)).reshape(weight.shape)


def nm_mask(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """A keep-mask with the ``n`` largest |w| in each run of ``m`` consecutive entries along ``axis``."""
    moved = np.moveaxis(np.abs(weight.astype(np.float32, copy=False)), axis, -1)
    groups = moved.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def nm_reason(layer, m: int) -> str | None:
    """Why a layer cannot take an N:M pattern along its input-channel axis, or None."""
    if layer.depthwise:
        return "depthwise conv"
    channels = layer.weight.shape[layer.in_axis]
    if channels % m:
        return f"input channels ({channels}) not a multiple of {m}"
    return None


@dataclass
class LayerPrune:
    """What pruning did to one layer."""

    name: str
    weight: str
    op: str
    shape: tuple
    pruned: bool
    reason: str | None
    sparsity: float
    allocation: str = "global"
    score: str = "magnitude"


def exclusion(layers, exclude=(), keep_first: bool = False, keep_last: bool = False) -> dict[int, str]:
    """Maps layer index to the reason it stays dense.

    Raises:
        AsrError: a pattern of ``exclude`` is not a regular expression.
    """
    compiled = []
    for pattern in exclude:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999} overflows, deep nesting recurses
            raise AsrError(f"--exclude {pattern!r} is not a regular expression: {e}") from None
    reasons = {}
    for i, layer in enumerate(layers):
        for pattern, regex in compiled:
            if regex.search(layer.name) or regex.search(layer.weight.name):
                reasons[i] = f"--exclude {pattern}"
                break
    if layers and keep_first:
        reasons.setdefault(0, "--keep-first")
    if layers and keep_last:
        reasons.setdefault(len(layers) - 1, "--keep-last")
    return reasons


def prune_layers(layers, sparsity: float, pattern: Pattern, exclude=(), keep_first=False, keep_last=False,
                 allocation: str = "global", input_norms: dict | None = None,
                 score: str = "magnitude", measured=None) -> list[LayerPrune]:
    """Zeroes weights in place of the graph (new arrays, never in-place writes).

    A weight shared by several layers is pruned once.

    Args:
        layers: graph.Layer list, in topological order.
        sparsity: fraction of eligible weights to zero, in [0, 1); ignored for N:M.
        pattern: global, uniform or N:M.
        exclude: regexes matched against node and weight names. Defaults to none.
        keep_first: leave the first layer dense. Defaults to False.
        keep_last: leave the last layer dense. Defaults to False.
        allocation: how an unstructured pattern splits the sparsity between layers: "global" (one |w|
            threshold), "lamp" (one threshold on LAMP scores), "uniform" (the same fraction per layer) or
            "error" (from each layer's measured effect on the network's output: ``measured``). The pattern
            "uniform" is the allocation "uniform". Ignored for N:M. Defaults to "global".
        input_norms: layer index -> the L2 norm of each input channel of the layer's dense input: weights
            are then ranked by Wanda's score |w| · ||x|| (Sun et al., 2023) instead of |w|. Defaults to None.
        score: "magnitude" (|w|, or Wanda's score with ``input_norms``), "rownorm" (|w| over the L2 norm of
            its output channel's weights, see :func:`rownorm_scores`) or "obs" (magnitude here: the refit chooses
            the masks again, with these counts, see :func:`mask_rules`). Defaults to "magnitude".
        measured: for the allocation "error", ``measured(chosen, scores)`` -> the keep-mask of each chosen
            layer (by index into ``layers``, one per distinct weight) from its scores (see
            :func:`asr_onnx.prune.error_budget.error_masks`). Defaults to None.

    Raises:
        AsrError: no prunable layer, and something to prune (a sparsity above 0 or an N:M pattern); an
            unknown allocation, or the pattern uniform with another allocation; the allocation "error"
            without ``measured``.
    """
    allocation = check_allocation(allocation, pattern)
    if not layers and (sparsity > 0 or pattern.kind == "nm"):  # at sparsity 0 there is nothing to do: the identity
        raise AsrError("the model has no prunable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight; "
                       "weights behind DequantizeLinear or in ConvInteger/MatMulInteger are not pruned)")
    skipped = exclusion(layers, exclude, keep_first, keep_last)
    owner: dict[str, int] = {}  # weight name -> index of the first layer that uses it
    for i, layer in enumerate(layers):
        if i not in skipped and pattern.kind == "nm" and (reason := nm_reason(layer, pattern.m)):
            skipped[i] = reason
        owner.setdefault(layer.weight.name, i)
    chosen = [i for i, layer in enumerate(layers) if i not in skipped and owner[layer.weight.name] == i]
    weights = [layers[i].weight.values for i in chosen]
    if score == "rownorm":
        weights = [rownorm_scores(layers[i]) for i in chosen]
    elif input_norms is not None:
        weights = [wanda_scores(layers[i], input_norms[i]) for i in chosen]
    if pattern.kind == "nm":
        allocation = str(pattern)
    if allocation == "global":
        keeps = global_masks(weights, sparsity) if weights else []
    elif allocation == "lamp":
        keeps = lamp_masks(weights, sparsity) if weights else []
    elif allocation == "uniform":
        keeps = [uniform_mask(w, sparsity) for w in weights]
    elif allocation == "error":
        if measured is None:
            raise AsrError("the allocation error measures each layer's effect on the output: it needs calibration data")
        keeps = measured(chosen, weights) if weights else []
    else:
        keeps = [nm_mask(w, pattern.n, pattern.m, layers[i].in_axis) for w, i in zip(weights, chosen)]
    for i, keep in zip(chosen, keeps):
        weight = layers[i].weight
        weight.values = np.where(keep, weight.values, np.zeros((), weight.values.dtype))
    score = score if score in ("rownorm", "obs") else "magnitude" if input_norms is None else "wanda"
    return [_summary(layer, i, skipped, owner, allocation, score) for i, layer in enumerate(layers)]


def wanda_scores(layer, norms: np.ndarray) -> np.ndarray:
    """|w| times the norm of the input channel it reads, in the weight's shape (Conv groups respected).

    Args:
        layer: a graph.Layer.
        norms: (input channels,) L2 norms of the layer's input.
    """
    values = np.abs(layer.weight.values.astype(np.float64))
    norms = np.asarray(norms, np.float64)
    if layer.op == "Conv":  # output o of group g reads input channels g * cin_g ... (g + 1) * cin_g - 1
        out, cin_g = values.shape[:2]
        group = np.arange(out) // (out // layer.groups)
        per_row = norms[group[:, None] * cin_g + np.arange(cin_g)[None, :]]
        return values * per_row.reshape(out, cin_g, *([1] * (values.ndim - 2)))
    if layer.op == "ConvTranspose":  # weight (in, out / groups, ...): the input channel is axis 0
        return values * norms.reshape(-1, *([1] * (values.ndim - 1)))
    shape = [1] * values.ndim
    shape[layer.in_axis] = -1
    return values * norms.reshape(shape)


def rownorm_scores(layer) -> np.ndarray:
    """|w| over the L2 norm of the weights of its output channel, in the weight's shape.

    A BN folded into a layer multiplies each output channel's weights by its gamma / sigma; this score does
    not see that factor, so a folded graph and its BN-kept original get the same ranking. An all-zero
    channel keeps scores 0.
    """
    values = np.abs(layer.weight.values.astype(np.float64))
    if layer.op == "ConvTranspose":  # weight (in, out / groups, ...): channel j of group g is [g * cin_g:, j]
        cin_g = values.shape[0] // layer.groups
        grouped = values.reshape(layer.groups, cin_g, *values.shape[1:])
        axes = (1,) + tuple(range(3, grouped.ndim))
        norms = np.sqrt(np.sum(np.square(grouped), axis=axes, keepdims=True))
        return (grouped / np.maximum(norms, np.finfo(np.float64).tiny)).reshape(values.shape)
    axes = tuple(a for a in range(values.ndim) if a != layer.out_axis)
    norms = np.sqrt(np.sum(np.square(values), axis=axes, keepdims=True))
    return values / np.maximum(norms, np.finfo(np.float64).tiny)


def check_allocation(allocation: str, pattern: Pattern) -> str:
    """The allocation an unstructured pattern uses ("uniform" for the pattern uniform), or raises AsrError."""
    allocation = str(allocation).strip().lower()
    if allocation not in ALLOCATIONS:
        raise AsrError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if pattern.kind == "uniform":
        if allocation not in ("global", "uniform"):
            raise AsrError(f"the pattern uniform already allocates the sparsity; it cannot take allocation "
                           f"{allocation}")
        return "uniform"
    return allocation


def _summary(layer, i, skipped, owner, allocation, score) -> LayerPrune:
    values = layer.weight.values
    shared = owner[layer.weight.name] != i
    reason = skipped.get(owner[layer.weight.name]) if shared else skipped.get(i)
    return LayerPrune(
        name=layer.name,
        weight=layer.weight.name,
        op=layer.op,
        shape=tuple(values.shape),
        pruned=reason is None,
        reason=reason,
        sparsity=float(np.count_nonzero(values == 0) / values.size),
        allocation=allocation,
        score=score,
    )


EMPTIED = 0.99  # a layer left with under 1% of its weights: no correction or refit brings it back


def emptied_warning(layers: list[LayerPrune]) -> str | None:
    """One warning line when one global threshold left layers with under 1% of their weights, else None.

    Under one |w| threshold a layer whose weights are small for reasons the network does not care about (a
    LayerNorm or BN after it rescales them) loses nearly all of them; LAMP's allocation never empties a layer.
    """
    empty = [layer for layer in layers if layer.pruned and layer.allocation == "global" and layer.sparsity >= EMPTIED]
    if not empty:
        return None
    named = ", ".join(f"{layer.name} {100 * layer.sparsity:.1f}%" for layer in empty[:3])
    more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
    return (f"warning: one global threshold left {len(empty)} layer(s) with under 1% of their weights ({named}{more}); "
            f"no repair brings such a layer back: --allocation lamp never empties a layer")


def mask_rules(layers: list[LayerPrune], pattern: Pattern) -> list:
    """Per layer, the :class:`asr_onnx.refit.obs.MaskRule` by which the refit chooses its mask again (the score
    "obs"), or None for a layer left dense."""
    from asr_onnx.refit.obs import MaskRule

    nm = (pattern.n, pattern.m) if pattern.kind == "nm" else None
    return [MaskRule(nm, int(np.prod(layer.shape[2:])) if layer.op == "Conv" else 1) if layer.pruned else None
            for layer in layers]
