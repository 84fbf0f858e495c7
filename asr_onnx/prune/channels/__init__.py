"""Structured channel pruning: dependency groups, channel selection, graph surgery (issue 16).

The stage runs as: :func:`plan` (groups and the channels each keeps) -> :func:`asr_onnx.prune.channels.surgery.mask`
(the dense-shaped model that the refit and the BN recalibration work on) -> :func:`shrink` (the smaller graph,
which computes what the masked one computes) -> :func:`summary` (the report's ``channels`` entry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.prune.channels.check import check_written, sample_feeds
from asr_onnx.prune.channels.groups import Groups, find_groups
from asr_onnx.prune.channels.select import ALIGN, SCORES
from asr_onnx.prune.channels.surgery import Shrunk, mask, shrink, shrink_model

# The CLI's --sparsity for --pattern channels: the largest of 0.2-0.5 that kept held-out training images within
# 2 points of dense and ran no slower than dense on both resnet20_bn and vgg_bn_bn (benchmarks/channels_default.py)
DEFAULT_SPARSITY = 0.3

__all__ = ["DEFAULT_SPARSITY", "ChannelPlan", "plan", "choose", "mask", "shrink", "shrink_model", "Shrunk", "summary", "SCORES",
           "find_groups", "check_written", "sample_feeds"]


@dataclass
class ChannelPlan:
    """The groups of a model and the channels kept in each group that loses some.

    Attributes:
        groups: what :func:`find_groups` found.
        keep: group -> the sorted kept channels (groups that lose nothing are absent).
        score: the score that ordered the channels.
        orders: group -> (removal order, each step's cost), for :func:`choose`.
        macs: node -> its dense multiply-accumulates per sample.
        inputs: node -> the name of its data input.
        rounded: the groups that would lose channels, kept whole because their kept count rounds back to their
            size (see :func:`asr_onnx.prune.channels.select.aligned_nearest`).
    """

    groups: Groups
    keep: dict
    score: str
    orders: dict
    macs: dict
    inputs: dict
    rounded: set = field(default_factory=set)

    def groups_keep(self) -> tuple:
        """(groups, keep), the arguments of :func:`mask` and :func:`shrink`."""
        return self.groups, self.keep


def check_flops_target(value) -> float:
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise AsrError(f"--flops-target must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < target <= 1.0:
        raise AsrError(f"--flops-target must be in (0, 1], got {target}")
    return target


def plan(model, *, sparsity: float | None = None, flops_target: float | None = None, score: str = "magnitude",
         calib=None, exclude=(), batch_size: int = 64, device: str = "auto", threads: int = 0,
         max_gram_mb: float = 256.0) -> ChannelPlan:
    """Finds the channel groups of ``model`` and chooses the channels to keep.

    Args:
        model: the dense onnx.ModelProto.
        sparsity: the fraction of each prunable group's channels removed (floor of it per group, then the kept
            count rounded to a multiple of 8 by :func:`select.aligned_nearest`). Defaults to None; exactly one
            of ``sparsity`` and ``flops_target`` is given.
        flops_target: the fraction of multiply-accumulates to keep; channels are removed globally in the
            order of their normalised score until it is reached. Defaults to None.
        score: "magnitude", "bn-scale" or "greedy" (see :mod:`asr_onnx.prune.channels.select`). Defaults to
            "magnitude".
        calib: the calibration set, needed by "greedy". Defaults to None.
        exclude: regexes of layer names (or weight names) whose output groups stay whole. Defaults to none.
        batch_size, device, threads: for greedy's Gram pass. Default to 64, "auto" and 0.
        max_gram_mb: greedy ignores a consumer whose Gram matrix would exceed this. Defaults to 256.

    Raises:
        AsrError: an unknown score, greedy without calibration data, or an unreachable FLOPs target.
    """
    from asr_onnx.model.graph import static_shapes, to_graph
    from asr_onnx.prune.channels import count, select

    if score not in SCORES:
        raise AsrError(f"unknown channel score {score!r}; choose one of {', '.join(SCORES)}")
    if score == "greedy" and calib is None:
        raise AsrError("the channel score greedy needs calibration data")
    graph = to_graph(model)
    shapes = static_shapes(model)
    groups = find_groups(graph, shapes)
    nodes = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    _exclude(groups, nodes, exclude)
    prunable = groups.prunable()
    inputs = {n.outputs[0].name: n.inputs[0].name for n in graph.nodes if n.outputs and n.inputs}
    empty = ChannelPlan(groups, {}, score, {}, count.layer_macs(model, shapes), inputs)
    if (sparsity is not None and sparsity <= 0) or flops_target == 1.0 or not prunable:
        return empty
    scores = select.bn_scale(groups, nodes) if score == "bn-scale" else select.magnitude(groups, nodes)
    empty.orders = {g: select.removal_order(scores[g]) for g in prunable if g in scores}
    if score == "greedy":
        empty.orders.update(_greedy(model, graph, groups, prunable, calib, batch_size=batch_size, device=device,
                                    threads=threads, max_gram_mb=max_gram_mb))
    return choose(empty, sparsity=sparsity, flops_target=flops_target)


def choose(channel_plan: ChannelPlan, *, sparsity: float | None = None,
           flops_target: float | None = None) -> ChannelPlan:
    """The same groups and removal orders, with the channels kept at another sparsity or FLOPs target."""
    from dataclasses import replace

    from asr_onnx.prune.channels import select

    orders, sizes = channel_plan.orders, channel_plan.groups.sizes
    rounded: set[int] = set()
    if flops_target is None:
        keep, rounded = select.uniform(orders, sizes, float(sparsity or 0.0))
    elif flops_target >= 1.0:
        keep = {}
    else:
        cost = select.MacModel(channel_plan.groups, channel_plan.macs, channel_plan.inputs,
                               set(channel_plan.groups.depthwise))
        keep = select.by_flops(orders, sizes, cost, flops_target)
    return replace(channel_plan, keep=keep, rounded=rounded)


def _exclude(groups: Groups, nodes: dict, patterns) -> None:
    if not patterns:
        return
    for edit in groups.edits:
        node = nodes[edit.node]
        names = (node.name or "", node.outputs[0].name, node.inputs[edit.index].name)
        if edit.role == "producer" and any(re.search(p, n) for p in patterns for n in names):
            for g, _ in edit.layout:
                groups.whole.setdefault(g, f"--exclude matches {node.name or edit.node}")


def _greedy(model, graph, groups: Groups, prunable, calib, *, batch_size, device, threads, max_gram_mb) -> dict:
    """ThiNet orders of the groups whose consumers' Gram matrices fit, from one pass over the dense model."""
    from asr_onnx.model.graph import find_layers
    from asr_onnx.prune.channels.select import consumer_h, greedy_order, group_positions
    from asr_onnx.refit.gram import accumulate, patch_size, weight_rows
    from asr_onnx.refit.reconstruct import gram_bytes

    layers = find_layers(graph)
    index = {layer.node.outputs[0].name: i for i, layer in enumerate(layers)}
    wanted = set(prunable)
    consumers = [e for e in groups.edits if e.role == "consumer" and e.node in index
                 and wanted & {g for g, _ in e.layout} and gram_bytes(layers[index[e.node]]) <= max_gram_mb * 2**20
                 and layers[index[e.node]].groups == 1 and layers[index[e.node]].op in ("Conv", "Gemm", "MatMul")]
    if not consumers:
        return {}
    indices = sorted({index[e.node] for e in consumers})
    grams, _ = accumulate(model, model, indices, calib, batch_size=batch_size, device=device, threads=threads)
    gram_of = dict(zip(indices, grams))
    h: dict[int, np.ndarray] = {}
    for edit in consumers:
        layer = layers[index[edit.node]]
        gram = gram_of[index[edit.node]]
        rows = weight_rows(layer, layer.weight.values)
        kernel = patch_size(layer)[1] // (layer.weight.shape[1] if layer.op == "Conv" else patch_size(layer)[1])
        for g in wanted & {g for g, _ in edit.layout}:
            pos = group_positions(edit.layout, g, groups.sizes)  # (channels, repeat) input positions
            patch = (pos[:, :, None] * kernel + np.arange(kernel)).reshape(len(pos), -1)
            h[g] = h.get(g, 0.0) + consumer_h(rows, gram.xtx[0], float(gram.yy.sum()), patch)
    return {g: greedy_order(hg) for g, hg in h.items()}


ROUNDED = ("its kept count rounds back to all {size} channels: onnxruntime's CPU convs work in blocks of {block}, "
           "and removing fewer than {block} would not run faster")


def summary(channel_plan: ChannelPlan, before, after, whole: dict | None = None, dims: dict | None = None) -> dict:
    """The report's ``channels`` entry: every group, and params and MACs of the dense and the shrunk model.

    Each group gives its ``channels`` and how many of them were ``removed`` (0 where rounding to a block of 8
    kept them all), whether it stays ``whole`` and, when it does, the ``reason``.

    Args:
        whole: planned group -> why shrinking left it whole after all (:attr:`Shrunk.whole`). Defaults to none.
        dims: graph input name -> the dims both models' MACs are counted at (a calibration batch's), so that
            a dynamic dimension does not leave layers uncounted. Defaults to None (the declared ones).
    """
    from asr_onnx.prune.channels import count

    groups, whole = channel_plan.groups, whole or {}
    entries = []
    for g, size in enumerate(groups.sizes):
        reason = groups.whole.get(g) or whole.get(g) or (ROUNDED.format(size=int(size), block=ALIGN)
                                                          if g in channel_plan.rounded else None)
        kept = None if reason else channel_plan.keep.get(g)
        entries.append({"kind": groups.kind(g), "channels": int(size),
                        "removed": 0 if kept is None else int(size - len(kept)), "whole": reason is not None,
                        "reason": reason})
    return {"groups": entries, "score": channel_plan.score,
            "params": [count.params(before), count.params(after)],
            "macs": [count.macs(before, dims), count.macs(after, dims)]}


def masked(channel_plan: ChannelPlan, model) -> bool:
    """Whether ``model`` still has the dense shapes that the plan slices (False once shrunk, or with nothing
    to remove).

    The planned producers' weights are looked up by name (a BN folded into its conv renames the conv's output,
    not its weight); where none is found, the groups are found again (:func:`shrink_model`'s match).
    """
    from asr_onnx.prune.channels.surgery import carry

    keep, groups = channel_plan.keep, channel_plan.groups
    if not keep:
        return False
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    found = [(dims[e.const][e.axis], sum(groups.sizes[g] * r for g, r in e.layout)) for e in groups.edits
             if e.role == "producer" and e.const in dims and any(g in keep for g, _ in e.layout)]
    if found:
        return all(size == full for size, full in found)
    from asr_onnx.model.graph import static_shapes, to_graph

    return bool(carry(groups, keep, find_groups(to_graph(model), static_shapes(model)))[0])
