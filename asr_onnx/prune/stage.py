"""Pruning as one stage: a dense model in, the pruned model and what the report records out."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from asr_onnx.errors import AsrError
from asr_onnx.model.graph import find_layers, to_graph, to_model
from asr_onnx.prune.masks import SCORES, Pattern, check_sparsity, mask_rules, prune_layers


@dataclass
class Pruned:
    """What pruning hands the next stage.

    Attributes:
        model: the pruned model (under channels: the dense shapes, the removed filters zeroed).
        layers: the pruned layers with their masks (none under channels).
        channel_plan: under channels, the prune.channels.ChannelPlan; else None.
        settings: what the report records of the pruning.
        mask_rules: with the score "obs", per layer how the refit chooses its mask again (see
            :func:`asr_onnx.prune.masks.mask_rules`); else None.
    """

    model: onnx.ModelProto
    layers: list = field(default_factory=list)
    channel_plan: object = None
    settings: dict = field(default_factory=dict)
    mask_rules: list | None = None


def needs_data(pattern: str, score: str, channel_plan=None, calib=None, allocation: str = "global") -> bool:
    """Whether the pruning reads calibration data (Wanda's norms, the greedy channel score, or the allocation
    "error"'s measured errors); refuses a missing ``calib`` then."""
    if is_channels(pattern):
        needed, what = score == "greedy" and channel_plan is None, f"the score {score}"
    else:
        measured = measures_errors(pattern, allocation)
        needed, what = score == "wanda" or measured, "the allocation error" if measured else f"the score {score}"
    if needed and calib is None:
        raise AsrError(f"{what} needs calibration data")
    return needed


def measures_errors(pattern: str, allocation: str) -> bool:
    """Whether the allocation "error" applies: it splits an unstructured sparsity (N:M and uniform fix each
    layer's own)."""
    return str(allocation).strip().lower() == "error" and Pattern.parse(pattern).kind == "global"


def prune_weights(dense, sparsity: float, pattern: str = "global", exclude=(), keep_first: bool = False,
                  keep_last: bool = False, allocation: str = "global", score: str = "magnitude",
                  norms: dict | None = None, calib=None, **options) -> Pruned:
    """Zeroes weights of Conv, ConvTranspose, Gemm and MatMul layers (:func:`asr_onnx.prune.masks.prune_layers`);
    ``norms``: Wanda's per-layer input norms (:func:`asr_onnx.prune.wanda.input_norms`) for the score "wanda";
    ``calib`` and ``options`` (batch_size, device, threads, progress): the allocation "error"'s passes
    (:func:`asr_onnx.prune.error_budget.error_masks`; with the score "obs" its layers are refitted as the refit
    will)."""
    sparsity, parsed = check_sparsity(sparsity), Pattern.parse(pattern)
    if score not in SCORES:
        raise AsrError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if score == "wanda" and norms is None:
        raise AsrError("the score wanda needs calibration data")
    graph = to_graph(dense)
    found = find_layers(graph)
    measured = None
    if measures_errors(pattern, allocation):
        if calib is None:
            raise AsrError("the allocation error needs calibration data")

        def measured(chosen: list[int], scores: list):
            from asr_onnx.prune.error_budget import error_masks

            return error_masks(dense, found, chosen, scores, sparsity, calib, refit=score == "obs", **options)[0]

    layers = prune_layers(found, sparsity, parsed, exclude, keep_first, keep_last, allocation, norms, score,
                          measured)
    used = layers[0].allocation if layers else allocation  # "uniform" for the pattern uniform
    return Pruned(to_model(graph, dense), layers, None,
                  dict(sparsity=sparsity, pattern=str(parsed), exclude=list(exclude), keep_first=keep_first,
                       keep_last=keep_last, allocation=used, score=score),
                  mask_rules(layers, parsed) if score == "obs" else None)


def prune_channels(dense, sparsity: float, *, score: str = "magnitude", calib=None, flops_target: float | None = None,
                   exclude=(), channel_plan=None, batch_size: int = 64, device: str = "auto",
                   threads: int = 0) -> Pruned:
    """Removes whole output channels group by group (:mod:`asr_onnx.prune.channels`), as masks on the dense
    shapes; ``channel_plan``: a plan made earlier, reused at this sparsity or FLOPs target."""
    from asr_onnx.prune import channels

    sparsity = check_sparsity(sparsity)
    target = None if flops_target is None else channels.check_flops_target(flops_target)
    if channel_plan is not None:
        plan = channels.choose(channel_plan, sparsity=None if target else sparsity, flops_target=target)
    else:
        plan = channels.plan(dense, sparsity=None if target else sparsity, flops_target=target, score=score,
                             calib=calib, exclude=exclude, batch_size=batch_size, device=device, threads=threads)
    return Pruned(channels.mask(dense, plan.groups, plan.keep), [], plan,
                  dict(sparsity=sparsity, pattern="channels", flops_target=target, exclude=list(exclude), score=score))


def shrink_repaired(channel_plan, repaired, dense, data=None, *, device: str = "auto") -> tuple:
    """Slices the planned channels out of the repaired, still dense-shaped model.

    Groups are found again on the repaired graph and the result is checked against the masked model on a few
    samples of ``data`` (:func:`asr_onnx.prune.channels.shrink_model`).

    Returns:
        (the shrunk model, or None when ``repaired`` has no dense shapes left to slice; the report's
        ``channels`` entry).
    """
    from asr_onnx.prune import channels

    feeds = channels.sample_feeds(dense, data, required=False)
    dims = {name: tuple(value.shape) for name, value in feeds.items()} if feeds else None
    if not channels.masked(channel_plan, repaired):
        return None, channels.summary(channel_plan, dense, repaired, dims=dims)
    shrunk = channels.shrink_model(repaired, *channel_plan.groups_keep(), feeds=feeds, device=device)
    return shrunk.model, channels.summary(channel_plan, dense, shrunk.model, shrunk.whole, dims=dims)


def prune_model(dense, sparsity: float, pattern: str = "global", *, exclude=(), keep_first: bool = False,
                keep_last: bool = False, allocation: str = "global", score: str = "magnitude", calib=None,
                flops_target: float | None = None, channel_plan=None, norms: dict | None = None, **options) -> Pruned:
    """:func:`prune_channels` under ``pattern="channels"`` (``options``: its session options), else
    :func:`prune_weights` (``options``: the allocation "error"'s)."""
    if is_channels(pattern):
        return prune_channels(dense, sparsity, score=score, calib=calib, flops_target=flops_target, exclude=exclude,
                              channel_plan=channel_plan, **options)
    return prune_weights(dense, sparsity, pattern, exclude, keep_first, keep_last, allocation, score, norms,
                         calib, **options)


def is_channels(pattern) -> bool:
    """Whether ``pattern`` names channel pruning."""
    return str(pattern).strip().lower() == "channels"
