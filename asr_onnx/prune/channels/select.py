"""Which channels of each group go: a removal order per group, and the allocation between groups.

Scores (the lowest goes first):
- ``magnitude``: the L1 norm of each channel's filters, summed over the group's producers;
- ``bn-scale``: |gamma| of each channel, summed over the group's BNs (network slimming, Liu et al. 2017);
  a group without BN falls back to magnitude;
- ``greedy``: ThiNet's greedy selection (Luo et al. 2017; He et al. 2017 without the LASSO): channels are
  removed one at a time, each time the one that least increases the squared error of the consumers' outputs,
  computed from the dense consumers' input Gram matrices and weights (relative to their output energy).
"""

from __future__ import annotations

import heapq

import numpy as np

from asr_onnx.prune.channels.groups import Groups

SCORES = ("magnitude", "bn-scale", "greedy")
MIN_KEEP = 0.1  # a FLOPs target never takes a group below this fraction of its channels (and never below 1)
# Kept channels are a multiple of this in every group of at least as many channels: onnxruntime's CPU convs
# work in blocks of 8 channels (NCHWc), and on vgg_bn_bn a FLOPs-0.5 model whose counts were off the block
# ran 1.03-1.08x faster than dense against 2.2-2.4x with them rounded down to a multiple of 8 (RESULTS.md).
ALIGN = 8


def aligned_down(kept: int) -> int:
    """A kept count rounded down to a multiple of ALIGN; a count under ALIGN stays as it is."""
    return kept if kept < ALIGN else kept // ALIGN * ALIGN


def aligned_nearest(kept: int, size: int) -> int:
    """A kept count of a group of ``size`` channels rounded to the nearest multiple of ALIGN (a tie keeps more),
    at least ALIGN and at most ``size``; in a group under ALIGN channels it stays as it is.

    Why: the floor rule alone kept counts off onnxruntime's 8-channel block (12 of 16 at 0.25), and the shrunk
    model then ran slower than dense at --sparsity 0.2-0.4 (0.72-0.89x measured, issue 27): removing channels
    must never make a model slower. Nearest rather than down keeps the removed fraction close to the one asked.
    """
    if size < ALIGN:
        return kept
    nearest = (kept + ALIGN // 2) // ALIGN * ALIGN
    return min(max(nearest, ALIGN), size)


def group_positions(layout, group: int, sizes) -> np.ndarray:
    """(channels of ``group``, repeat): the layout positions that each channel of the group fills."""
    offset, rows = 0, []
    for g, repeat in layout:
        if g == group:
            rows.append(offset + np.arange(sizes[g])[:, None] * repeat + np.arange(repeat))
        offset += sizes[g] * repeat
    return np.concatenate(rows, axis=1)


def _sum_over(groups: Groups, nodes: dict, role: str, index: int | None, reduce) -> dict[int, np.ndarray]:
    """Per group, ``reduce`` of each channel's slice of every matching constant, summed over constants."""
    out: dict[int, np.ndarray] = {}
    for edit in groups.edits:
        if edit.role != role or (index is not None and edit.index != index):
            continue
        node = nodes[edit.node]
        if index is not None and node.op != "BatchNormalization":
            continue
        values = np.moveaxis(np.asarray(node.inputs[edit.index].values, np.float64), edit.axis, 0)
        for g in {g for g, _ in edit.layout}:
            pos = group_positions(edit.layout, g, groups.sizes)
            out[g] = out.get(g, 0.0) + reduce(values[pos.ravel()].reshape(pos.shape[0], -1))
    return out


def magnitude(groups: Groups, nodes: dict) -> dict[int, np.ndarray]:
    return _sum_over(groups, nodes, "producer", None, lambda rows: np.abs(rows).sum(1))


def bn_scale(groups: Groups, nodes: dict) -> dict[int, np.ndarray]:
    gammas = _sum_over(groups, nodes, "param", 1, lambda rows: np.abs(rows).sum(1))
    return {g: gammas.get(g, s) for g, s in magnitude(groups, nodes).items()}


def removal_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The channels lowest score first, and each one's cost: its score over the group's mean (comparable
    between groups)."""
    order = np.argsort(scores, kind="stable")
    mean = float(np.mean(scores))
    return order, scores[order] / (mean if mean > 0 else 1.0)


def greedy_order(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ThiNet's greedy removal on H, where the consumers' squared error for removed set R is Σ_{i,j∈R} H[i,j].

    Returns:
        (the removal order, every step's increase of the error, made non-negative by the running maximum).
    """
    n = len(h)
    cross, removed, order, total = np.zeros(n), np.zeros(n, bool), [], []
    for _ in range(n):
        cost = np.where(removed, np.inf, np.diag(h) + 2 * cross)
        j = int(np.argmin(cost))
        total.append((total[-1] if total else 0.0) + float(cost[j]))
        order.append(j)
        removed[j] = True
        cross += h[:, j]
    cumulative = np.maximum.accumulate(np.maximum(total, 0.0))
    return np.array(order), np.diff(cumulative, prepend=0.0)


def consumer_h(weight_rows: np.ndarray, xtx: np.ndarray, yy: float, patch: np.ndarray) -> np.ndarray:
    """One consumer's share of H: for channels i, j, Σ_o w_o,Pᵢ · XᵀX[Pᵢ, Pⱼ] · w_o,Pⱼ over output energy,
    where ``patch[i]`` are the patch indices that channel i fills."""
    n, m = patch.shape
    flat = patch.ravel()
    w = weight_rows[:, flat].astype(np.float64)
    product = (w.T @ w) * xtx[np.ix_(flat, flat)]
    return product.reshape(n, m, n, m).sum(axis=(1, 3)) / max(yy, np.finfo(np.float64).tiny)


def uniform(orders: dict, sizes, sparsity: float) -> tuple[dict[int, np.ndarray], set[int]]:
    """Each group loses floor(sparsity * channels) of its channels, first in its removal order; then, in a
    group of at least ALIGN channels that loses some, the kept count is rounded by :func:`aligned_nearest`.

    Returns:
        (group -> its kept channels, for the groups that lose some; the groups that rounding kept whole: a count
        off the 8-channel block would not run faster than the whole group).
    """
    keep, rounded = {}, set()
    for g, (order, _) in orders.items():
        k = min(int(np.floor(sparsity * sizes[g] + 1e-9)), sizes[g] - 1)
        if k > 0:
            k = sizes[g] - aligned_nearest(sizes[g] - k, sizes[g])
            if k == 0:
                rounded.add(g)
        if k > 0:
            keep[g] = np.sort(order[k:])
    return keep, rounded


def by_flops(orders: dict, sizes, layer_cost, target: float) -> dict[int, np.ndarray]:
    """Removes channels globally, cheapest cost first, until the kept MACs are at most ``target`` of dense;
    then each group's kept count is rounded down to a multiple of ALIGN (a count under ALIGN stays).

    Args:
        orders: group -> (removal order, cost of each step).
        sizes: channels per group.
        layer_cost: a ``MacModel``.
        target: the fraction of multiply-accumulates to keep.

    Raises:
        AsrError: the target cannot be reached with every group at MIN_KEEP.
    """
    from asr_onnx.errors import AsrError

    removed = dict.fromkeys(orders, 0)
    limit = {g: sizes[g] - max(1, int(np.ceil(MIN_KEEP * sizes[g]))) for g in orders}
    heap = [(float(cost[0]), g) for g, (_, cost) in orders.items() if limit[g] > 0]
    heapq.heapify(heap)
    goal = target * layer_cost.dense
    while layer_cost.total > goal:
        if not heap:
            raise AsrError(f"--flops-target {target:g} cannot be reached: with every prunable group at "
                           f"{MIN_KEEP:.0%} of its channels, {layer_cost.total / layer_cost.dense:.3f} of the "
                           f"multiply-accumulates remain")
        _, g = heapq.heappop(heap)
        removed[g] += 1
        layer_cost.remove(g)
        if removed[g] < limit[g]:
            heapq.heappush(heap, (float(orders[g][1][removed[g]]), g))
    removed = {g: sizes[g] - aligned_down(sizes[g] - r) if r else 0 for g, r in removed.items()}
    return {g: np.sort(orders[g][0][r:]) for g, r in removed.items() if r}


class MacModel:
    """The MACs of every layer as a function of the channels kept per group (layers are bilinear in them)."""

    def __init__(self, groups: Groups, macs: dict[str, int], inputs: dict[str, str], depthwise: set):
        self.sizes = groups.sizes
        self.kept = list(groups.sizes)
        self.layers = []  # (dense MACs, output layout, input layout or (), depthwise)
        for name, count in macs.items():
            out = groups.layouts.get(name, ())
            x = groups.layouts.get(inputs.get(name, ""), ())
            self.layers.append((count, out, () if name in depthwise else x))
        self.touch: dict[int, list[int]] = {}
        for i, (_, out, x) in enumerate(self.layers):
            for g, _ in tuple(out) + tuple(x):
                self.touch.setdefault(g, []).append(i)
        self.costs = [self._cost(i) for i in range(len(self.layers))]
        self.dense = self.total = float(sum(self.costs))

    def _fraction(self, layout) -> float:
        span = sum(self.sizes[g] * r for g, r in layout)
        return sum(self.kept[g] * r for g, r in layout) / span if span else 1.0

    def _cost(self, i: int) -> float:
        count, out, x = self.layers[i]
        return count * self._fraction(out) * self._fraction(x)

    def remove(self, g: int) -> None:
        self.kept[g] -= 1
        for i in set(self.touch.get(g, [])):
            new = self._cost(i)
            self.total += new - self.costs[i]
            self.costs[i] = new
