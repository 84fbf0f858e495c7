"""Least-squares reconstruction: the kept weights of every layer refitted so that the pruned layer's output,
on its input in the network pruned and refitted so far, matches the dense layer's output on its dense input.

For output row o with kept inputs S, the ridge problem

    min_w ||X_S w - y_o||² + λ ||w - w_dense,S||²,    λ = damping · mean(diag(XᵀX))

is solved on the host from the Gram sums (float64). Its prior is the dense weight, so that a layer whose
input is unchanged and which loses no weight refits to itself, and the solution never fits the calibration
data worse than the pruned weights do (their penalty is 0). Pruned weights stay zero: the sparsity and any
N:M pattern hold exactly. Layers are refitted one depth level at a time (one Gram pass per level).
"""

from __future__ import annotations

import time

import numpy as np

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import GramStats
from asr_onnx.refit.gram import (
    MAX_NODE_MACS,
    GramWork,
    accumulate,
    add_batch,
    from_rows,
    gram_work,
    patch_size,
    weight_rows,
)
from asr_onnx.refit.obs import MaskRule

METHODS = ("none", "ls")
TARGETS = ("layer", "block")  # what each layer's refit matches: its dense output, or its residual block's
DAMPING = 0.01  # 1% of the mean diagonal of XᵀX, as in the PyTorch reference
# What one layer's Gram pass may cost (multiply-adds run at 50-100 G/s on a CPU core pair): 1e13 in all over the
# refit's samples, minutes (the widest layers of a 224x224 ResNet-50 need 1.2e12 for 1,024 samples); 1 GiB in one
# tensor of one batch (im2col's patch matrix); and MAX_NODE_MACS in one node. The refit's batch shrinks to keep
# each batch under the last two.
MAX_GRAM_MACS = 1e13
MAX_BATCH_BYTES = 2**30
# The frontier held in memory between passes; beyond it, a temporary folder. On disk by default: on the bottleneck
# sample with 4,096 images a 1 GiB frontier in memory saved 9% of the CPU time at 6.7x the peak memory (RESULTS,
# "The default (issue 27)"); --frontier-mb trades one for the other.
FRONTIER_MB = 0.0


def refit_rows(dense_rows: np.ndarray, keep: np.ndarray, gram: GramStats, damping: float = DAMPING,
               with_cond: bool = True, rule: MaskRule | None = None):
    """The ridge refit of every output row on its kept inputs.

    Args:
        dense_rows: (output channels, patch length) dense weights (see :func:`asr_onnx.refit.gram.weight_rows`).
        keep: the same shape, True where a weight survives pruning.
        gram: the layer's sums, groups along the first axis of ``xtx`` and ``xty``.
        damping: λ as a fraction of the mean diagonal of each group's XᵀX. Defaults to 0.01.
        with_cond: compute the damped Gram's condition number (an eigendecomposition, as costly as the solve).
            Defaults to True; without it ``cond`` is None.
        rule: None to refit on ``keep``; else each group's mask is chosen again from these sums by OBS
            (:mod:`asr_onnx.refit.obs`), with ``keep``'s count of zeros in the group, or the rule's N:M pattern,
            and kept where its refit fits the sums better than the refit on ``keep``. Defaults to None.

    Returns:
        (refitted rows, zero where the kept mask is False; a dict with err_before, err_after and cond).
    """
    groups, per_group = gram.xtx.shape[0], dense_rows.shape[0] // gram.xtx.shape[0]
    dense_rows = dense_rows.astype(np.float64)
    rows = np.where(keep, dense_rows, 0.0)
    keep = keep.copy() if rule is not None else keep
    before = after = 0.0
    cond: float | None = 1.0 if with_cond else None
    for g in range(groups):
        xtx, xty = gram.xtx[g], gram.xty[g]
        lam = damping * float(np.mean(np.diag(xtx)))
        block = slice(g * per_group, (g + 1) * per_group)
        error = _residual(rows[block], xtx, xty)  # the pruned rows' own; the refit's below
        before += error
        if lam > 0:
            damped = xtx + lam * np.eye(len(xtx))
            rhs = xty.T + lam * dense_rows[block]  # (rows, patch): each row's right-hand side on every input
            choose = rule is not None and not keep[block].all()
            fewer_pruned = (~keep[block]).sum(axis=1).min() < keep[block].sum(axis=1).max()
            inverse = _inverse(damped) if choose or fewer_pruned else None
            fitted = _solve_masks(damped, inverse, rhs, keep[block])
            error = _residual(fitted, xtx, xty)
            if choose:
                chosen = rule.keep(rhs @ inverse, inverse, int((~keep[block]).sum()))
                refitted = _solve_masks(damped, inverse, rhs, chosen)
                chosen_error = _residual(refitted, xtx, xty)
                if chosen_error < error:  # OBS chooses greedily: its mask is kept only where it fits better
                    fitted, error, keep[block] = refitted, chosen_error, chosen
            rows[block] = fitted
            if cond is not None:
                eig = np.linalg.eigvalsh(damped)
                cond = max(cond, float(eig[-1] / max(eig[0], lam)))
        after += error
    total = float(gram.yy.sum())
    scale = max(total, np.finfo(np.float64).tiny)
    return rows, {"err_before": float(np.sqrt(max(before + total, 0.0) / scale)),
                  "err_after": float(np.sqrt(max(after + total, 0.0) / scale)), "cond": cond}


def _solve_masks(damped: np.ndarray, inverse: np.ndarray | None, rhs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """:func:`_solve_kept` for every row of ``rhs`` on its own mask (a row of ``keep``); rows that share a mask
    (all of them, after channel pruning) share a solve."""
    rows = np.zeros_like(rhs)
    masks, which = np.unique(keep, axis=0, return_inverse=True)
    for m, kept in enumerate(masks):
        same = np.flatnonzero(which.reshape(-1) == m)
        rows[same] = _solve_kept(damped, inverse, rhs[same], kept)
    return rows


def _solve_kept(damped: np.ndarray, inverse: np.ndarray | None, rhs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """argmin ½wᵀAw − bᵀw with w zero off ``kept``, for each row b of ``rhs`` (rows sharing that mask): A_SS⁻¹ b_S
    on the kept set S, or, when fewer inputs are pruned (P) than kept, the same from A⁻¹ = H:
    w = Hb − H_{:,P} H_PP⁻¹ (Hb)_P (a Lagrange multiplier per pruned weight), a |P|-sized solve."""
    w = np.zeros_like(rhs)
    pruned = np.flatnonzero(~kept)
    if inverse is not None and pruned.size < kept.sum():
        free = rhs @ inverse  # H is symmetric: each row is (H b)ᵀ
        w = free - np.linalg.solve(inverse[np.ix_(pruned, pruned)], free[:, pruned].T).T @ inverse[pruned]
        w[:, pruned] = 0.0  # exactly zero, not rounding noise
    elif kept.any():
        s = np.flatnonzero(kept)
        w[:, s] = np.linalg.solve(damped[np.ix_(s, s)], rhs[:, s].T).T
    return w


def _inverse(damped: np.ndarray) -> np.ndarray:
    """A⁻¹ of a symmetric positive definite A, from its Cholesky factor."""
    lower_inv = np.linalg.inv(np.linalg.cholesky(damped))
    return lower_inv.T @ lower_inv


def _residual(rows: np.ndarray, xtx: np.ndarray, xty: np.ndarray) -> float:
    """Σ_o ||X w_o - y_o||² less ΣY² (which the caller adds once per layer): Σ_o wᵀXᵀXw - 2wᵀXᵀy."""
    return float(np.sum((rows @ xtx) * rows) - 2 * np.sum(rows * xty.T))


def layer_levels(graph, layers) -> list[int]:
    """Per layer, the largest number of prunable layers on a path from the graph inputs to its data input."""
    by_node = {id(layer.node): i for i, layer in enumerate(layers)}
    depth, levels = {}, [0] * len(layers)
    graph.toposort()
    for node in graph.nodes:
        level = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in by_node:
            level = depth.get(node.inputs[0].name, 0)
            levels[by_node[id(node)]] = level
            level += 1
        for t in node.outputs:
            depth[t.name] = level
    return levels


def gram_bytes(layer) -> int:
    """The float64 bytes of a layer's XᵀX and XᵀY."""
    groups, length, per_group = patch_size(layer)
    return 8 * groups * length * (length + per_group)


def skip_reason(layer, shared: bool, max_gram_mb: float) -> str | None:
    """Why a layer is not refitted, or None."""
    if layer.op not in ("Conv", "Gemm", "MatMul"):
        return f"{layer.op} is not refitted"
    if layer.op == "MatMul" and len(layer.weight.shape) != 2:
        return "MatMul weight of rank > 2"
    if layer.weight.values.dtype != np.float32:
        return f"{layer.weight.values.dtype} weight (float32 only)"
    if shared:
        return "weight shared by several layers"
    if gram_bytes(layer) > max_gram_mb * 2**20:
        return f"Gram matrix of {gram_bytes(layer) / 2**20:.0f} MB exceeds --max-gram-mb {max_gram_mb:g}"
    return None


def work_reason(work: GramWork | None, samples: int, batch: int = 1) -> str | None:
    """Why a layer's Gram pass is not run, whose cost ``work`` is per sample (see :func:`asr_onnx.refit.gram.gram_work`):
    more than :data:`MAX_GRAM_MACS` multiply-adds over ``samples``, or, for the smallest batch it can run
    (``batch``: 1, or a fixed batch), more than :data:`MAX_NODE_MACS` in one node or :data:`MAX_BATCH_BYTES` in
    one tensor. None when it fits, or when the shapes are not known."""
    if work is None:
        return None
    size = f"patch {work.length} x {work.positions} positions"
    if work.macs * samples > MAX_GRAM_MACS:
        return (f"its Gram pass needs {work.macs * samples:.2g} multiply-adds ({size} x {samples} samples), over "
                f"the bound of {MAX_GRAM_MACS:.0g}: lower --refit-samples")
    what = "one sample" if batch == 1 else f"a batch of {batch}"
    if work.node_macs * batch > MAX_NODE_MACS:
        return (f"its Gram products need {work.node_macs * batch:.2g} multiply-adds in one node for {what} ({size}), "
                f"over the bound of {MAX_NODE_MACS:.2g}")
    if work.tensor_bytes * batch > MAX_BATCH_BYTES:
        return (f"its Gram pass makes a {work.tensor_bytes * batch / 2**30:.1f} GiB tensor for {what} ({size}), "
                f"over the bound of {MAX_BATCH_BYTES / 2**30:g} GiB")
    return None


def refit_batch(works: list, batch: int) -> int:
    """The largest batch up to ``batch`` in which every layer's Gram pass of ``works`` (None: not run, or shapes
    unknown) stays under :data:`asr_onnx.refit.gram.MAX_NODE_MACS` in each node that cannot be cut into blocks, and
    under :data:`MAX_BATCH_BYTES` per tensor."""
    for work in works:
        if work is not None:
            batch = min(batch, int(MAX_NODE_MACS // max(work.node_macs, 1.0)),
                        int(MAX_BATCH_BYTES // max(work.tensor_bytes, 1.0)))
    return max(batch, 1)


def calib_shapes(model, calib) -> dict:
    """Tensor name -> dims of ``model``'s graph inputs and the tensors computed from them, fed with ``calib``:
    each input's declared batch dim and the data's other dims (as declared where inference on those fails,
    see :func:`asr_onnx.model.graph.static_shapes`)."""
    from asr_onnx.model.graph import static_shapes

    sample = next(iter(calib.batches(1)), None)
    dims = {}
    for value in model.graph.input:
        if sample is not None and value.name in sample and value.type.HasField("tensor_type"):
            declared = value.type.tensor_type.shape.dim
            if len(declared) == sample[value.name].ndim >= 1:
                first = declared[0].dim_value if declared[0].HasField("dim_value") else (declared[0].dim_param or "N")
                dims[value.name] = (first,) + tuple(sample[value.name].shape[1:])
    shapes = static_shapes(model, dims=dims) if dims else {}
    return dict(dims, **shapes) if shapes else static_shapes(model)


def reconstruct(dense, pruned, calib, *, batch_size: int, device: str = "auto", threads: int = 0,
                progress: bool = False, max_gram_mb: float = 256.0, damping: float = DAMPING, passes: int = 0,
                frontier_mb: float = FRONTIER_MB, max_frontier_mb: float = 8192.0, row_scales: list | None = None,
                held_out: list | None = None, masks: list | None = None, target: str = "layer"):
    """Refits every prunable layer of ``pruned``, level by level, against ``dense``.

    A layer is left as it is when it lost no weight and nothing upstream changed (its refit is itself).
    Each level's pass starts from the activations (pruned and dense) where the previous pass stopped, kept
    per batch (see :mod:`asr_onnx.refit.frontier`), and runs only the part of both networks up to that level.

    The work is bounded by the sizes involved (:func:`work_reason`, :func:`refit_batch`): a layer whose Gram
    pass would exceed :data:`MAX_GRAM_MACS` multiply-adds, or whose one sample would exceed the per-node or
    per-tensor bound, is skipped with its sizes; the batch shrinks until every other one fits. Each batch runs
    so that a signal stops it between nodes (:mod:`asr_onnx.model.stoppable`), and the kept frontier is removed on
    the way out, whatever ends the refit.

    Args:
        dense, pruned: onnx.ModelProto of the same graph, ``pruned`` with zeroed weights.
        calib: the calibration set.
        batch_size, device, threads, progress: as for the statistics passes.
        max_gram_mb: skip a layer whose float64 XᵀX and XᵀY would exceed this. Defaults to 256.
        damping: see :func:`refit_rows`. Defaults to 0.01.
        passes: Gram passes over the calibration set; 0 is one per depth level (exactly sequential). With
            fewer, consecutive levels share a pass, and a layer's input then comes from the network whose
            earlier passes' layers are refitted and the same pass's only pruned; such passes run the whole
            network prefix each time. Defaults to 0.
        frontier_mb: MB of kept activations held in memory; the rest waits in a temporary folder (see
            :class:`asr_onnx.refit.frontier.BatchStore`). Defaults to FRONTIER_MB.
        max_frontier_mb: a frontier larger than this is not kept: the next pass starts from the last one
            kept (or from the calibration set) and runs more of the network. Defaults to 8192.
        row_scales: per layer, a factor per output row (or None) by which ``pruned``'s weights differ from
            the dense frame the refit solves in (a correction folded into the layer, see :func:`row_scales`):
            each refitted row is written times it, so that the layer keeps its correction. Defaults to None.
        held_out: ``calib`` cut into disjoint parts that cover it (the held-out parts of ``calib.folds``), or
            None. The passes then run part by part and keep each part's Gram sums, and every layer is also
            refitted, for each part, on the other parts' sums alone: the models a cross-fitted check holds that
            part out from, for the price of their solves and no pass more. Their layers' inputs are those of the
            network refitted on every part (docs/methods.md, "The guard's refits"). Needs ``passes`` 0.
            Defaults to None.
        masks: per layer (find_layers order), a :class:`asr_onnx.refit.obs.MaskRule` by which its mask is chosen
            again from its Gram sums (each held-out refit chooses its own from its sums), or None to keep the
            pruned mask; None for all keeps every mask. Defaults to None.
        target: "layer": each layer towards the dense layer's output; "block": the last layer of a residual
            branch (:func:`asr_onnx.refit.gram.block_targets`) towards the dense block output less the pruned
            skip, so that it also absorbs the error its skip carries, the others towards their own. Defaults
            to "layer".

    Returns:
        (the refitted onnx.ModelProto, per layer a dict: err_before, err_after, gram_size, cond, or
        skipped; timings {"gram": s, "solve": s}; the provider, or None when no pass ran; per part of
        ``held_out``, ``pruned`` refitted without that part, or [] without ``held_out``).
    """
    from asr_onnx.model.graph import find_layers, to_graph, to_model
    from asr_onnx.refit.gram import block_targets

    if target not in TARGETS:
        raise AsrError(f"unknown refit target {target!r}; choose one of {', '.join(TARGETS)}")
    if held_out is not None and (passes or row_scales is not None or sum(map(len, held_out)) != len(calib)):
        raise AsrError("held-out refits need one pass per level, no row scales, and parts that cover the set")
    graph = to_graph(pruned)
    layers = find_layers(graph)
    if masks is not None and len(masks) != len(layers):
        raise AsrError(f"{len(masks)} mask rules for {len(layers)} layers")
    levels = layer_levels(graph, layers)
    count = max(levels, default=-1) + 1
    if 0 < passes < count:  # consecutive levels share a pass
        levels = [level * passes // count for level in levels]
    uses: dict[str, int] = {}
    for layer in layers:
        uses[layer.weight.name] = uses.get(layer.weight.name, 0) + 1
    shapes = calib_shapes(pruned, calib)
    blocks = block_targets(graph, layers, shapes) if target == "block" else {}
    works = [gram_work(layer, shapes.get(layer.node.inputs[0].name), shapes.get(layer.output.name)) for layer in layers]
    fixed = fixed_batch(input_specs(pruned))
    if held_out is not None and fixed:
        raise AsrError("held-out refits need a model that takes any batch size")
    reasons = [skip_reason(layer, uses[layer.weight.name] > 1, max_gram_mb) or work_reason(work, len(calib), fixed or 1)
               for layer, work in zip(layers, works)]
    if not fixed:  # each batch's run stays short, so that a signal ends the refit at once
        batch_size = refit_batch([w for w, r in zip(works, reasons) if r is None], min(batch_size, len(calib)))
    dense_values = [layer.weight.values for layer in find_layers(to_graph(dense))]
    refits: list[dict] = [{} for _ in layers]
    changed = [bool((layer.weight.values != d).any()) for layer, d in zip(layers, dense_values)]
    timings, provider, model = {"gram": 0.0, "solve": 0.0}, None, pruned
    parts = [calib] if held_out is None else list(held_out)
    held_rows: list[dict] = [{} for _ in (held_out or [])]  # per part, layer index -> rows refitted without it
    options = dict(batch_size=batch_size, device=device, threads=threads, progress=progress)
    walk = None
    try:
        for level in range(max(levels, default=-1) + 1):
            todo = []
            for i, layer in enumerate(layers):
                if levels[i] != level:
                    continue
                reason = reasons[i]
                if reason is None and not changed[i] and not _upstream_changed(layer, graph, layers, changed):
                    reason = "dense, and its input is unchanged"
                if reason:
                    refits[i] = {"skipped": reason}
                else:
                    todo.append(i)
            if not todo:
                continue
            start = time.perf_counter()
            if passes:
                grams, provider = accumulate(dense, model, todo, calib, desc=f"gram {level + 1}", shapes=shapes,
                                             blocks=blocks, **options)
                per_part = [grams]
            else:
                if walk is None:
                    walk = _Walk(dense, pruned, options, frontier_mb, max_frontier_mb, shapes, blocks)
                later = any(levels[j] > level and reasons[j] is None for j in range(len(layers)))
                per_part, provider = walk.grams(todo, parts, level, keep=later)
                grams = [_merged(sums) for sums in zip(*per_part)]
            timings["gram"] += time.perf_counter() - start
            start = time.perf_counter()
            for n, (i, gram) in enumerate(zip(todo, grams)):
                layer = layers[i]
                if not all(np.isfinite(a).all() for a in (gram.xtx, gram.xty, gram.yy)):
                    refits[i] = {"skipped": "its Gram sums overflow float32 (activations too large to square)"}
                    continue
                rows = weight_rows(layer, dense_values[i])
                keep = weight_rows(layer, layer.weight.values) != 0
                rule = None if masks is None else masks[i]
                new_rows, info = refit_rows(rows, keep, gram, damping, rule=rule)
                if not np.isfinite(new_rows).all():
                    raise AsrError(f"the refit of layer {layer.name} is not finite")
                if row_scales is not None and row_scales[i] is not None:
                    new_rows = new_rows * row_scales[i][:, None]
                for k, rows_without in enumerate(held_rows):  # the same refit, on the sums of the other parts
                    rest = _merged([sums[n] for j, sums in enumerate(per_part) if j != k])
                    fitted = refit_rows(rows, keep, rest, damping, with_cond=False, rule=rule)[0].astype(np.float32)
                    if not np.isfinite(fitted).all():
                        raise AsrError(f"the held-out refit of layer {layer.name} is not finite")
                    rows_without[i] = from_rows(layer, fitted)
                layer.weight.values = from_rows(layer, new_rows.astype(np.float32))
                if walk is not None:
                    walk.both.set_weight(i, layer.weight.values)
                changed[i] = True
                refits[i] = dict(info, gram_size=int(gram.xtx.shape[-1]))
                if i in blocks:
                    refits[i]["target"] = "block"
            timings["solve"] += time.perf_counter() - start
            if passes:  # the next pass runs the whole network as refitted so far
                model = to_model(graph, pruned)
    finally:
        if walk is not None:
            walk.store.close()
    without = [_with_weights(pruned, rows_without) for rows_without in held_rows]
    return (to_model(graph, pruned) if any(changed) else pruned), refits, timings, provider, without


def _merged(sums: list[GramStats]) -> GramStats:
    """The Gram sums of several disjoint parts of the rows."""
    total = sums[0]
    for more in sums[1:]:
        total = total.merge(more)
    return total


def _with_weights(model, weights: dict):
    """``model`` with the weights ``weights`` (layer index in find_layers order -> values) in place of its own."""
    from asr_onnx.model.graph import find_layers, to_graph, to_model

    graph = to_graph(model)
    for i, layer in enumerate(find_layers(graph)):
        if i in weights:
            layer.weight.values = weights[i]
    return to_model(graph, model)


def _rows(layer):
    """The layer's weight as float64 rows, or None where the refit does not apply (see :func:`skip_reason`)."""
    if layer.op not in ("Conv", "Gemm", "MatMul") or (layer.op == "MatMul" and len(layer.weight.shape) != 2):
        return None
    return weight_rows(layer, layer.weight.values).astype(np.float64)


def row_scales(base, corrected) -> list:
    """Per layer, the factor per output row by which ``corrected``'s weights are ``base``'s (a correction
    folded into the layer; 1 where a row is zero or nothing was folded), by least squares on each row.

    Args:
        base, corrected: onnx.ModelProto of the same graph, such as a Repair's pruned model and its output.

    Returns:
        per layer (find_layers order) an array of one factor per output row, or None for a layer the
        refit does not apply to.

    Raises:
        AsrError: the graphs do not have the same layers.
    """
    from asr_onnx.model.graph import find_layers, to_graph

    pairs = list(zip(find_layers(to_graph(base)), find_layers(to_graph(corrected)), strict=False))
    if len(pairs) != len(find_layers(to_graph(base))) or any(a.weight.shape != b.weight.shape for a, b in pairs):
        raise AsrError("the corrected model does not have the layers of the pruned one")
    scales = []
    for a, b in pairs:
        old, new = _rows(a), _rows(b)
        if old is None or new is None:
            scales.append(None)
            continue
        norm = np.sum(old * old, axis=1)
        scale = np.sum(old * new, axis=1) / np.maximum(norm, np.finfo(np.float64).tiny)
        scales.append(np.where((norm > 0) & (scale != 0), scale, 1.0))  # a zeroed row keeps no frame to undo
    return scales


def unscaled_refit(base, refitted, scales: list, refits: list):
    """``base`` with the weights that :func:`reconstruct` refitted in ``refitted`` (with ``row_scales``),
    divided by those scales; ``base``'s zeros stay zero.

    Raises:
        AsrError: a weight would not be finite.
    """
    from asr_onnx.model.graph import find_layers, to_graph, to_model

    graph = to_graph(base)
    for layer, new, scale, refit in zip(find_layers(graph), find_layers(to_graph(refitted)), scales, refits,
                                        strict=True):
        if "err_after" not in refit:
            continue
        rows = _rows(new) / (1.0 if scale is None else scale[:, None])
        values = np.where(layer.weight.values != 0, from_rows(layer, rows), 0.0).astype(layer.weight.values.dtype)
        if not np.isfinite(values).all():
            raise AsrError(f"the second refit of layer {layer.name} is not finite")
        layer.weight.values = values
    return to_model(graph, base)


class _Walk:
    """The frontier passes of one refit: the store holds, per batch, the frontier at depth ``at`` of both
    networks (-1: nothing yet, the passes start from the calibration batches).

    Args:
        dense, pruned: the models, as for :func:`reconstruct`.
        options: batch_size, device, threads, progress.
        frontier_mb, max_frontier_mb: as for :func:`reconstruct`.
        shapes: tensor name -> dims of ``pruned`` on the calibration data (see :func:`calib_shapes`).
        blocks: index -> BlockTarget of the layers refitted towards their block output. Defaults to None.
    """

    def __init__(self, dense, pruned, options: dict, frontier_mb: float, max_frontier_mb: float, shapes: dict,
                 blocks: dict | None = None):
        from asr_onnx.refit.frontier import BatchStore
        from asr_onnx.refit.gram import SideBySide

        self.both, self.options, self.at = SideBySide(dense, pruned, shapes), options, -1
        self.store, self.cap = BatchStore(frontier_mb), max_frontier_mb * 2**20
        self.held = [t.name for t in self.both.graph.inputs]
        self.fixed = fixed_batch(input_specs(pruned))
        self.part_of: list[int] = []  # per batch of the passes, the part of the calibration set it is from
        self.blocks = blocks


    def grams(self, todo: list[int], parts: list, level: int, keep: bool):
        """Runs both networks from the held frontier to depth ``level``, returns per part of the calibration set
        (``parts``, run one after the other) the Gram sums of ``todo`` and, with ``keep``, holds the frontier at
        ``level`` for the next pass (unless it would exceed ``max_frontier_mb``: the next pass then starts from
        the frontier held now)."""
        from asr_onnx.model.session import Runner, batches

        wanted = self.both.frontier(level) if keep else []
        produced = [n for n in wanted if n not in self.held]
        batch_size, fixed = self.options["batch_size"], self.fixed
        if self.at < 0:
            self.part_of = []  # the part of each batch, in the order the store keeps them
            feeds, total = self._from_parts(parts, batch_size), sum(-(-len(part) // batch_size) for part in parts)
        else:
            feeds, total = (self.store.get(i) for i in range(len(self.store))), len(self.store)
        session = grams = None
        totals: list = [[None] * len(todo) for _ in parts]
        try:
            for index, (_, feed) in enumerate(batches(feeds, batch_size, fixed=fixed if self.at < 0 else None,
                                                      desc=f"gram {level + 1}", progress=self.options["progress"],
                                                      total=total)):
                if session is None:
                    segment, grams = self.both.segment(self.at, level, todo, {n: feed[n].dtype for n in self.held},
                                                       produced, fixed or batch_size, self.blocks)
                    session = Runner(segment, device=self.options["device"], threads=self.options["threads"],
                                     mem_pattern=False, what="the Gram graph", stoppable=True)
                    del segment
                    needed = [i.name for i in session.inputs]
                    outputs = [name for gram in grams for name in gram.names] + produced
                values = session.run(outputs, {n: feed[n] for n in needed})
                add_batch(totals[self.part_of[index]], grams, values)
                if keep and index == 0:  # the frontier of every batch is about the size of the first one's
                    size = sum((values[n] if n in produced else feed[n]).nbytes for n in wanted)
                    keep = size * total <= self.cap
                if keep:
                    self.store.put(index, {n: values[n] if n in produced else feed[n] for n in wanted})
            if session is None:
                raise AsrError("the calibration set has no batch to refit on")
            provider = session.provider
        finally:
            if session is not None:
                session.close()
        if keep:
            self.held, self.at = wanted, level
        if any(total is None for sums in totals for total in sums):
            raise AsrError("a part of the calibration set has no batch to refit on")
        return totals, provider

    def _from_parts(self, parts: list, batch_size: int):
        """The batches of every part in turn, the part of each recorded in ``part_of`` as it is read."""
        for k, part in enumerate(parts):
            for feed in part.batches(batch_size):
                self.part_of.append(k)
                yield feed


def _upstream_changed(layer, graph, layers, changed) -> bool:
    """Whether any changed layer lies upstream of ``layer``'s data input."""
    changed_nodes = {id(other.node) for other, c in zip(layers, changed) if c}
    seen, stack = set(), [layer.node.inputs[0]]
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for producer in tensor.inputs:
            if id(producer) in changed_nodes:
                return True
            stack.extend(producer.inputs)
    return False


def refit_corrected(dense, pruned, corrected, calib, **options) -> tuple:
    """Refits the kept weights again, from the corrected output: each layer's input now comes from the corrected
    network, and each layer keeps the correction folded into it while it is refitted (:func:`row_scales`).

    Args:
        dense, pruned: the models, as for :func:`reconstruct`.
        corrected: ``pruned`` with its corrections folded in.
        calib: the calibration set.
        **options: as for :func:`reconstruct`.

    Returns:
        (``pruned`` with the new weights and its masks unchanged, the refit records, the time split).
    """
    if corrected is None:
        raise AsrError("refit_corrected() needs a corrected output: run fold() first")
    scales = row_scales(pruned, corrected)
    refitted, refits, split, _, _ = reconstruct(dense, corrected, calib, row_scales=scales, **options)
    return unscaled_refit(pruned, refitted, scales, refits), refits, split
