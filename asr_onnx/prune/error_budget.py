"""The allocation "error": per-layer sparsities from each layer's measured effect on the network's output.

OBC and SPDY (Frantar & Alistarh, 2022) build every layer compressed at several levels, measure what each costs,
and choose one level per layer under the global budget, assuming the costs add up. Here the cost of a layer at a
level is the relative squared error of the network's outputs against dense, ||f(x; W_l pruned) − f(x)||² /
||f(x)||² summed over every output, with only that layer pruned, on a seeded subset of the calibration data (a
layer's own output error is not commensurable across layers: an error early in the network or at its head costs
far more at the output than the same relative error in the middle; benchmarks/RESULTS.md, section 9). With the
score "obs" each layer is pruned as the refit prunes it on the dense input: OBS mask and least-squares refit of
its kept weights from the dense Gram sums (:func:`asr_onnx.refit.reconstruct.refit_rows`); with any other score,
by that score's mask without a refit.

The choice is exact: a dynamic programme over the budget (in units of at most :data:`MAX_UNITS` steps) picks the
levels of least summed error that prune at least the budget, then :func:`exact_counts` moves the remainder, a
weight at a time along each layer's error curve, until the pruned weights are exactly round(sparsity · weights),
the count every other allocation prunes.

Cost: with "obs", one Gram pass over the subset and the OBS solves of every layer at every level (all the
refitted weights are held until their passes); then per layer one pass of the dense network up to the layer
and, per level, one pass of what the layer reaches (:class:`_Passes`). On the bottleneck sample (54 layers,
six or seven levels) that is about 40 CPU-seconds (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from asr_onnx.errors import AsrError

if TYPE_CHECKING:
    from asr_onnx.model.session import Runner

# per-layer sparsities measured, besides 0 and the global one: on held-out images these 12 did better than
# (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), whose steps are too coarse for the widest layers (RESULTS, section 9)
LEVELS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
SAMPLES = 256  # calibration samples the errors are measured on
MAX_UNITS = 20_000  # steps of the budget in the dynamic programme (a weight each, up to this many weights)
GRAM_CHUNK_MB = 512.0  # dense Gram sums held at once while the refitted weights are made


@dataclass
class ErrorTable:
    """Each layer's network-output error at each level.

    Attributes:
        counts: (layers, levels) int64, the weights each level prunes; increasing along each row, column 0 is 0.
        errors: (layers, levels) float64, the relative squared output error with only that layer so pruned;
            column 0 is 0.
    """

    counts: np.ndarray
    errors: np.ndarray


def level_counts(sizes, sparsity: float, levels=LEVELS) -> np.ndarray:
    """(layers, levels) pruned-weight counts: 0, ``levels`` and ``sparsity`` itself (so that the uniform
    allocation is one of the choices and the budget can always be met), round(level · size) for each layer."""
    fractions = np.array(sorted({0.0, float(sparsity), *map(float, levels)}))
    return np.rint(np.outer(np.asarray(sizes, np.float64), fractions)).astype(np.int64)


def cheapest_levels(counts: np.ndarray, errors: np.ndarray, budget: int, max_units: int = MAX_UNITS) -> np.ndarray:
    """One level per layer of least summed error among those that prune at least ``budget`` weights.

    A dynamic programme over the budget: best[b] is the least error of the layers so far that prune b units
    (the last cell: b or more). A unit is ceil(budget / ``max_units``) weights, so that up to ``max_units``
    weights the choice is exact; beyond, each count is rounded to units and :func:`exact_counts` absorbs the
    difference.

    Args:
        counts: (layers, levels) weights pruned at each level, >= 0.
        errors: (layers, levels) the cost of each level.
        budget: the weights to prune in all.
        max_units: steps of the budget. Defaults to MAX_UNITS.

    Returns:
        (layers,) the index of each layer's level.

    Raises:
        AsrError: even the largest levels prune fewer than ``budget`` weights.
    """
    counts, errors = np.asarray(counts, np.int64), np.asarray(errors, np.float64)
    layers = counts.shape[0]
    if int(counts.max(axis=1).sum()) < budget:
        raise AsrError(f"the levels prune at most {int(counts.max(axis=1).sum())} weights, fewer than {budget}")
    if budget <= 0:
        return np.argmin(np.where(counts >= 0, errors, np.inf), axis=1)
    unit = max(1, math.ceil(budget / max_units))
    steps = np.rint(counts / unit).astype(np.int64) if unit > 1 else counts
    top = max(1, round(budget / unit))  # the last cell holds every total of at least the budget
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    level_of = np.zeros((layers, top + 1), np.int64)
    came_from = np.zeros((layers, top + 1), np.int64)
    cells = np.arange(top + 1)
    for layer in range(layers):
        new, level, source = np.full(top + 1, np.inf), np.zeros(top + 1, np.int64), np.zeros(top + 1, np.int64)
        for j, (step, cost) in enumerate(zip(steps[layer], errors[layer])):
            candidate, came = np.full(top + 1, np.inf), np.zeros(top + 1, np.int64)
            if step < top:  # below the budget, each total has one source
                candidate[step:top], came[step:top] = best[:top - step] + cost, cells[:top - step]
            low = max(top - step, 0)  # every total from here on reaches the budget
            came[top] = low + int(np.argmin(best[low:]))
            candidate[top] = best[came[top]] + cost
            better = candidate < new
            new[better], level[better], source[better] = candidate[better], j, came[better]
        best, level_of[layer], came_from[layer] = new, level, source
    # rounded to units, the largest levels may fall a unit or two short of the budget: the nearest total then
    cell = top if np.isfinite(best[top]) else int(np.flatnonzero(np.isfinite(best))[-1])
    chosen = np.zeros(layers, np.int64)
    for layer in range(layers - 1, -1, -1):
        chosen[layer], cell = level_of[layer, cell], came_from[layer, cell]
    return chosen


def exact_counts(counts: np.ndarray, errors: np.ndarray, chosen: np.ndarray, budget: int,
                 sizes=None) -> np.ndarray:
    """Per-layer pruned counts that sum to exactly ``budget``, from the chosen levels.

    The remainder moves along each layer's error curve (linear between its levels): weights are pruned where
    the next segment costs least per weight, or kept again where the segment below saves most, a segment at a
    time, until the total is exact; at most the layers moved stop between two levels.

    Args:
        counts, errors: as for :func:`cheapest_levels`.
        chosen: (layers,) each layer's level.
        budget: the weights to prune in all.
        sizes: (layers,) each layer's weights: beyond its top level a layer may take more, at its last
            segment's cost per weight, up to all but one. Defaults to None: the top level is the limit.

    Raises:
        AsrError: the layers cannot hold ``budget``.
    """
    counts, errors = np.asarray(counts, np.int64), np.asarray(errors, np.float64)
    layers = counts.shape[0]
    limit = counts[:, -1] if sizes is None else np.maximum(counts[:, -1], np.asarray(sizes, np.int64) - 1)
    if not 0 <= budget <= int(limit.sum()):
        raise AsrError(f"cannot prune {budget} weights: the layers hold {int(limit.sum())}")
    pruned = counts[np.arange(layers), np.asarray(chosen)].astype(np.int64)

    def points(layer: int) -> tuple[np.ndarray, np.ndarray]:  # the curve, strictly increasing in the count
        xs, ys = counts[layer], errors[layer]
        keep = np.r_[True, np.diff(xs) > 0]
        xs, ys = xs[keep], ys[keep]
        if limit[layer] > xs[-1]:  # extended at the last segment's slope
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
            xs, ys = np.r_[xs, limit[layer]], np.r_[ys, ys[-1] + slope * (limit[layer] - xs[-1])]
        return xs, ys

    curves = [points(layer) for layer in range(layers)]
    remainder = budget - int(pruned.sum())
    while remainder:
        moves = []  # (cost per weight, layer, weights it can move)
        for layer, (xs, ys) in enumerate(curves):
            at = pruned[layer]
            here = np.interp(at, xs, ys)
            if remainder > 0 and at < xs[-1]:
                nxt = xs[np.searchsorted(xs, at, side="right")]
                moves.append(((np.interp(nxt, xs, ys) - here) / (nxt - at), layer, nxt - at))
            elif remainder < 0 and at > 0:
                prev = xs[np.searchsorted(xs, at, side="left") - 1]
                moves.append((-(here - np.interp(prev, xs, ys)) / (at - prev), layer, at - prev))
        cost, layer, room = min(moves)  # least error added per weight pruned, or most saved per weight kept
        step = min(abs(remainder), int(room))
        pruned[layer] += step if remainder > 0 else -step
        remainder += -step if remainder > 0 else step
    return pruned


def error_counts(table: ErrorTable, budget: int, sizes=None, max_units: int = MAX_UNITS) -> np.ndarray:
    """Per-layer pruned counts of least summed error that sum to exactly ``budget`` (:func:`cheapest_levels`,
    then :func:`exact_counts`); each layer's errors are first made non-decreasing in its count (pruning more
    is never taken to help, whatever the noise of the measurement)."""
    errors = np.maximum.accumulate(np.asarray(table.errors, np.float64), axis=1)
    chosen = cheapest_levels(table.counts, errors, budget, max_units)
    return exact_counts(table.counts, errors, chosen, budget, sizes)


class _Passes:
    """The dense outputs on the samples, and :meth:`error`: the network run with one layer's weight replaced.

    Only what that weight reaches is run again: per layer, one run of the dense network up to the cut (every
    tensor that the weight's descendants read from elsewhere) holds those tensors, and a session over the
    descendants alone, the weight its only input besides them, runs each level (the other weights stay
    constants, which onnxruntime folds and pre-packs: feeding every weight made each pass 2-3 times slower).

    Args:
        model: the dense onnx.ModelProto.
        sample: the calibration samples.
        batch_size, device, threads: the sessions'.
    """

    def __init__(self, model, sample, *, batch_size: int, device: str, threads: int):
        from asr_onnx.calib.specs import fixed_batch, input_specs
        from asr_onnx.model.session import Runner, batches

        self.model, self.device, self.threads = model, device, threads
        fixed = fixed_batch(input_specs(model))
        self.feeds = [feed for _, feed in batches(sample, fixed or batch_size, fixed=fixed)]
        with Runner(model, what="the model", device=self.device, threads=self.threads) as session:
            self.reference = [_floats(session.run(None, feed)) for feed in self.feeds]
        self.names = set(self.reference[0]) if self.reference else set()  # the float outputs, compared
        self.scale = max(sum(float(np.sum(y * y)) for outs in self.reference for y in outs.values()),
                         np.finfo(np.float64).tiny)
        self.session: Runner | None = None
        self.fed, self.at, self.cut = "", "", [dict(feed) for feed in self.feeds]
        self.reached: list[str] = []

    def _open(self, weight_name: str) -> None:
        """Holds the dense tensors at the cut of the weight ``weight_name`` and opens the session over its
        descendants, fed ``asr_alloc/<weight_name>`` in its place."""
        import onnx_graphsurgeon as gs

        from asr_onnx.model.graph import to_graph, to_model
        from asr_onnx.model.session import Runner

        self.close()
        graph = to_graph(self.model)
        readers = [node for node in graph.nodes if any(t.name == weight_name for t in node.inputs)]
        after, stack = {id(node) for node in readers}, list(readers)
        while stack:  # every node the weight reaches
            for tensor in stack.pop().outputs:
                for node in tensor.outputs:
                    if id(node) not in after:
                        after.add(id(node))
                        stack.append(node)
        inside = {id(t) for node in graph.nodes if id(node) in after for t in node.outputs}
        cut = {t.name: t for node in graph.nodes if id(node) in after for t in node.inputs
               if isinstance(t, gs.Variable) and id(t) not in inside}
        given = {t.name for t in graph.inputs}
        held = [name for name in cut if name not in given]
        self.cut = [{name: feed[name] for name in cut if name in given} for feed in self.feeds]
        if held:  # the dense network up to the cut, once per layer
            prefix = to_graph(self.model)
            tensors = prefix.tensors()
            prefix.outputs = [tensors[name] for name in held]
            for tensor in prefix.outputs:
                tensor.dtype, tensor.shape = None, None  # onnxruntime infers them
            prefix.cleanup()
            with Runner(to_model(prefix, self.model), what="the allocation's prefix", device=self.device, threads=self.threads) as session:
                for values, feed in zip(self.cut, self.feeds):
                    values.update(session.run(held, feed))
        weight = next(t for node in readers for t in node.inputs if t.name == weight_name)
        feed = gs.Variable(f"asr_alloc/{weight_name}", dtype=weight.values.dtype, shape=list(weight.shape))
        for node in readers:
            for j, tensor in enumerate(node.inputs):
                if tensor is weight:
                    node.inputs[j] = feed
        for name, tensor in cut.items():
            tensor.inputs.clear()  # no longer computed here: fed from the held values
            tensor.dtype, tensor.shape = self.cut[0][name].dtype, None
        graph.inputs = list(cut.values()) + [feed]
        graph.outputs = [t for t in graph.outputs if t.name in self.names and any(id(p) in after for p in t.inputs)]
        self.reached = [t.name for t in graph.outputs]  # the outputs the weight does not reach stay dense
        graph.cleanup()
        self.session = Runner(to_model(graph, self.model), what="the allocation's graph", device=self.device, threads=self.threads)
        self.at, self.fed = weight_name, feed.name

    def error(self, weight_name: str, values: np.ndarray) -> float:
        """||f(x) − f_dense(x)||² / ||f_dense(x)||² over every float output, with the weight ``weight_name``
        replaced by ``values``."""
        if self.at != weight_name:
            self._open(weight_name)
        total, session = 0.0, self.session
        assert session is not None
        for held, dense in zip(self.cut, self.reference):
            outputs = session.run(self.reached, {**held, self.fed: values})
            total += sum(float(np.sum((y.astype(np.float64) - dense[name]) ** 2)) for name, y in outputs.items())
        return total / self.scale

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def _floats(values: dict) -> dict[str, np.ndarray]:
    """A run's float outputs by name, in float64."""
    return {k: v.astype(np.float64) for k, v in values.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _refittable(layers: list, chosen: list[int], shared: set[str], shapes: dict, samples: int) -> list[int]:
    """The chosen layers whose pruned weights the refit makes from dense Gram sums (as the refit would)."""
    from asr_onnx.refit.gram import gram_work
    from asr_onnx.refit.reconstruct import skip_reason, work_reason

    return [i for i in chosen
            if skip_reason(layers[i], layers[i].weight.name in shared, 256.0) is None
            and work_reason(gram_work(layers[i], shapes.get(layers[i].node.inputs[0].name),
                                      shapes.get(layers[i].output.name)), samples) is None]


def measure_errors(model, layers: list, chosen: list[int], scores: list[np.ndarray], counts: np.ndarray, calib, *,
                   refit: bool = False, batch_size: int = 64, device: str = "auto", threads: int = 0,
                   samples: int | None = None, seed: int = 0, progress: bool = False) -> ErrorTable:
    """Each chosen layer's network-output error at each count, only that layer pruned (see the module).

    Args:
        model: the dense onnx.ModelProto.
        layers: its graph.Layer list (find_layers order), dense.
        chosen: the indices of the layers to measure, one per distinct weight.
        scores: per chosen layer, the ranking its mask follows (|w|, Wanda's or rownorm's score).
        counts: (len(chosen), levels) the weights each level prunes.
        calib: the calibration set.
        refit: prune as the refit does with the score "obs" (OBS mask and least-squares refit on the dense
            input) where the refit applies. Defaults to False: the scores' mask alone.
        batch_size, device, threads: the session's. Defaults to 64, "auto" and 0.
        samples: a seeded subset of this many calibration samples (all if fewer). Defaults to None: SAMPLES.
        seed: the subset's seed. Defaults to 0.
        progress: a progress bar on a TTY. Defaults to False.
    """
    from asr_onnx.progress import bar
    from asr_onnx.prune.masks import smallest

    samples = SAMPLES if samples is None else samples
    sample = calib.take(samples, seed) if hasattr(calib, "take") and len(calib) > samples else calib
    errors = np.zeros(counts.shape, np.float64)
    passes = _Passes(model, sample, batch_size=batch_size, device=device, threads=threads)
    try:
        made = _refitted(model, layers, chosen, scores, counts, sample, batch_size=batch_size, device=device,
                         threads=threads) if refit else {}
        todo = [(n, j) for n in range(len(chosen)) for j in range(counts.shape[1])
                if counts[n, j] > 0 and (j == 0 or counts[n, j] != counts[n, j - 1])]
        for n, j in bar(todo, total=len(todo), desc="allocation", enabled=progress):
            i, weight = chosen[n], layers[chosen[n]].weight.values
            values = made.get((n, j))
            if values is None:
                drop = smallest(scores[n].ravel(), int(counts[n, j])).reshape(weight.shape)
                values = np.where(drop, np.zeros((), weight.dtype), weight)
            errors[n, j] = passes.error(layers[i].weight.name, values)
        for n in range(len(chosen)):  # a level whose count equals the one before it: the same weights
            for j in range(1, counts.shape[1]):
                if counts[n, j] == counts[n, j - 1]:
                    errors[n, j] = errors[n, j - 1]
    finally:
        passes.close()
    return ErrorTable(np.asarray(counts, np.int64), errors)


def _refitted(model, layers, chosen, scores, counts, sample, *, batch_size, device, threads) -> dict:
    """(chosen position, level) -> the layer's weight pruned by OBS from the score's count and refitted on the
    dense input, for every layer the refit applies to; Gram sums are held a chunk of layers at a time."""
    from asr_onnx.prune.masks import smallest
    from asr_onnx.refit.gram import accumulate, from_rows, weight_rows
    from asr_onnx.refit.obs import MaskRule
    from asr_onnx.refit.reconstruct import calib_shapes, gram_bytes, refit_rows

    uses: dict[str, int] = {}
    for layer in layers:
        uses[layer.weight.name] = uses.get(layer.weight.name, 0) + 1
    shared = {name for name, n in uses.items() if n > 1}
    shapes = calib_shapes(model, sample)
    todo = _refittable(layers, chosen, shared, shapes, len(sample))
    position = {i: n for n, i in enumerate(chosen)}
    chunks: list[list[int]] = []
    chunk: list[int] = []
    held = 0.0
    for i in todo:
        size = gram_bytes(layers[i]) / 2**20
        if chunk and held + size > GRAM_CHUNK_MB:
            chunks.append(chunk)
            chunk, held = [], 0.0
        chunk.append(i)
        held += size
    chunks += [chunk] if chunk else []
    made = {}
    for chunk in chunks:
        grams, _ = accumulate(model, model, chunk, sample, batch_size=batch_size, device=device, threads=threads,
                              shapes=shapes)
        for i, gram in zip(chunk, grams):
            if not all(np.isfinite(a).all() for a in (gram.xtx, gram.xty, gram.yy)):
                continue  # activations too large to square: the score's mask alone, as the refit would skip it
            layer, n = layers[i], position[i]
            rule = MaskRule(None, int(np.prod(layer.weight.shape[2:])) if layer.op == "Conv" else 1)
            dense_rows = weight_rows(layer, layer.weight.values)
            for j in range(counts.shape[1]):
                if counts[n, j] == 0 or (j and counts[n, j] == counts[n, j - 1]):
                    continue
                drop = smallest(scores[n].ravel(), int(counts[n, j])).reshape(layer.weight.shape)
                keep = weight_rows(layer, ~drop)
                rows = refit_rows(dense_rows, keep, gram, with_cond=False, rule=rule)[0]
                if np.isfinite(rows).all():
                    made[n, j] = from_rows(layer, rows.astype(layer.weight.values.dtype))
    return made


def error_masks(model, layers: list, chosen: list[int], scores: list[np.ndarray], sparsity: float, calib, *,
                refit: bool = False, levels=None, **options) -> tuple[list[np.ndarray], ErrorTable, np.ndarray]:
    """Keep-masks of the chosen layers under the allocation "error", with exactly round(sparsity · weights)
    zeros in all.

    Args:
        model, layers, chosen, scores, calib, refit: as for :func:`measure_errors`.
        sparsity: the global fraction to prune, in [0, 1).
        levels: the per-layer sparsities measured (0 and ``sparsity`` are added). Defaults to None: LEVELS.
        **options: :func:`measure_errors`'s batch_size, device, threads, samples, seed, progress.

    Returns:
        (per chosen layer its keep-mask, the measured table, per chosen layer its count of zeros).
    """
    from asr_onnx.prune.masks import smallest

    sizes = np.array([layers[i].weight.values.size for i in chosen], np.int64)
    budget = round(sparsity * int(sizes.sum()))
    counts = level_counts(sizes, sparsity, LEVELS if levels is None else levels)
    if budget == 0:  # nothing to prune: nothing to measure
        table = ErrorTable(counts, np.zeros(counts.shape))
        pruned = np.zeros(len(chosen), np.int64)
    else:
        table = measure_errors(model, layers, chosen, scores, counts, calib, refit=refit, **options)
        pruned = error_counts(table, budget, sizes)
    keeps = [~smallest(score.ravel(), int(k)).reshape(score.shape) for score, k in zip(scores, pruned)]
    return keeps, table, pruned
