"""Measurement: statistics sessions over the calibration set, per-batch statistics out of them.

:func:`measure_pruned` returns the whole :class:`Measurement` of a repair; :func:`measure` runs one
statistics graph (:mod:`asr_onnx.measure.statsgraph`) over the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import ChannelStats, merge_all
from asr_onnx.measure.statsgraph import FLOAT, MOMENTS, StatsGraph, scale_exponent, stats_model

SMALL_BATCH = 8  # under this many samples per run, train-mode renormalisation is replaced by levels
CANCELLATION = 100.0  # above this mean^2 / var, E[x^2] - E[x]^2 in float32 loses more than about 1e-4


@dataclass(frozen=True)
class SiteMap:
    """The sites of one pruned graph, found once, and what pruning changed about them.

    Attributes:
        sites: the graph.Site list, in graph order.
        touched: keys of the sites that a changed layer reaches (see :func:`touched_sites`).
        levels: site key -> level (see :func:`site_levels`).
    """

    sites: list
    touched: frozenset
    levels: dict


def site_map(pruned, dense_weights: dict, layernorm: bool = True) -> SiteMap:
    """The :class:`SiteMap` of a pruned onnx.ModelProto; ``dense_weights``: layer name -> the dense weight;
    ``layernorm``: with the LayerNorm sites (False: without them, as before they were sites). Defaults to True."""
    from asr_onnx.model.graph import find_layers, find_sites, to_graph

    graph = to_graph(pruned)
    layers = find_layers(graph)
    sites = [s for s in find_sites(graph, layers) if layernorm or s.ln is None]
    changed = {id(layer.node) for layer in layers
               if not np.array_equal(dense_weights.get(layer.name), layer.weight.values)}
    return SiteMap(sites, frozenset(touched_sites(graph, sites, changed)), site_levels(graph, sites))


def dense_weights(model) -> dict:
    """Layer name -> weight values of an onnx.ModelProto, which :func:`site_map` compares the pruned ones with."""
    from asr_onnx.model.graph import find_layers, to_graph

    return {layer.name: layer.weight.values for layer in find_layers(to_graph(model))}


def dense_keys(sites: list, reference: str) -> set[str]:
    """The sites whose reference needs the dense statistics: every site under "calib", those without a BN
    under "running" (a BN's reference is then its running statistics). Refuses an unknown reference."""
    from asr_onnx.measure.norms import check_reference

    check_reference(reference)
    return {s.key for s in sites if s.bn is None or reference == "calib"}


@dataclass(frozen=True)
class Measurement:
    """What a repair measured: every site's reference, and the dense and pruned statistics behind it.

    Attributes:
        sites: the pruned graph's sites (graph.Site), in graph order.
        touched: keys of the sites that a pruned layer reaches; the others' correction is the identity.
        reference: "calib" or "running" (see :func:`asr_onnx.measure.norms.reference`).
        references: site key -> norms.Norm, what the site's correction restores.
        dense: site key -> ChannelStats of the dense model, over the whole set (the sites measured).
        pruned: site key -> the pruned model's per-batch ChannelStats, upstream renormalised.
        provider: the onnxruntime provider of the pruned pass.
    """

    sites: list
    touched: frozenset
    reference: str
    references: dict
    dense: dict
    pruned: dict
    provider: str


def measure_dense(dense, calib, batch, *, keys=None, source=None, engine=None, **options) -> dict:
    """The dense model's per-channel statistics over ``calib`` under a :class:`asr_onnx.model.batch.BatchPolicy`
    (``keys``: these sites only; ``source``: the model's file, for an engine's workers): key -> ChannelStats."""
    batches, _ = measure(batch.for_stats(dense, dense), calib, desc="dense", keys=keys,
                         source=None if batch.plan else source, engine=engine,
                         **options | {"batch_size": batch.stats_size(len(calib))})
    return {key: merge_all(b) for key, b in batches.items()}


def measure_batched(pruned, dense_model, calib, sites: SiteMap, dense: dict, reference: str, batch, *,
                    sequential: bool = False, engine=None, **options) -> tuple:
    """:func:`measure_pruned` under a :class:`asr_onnx.model.batch.BatchPolicy`: the statistics graphs are built
    on a symbolic batch where the policy frees it, else on the pruned model's own batch, level by level
    (``options``' batch size is then replaced by the policy's).

    Returns:
        (the Measurement, the samples per run, whether the batch was freed).
    """
    model, size = batch.for_stats(pruned, dense_model), batch.stats_size(len(calib))
    if model is None:  # the pruned graph's batch cannot be freed: its own batch, level by level
        model, size = pruned, batch.size
    found = measure_pruned(model, calib, sites, dense, reference, sequential=sequential, engine=engine,
                           **options | {"batch_size": size})
    return found, size, model is not pruned


def measure_pruned(model, calib, sites: SiteMap, dense: dict, reference: str, *, sequential: bool = False,
                   engine=None, **options) -> Measurement:
    """Measures the pruned model with every touched site renormalised to its reference.

    Args:
        model: the pruned onnx.ModelProto to build the statistics graphs from (its batch may be freed).
        calib: the calibration set, in the order to read it.
        sites: the pruned graph's :class:`SiteMap`.
        dense: site key -> the dense model's ChannelStats; it must hold :func:`dense_keys`.
        reference: "calib" or "running".
        sequential: level by level (:func:`measure_levels`) instead of one pass, always in this process.
            Defaults to False.
        engine: where the one pass runs (see :func:`measure`). Defaults to None (this process).
        **options: batch_size, device, progress and threads, as for :func:`measure`.

    Raises:
        AsrError: the dense statistics lack a site or have another channel count (another model's).
    """
    from asr_onnx.measure.norms import magnitude, train_norm
    from asr_onnx.measure.norms import reference as site_reference

    missing = sorted(dense_keys(sites.sites, reference) - set(dense))
    if missing:
        raise AsrError(f"the dense statistics have no entry for {missing[0]!r}: they belong to another model")
    for site in sites.sites:
        given = dense.get(site.key)
        if given is not None and given.mean.size != site.channels:
            raise AsrError(f"the dense statistics of {site.key!r} have {given.mean.size} channels, the "
                           f"model has {site.channels}: they belong to another model")
    refs = {s.key: site_reference(s, dense.get(s.key), reference) for s in sites.sites}
    norms = {key: train_norm(ref) for key, ref in refs.items() if key in sites.touched}
    # a site whose reference says its activations are too large to square is scaled from the first batch
    scales = {key: k for key, ref in refs.items() if (k := scale_exponent(magnitude(ref)))}
    if sequential:
        pruned, provider = measure_levels(model, calib, norms=norms, desc="pruned", scales=scales,
                                          levels=sites.levels, **options)
    else:
        pruned, provider = measure(model, calib, norms=norms, desc="pruned", scales=scales, levels=sites.levels,
                                   engine=engine, keys={s.key for s in sites.sites}, **options)
    return Measurement(sites.sites, sites.touched, reference, refs, dense, pruned, provider)


def measure(model, calib, *, batch_size: int, device: str = "auto", norms=None, progress: bool = True, desc="measure",
            threads: int = 0, keys=None, kernel: str = "auto", source=None, scales=None, levels=None, engine=None):
    """Runs the calibration set through the augmented model.

    With ``norms`` and fewer than :data:`SMALL_BATCH` samples per run (a model that fixes a batch of 1),
    batch statistics are too noisy to renormalise with, so the sites are measured level by level
    instead: see :func:`measure_levels`.

    Args:
        model: onnx.ModelProto.
        calib: a calib.CalibSet.
        batch_size: samples per session run.
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        norms: site key -> norms.Norm to renormalise with batch statistics (see :func:`stats_model`).
            Defaults to None.
        progress: show a progress bar on a TTY. Defaults to True.
        desc: the progress bar's label.
        threads: onnxruntime intra-op threads; 0 lets it choose. Defaults to 0.
        keys: the sites to measure. Defaults to None (every site).
        kernel: see :func:`stats_model`; "auto" is "bn" on the CPU provider, else "reduce". Defaults to "auto".
        source: the file ``model`` was read from, for onnxruntime to open directly when the model runs
            unchanged (faster than serializing it). Defaults to None.
        scales: site key -> k, to measure x * 2**-k from the first batch on (see :func:`stats_model`); a
            site whose statistics overflow is scaled anyway, from the batch where they do. Defaults to None.
        levels: the model's :func:`site_levels`, if known, for a level-by-level measurement. Defaults to None.
        engine: a :mod:`asr_onnx.model.engine` engine; a distributed one runs the one-pass measurement on
            shards of whole batches and joins their per-batch statistics in shard order (the level-by-level
            measurement stays in this process). Defaults to None (this process).

    Returns:
        (site key -> list of per-batch ChannelStats, the provider used).

    Raises:
        AsrError: an activation is NaN or infinite (naming the site and the first sample), or no batch
            has the model's fixed batch size.
    """
    if norms and batch_size < SMALL_BATCH:
        return measure_levels(model, calib, batch_size=batch_size, device=device, norms=norms, progress=progress,
                              desc=desc, threads=threads, kernel=kernel, scales=scales, levels=levels)
    if norms is None and keys and set(keys) <= _matrix_outputs(model):  # e.g. only a classifier head
        return _run(lambda plan: StatsGraph(model, []), calib, batch_size, device, progress, desc, threads,
                    outputs=sorted(keys), source=source, model=model, engine=engine)
    kernel = _kernel(kernel, device)
    return _run(_builder(model, norms or None, keys, kernel), calib, batch_size, device, progress, desc, threads,
                scales=scales, engine=engine)


def _builder(model, norms, keys, kernel, fixed=None):
    """Makes the statistics graph for a plan (its scales and centred sites), with the probe outputs or not."""
    def build(plan: "_Plan", probe: bool = False) -> StatsGraph:
        return stats_model(model, norms, keys, kernel, scales=plan.scales, centred=plan.centred, probe=probe,
                           fixed=fixed)
    return build


def _matrix_outputs(model) -> set[str]:
    """The model's (N, C) outputs: their statistics need no extra graph, the model returns them anyway."""
    return {o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 2
            and o.type.tensor_type.elem_type == FLOAT}


def _kernel(kernel: str, device: str) -> str:
    from asr_onnx.model.session import providers

    if kernel == "auto":  # onnxruntime's CUDA BatchNormalization has no training mode
        return "bn" if providers(device)[0] == "CPUExecutionProvider" else "reduce"
    if kernel not in ("bn", "reduce"):
        raise AsrError(f"unknown statistics kernel {kernel!r}; use auto, bn or reduce")
    return kernel


def measure_levels(model, calib, *, batch_size: int, device: str, norms: dict, progress: bool, desc: str,
                   threads: int = 0, kernel: str = "auto", scales=None, levels: dict | None = None):
    """Train-mode measurement without batch statistics: one pass per level of the site graph.

    A site's level is the largest number of sites on a path from the inputs to it. In pass ``k``,
    every site of a lower level is renormalised with fixed statistics, its own population statistics
    from the pass that measured it, and the sites of level ``k`` are measured. Their statistics are
    then exactly those of the network whose upstream sites are recalibrated on the whole set, which
    is what train-mode renormalisation approximates batch by batch. ``levels``: the model's
    :func:`site_levels` when known. Defaults to None (found here).
    """
    if levels is None:
        from asr_onnx.model.graph import find_layers, find_sites, to_graph

        graph = to_graph(model)
        levels = site_levels(graph, find_sites(graph, find_layers(graph)))
    done, provider, count, kernel = {}, None, max(levels.values()) + 1, _kernel(kernel, device)
    for level in range(count):
        fixed = {key: _population(norms[key], stats) for key, stats in done.items() if key in norms}
        wanted = {key for key, at in levels.items() if at == level}
        label = f"{desc} {level + 1}/{count}"
        per_site, provider = _run(_builder(model, None, wanted, kernel, fixed), calib, batch_size, device, progress,
                                  label, threads, scales=scales)
        done.update(per_site)
    return done, provider


def _population(norm, batches: list["ChannelStats"]):
    """The Norm with the site's population mean and variance over every batch in place of its own."""
    total = merge_all(batches)
    return replace(norm, mean=total.mean, var=total.var)


def touched_sites(graph, sites, changed: set) -> set[str]:
    """Keys of the sites that a changed layer reaches: its own output, or anything computed from it.

    Every other site sees exactly the dense model's activations, so its exact correction is the
    identity, and renormalising it with batch statistics would only add noise.

    Args:
        graph: the pruned gs.Graph.
        sites: its sites.
        changed: the nodes (by id) of the layers whose weight pruning changed.
    """
    reached = set()
    graph.toposort()
    for node in graph.nodes:
        if id(node) in changed or any(t.name in reached for t in node.inputs):
            reached.update(t.name for t in node.outputs)
    return {site.key for site in sites if site.tensor.name in reached}


def site_levels(graph, sites) -> dict[str, int]:
    """Site key -> the largest number of sites on any path from the graph inputs to the site."""
    by_tensor = {site.tensor.name: site for site in sites}
    bn_sites = {id(site.bn): site for site in sites if site.bn is not None}
    depth, levels = {}, {}
    graph.toposort()
    for node in graph.nodes:
        if id(node) in bn_sites:  # a BN's output lies one level past its input
            level = levels.setdefault(bn_sites[id(node)].key, 0) + 1
        else:
            level = max((_after(t.name, depth, by_tensor) for t in node.inputs), default=0)
        for t in node.outputs:
            depth[t.name] = level
            if t.name in by_tensor:
                levels[t.name] = level
    for key in by_tensor:  # a site tensor that is a graph input
        levels.setdefault(key, 0)
    return levels


def _after(name: str, depth: dict, by_tensor: dict) -> int:
    """The level that a node reading ``name`` sees: one more past a virtual site's tensor."""
    site = by_tensor.get(name)
    return depth.get(name, 0) + (1 if site is not None and site.bn is None else 0)


@dataclass
class _Plan:
    """How each site is read: site key -> k for x * 2**-k, and the sites the moments must not read."""

    scales: dict = field(default_factory=dict)
    centred: set = field(default_factory=set)


def _run(build, calib, batch_size: int, device: str, progress: bool, desc: str, threads: int = 0,
         outputs: list | None = None, source=None, scales=None, model=None, engine=None):
    """Per-batch statistics of every site over the set; a last partial batch is skipped when the batch is fixed.

    A batch whose statistics are not finite, or whose GlobalAveragePool moments would cancel, is diagnosed
    (:func:`_replan`) and run again with the sites concerned scaled or centred, and so are the batches after it.

    Args:
        build: makes the StatsGraph of a :class:`_Plan`; called here so that the model proto, a copy of every
            weight, is freed once onnxruntime has its own.
        outputs: measure these (N, C) graph outputs of an unchanged model on the host instead, with
            the model's own session settings. Defaults to None.
        source: the unchanged model's file, opened by onnxruntime instead of the proto. Defaults to None.
        scales: the plan's first scales. Defaults to None.
        model: with ``outputs``, the model, to probe when an output is not finite. Defaults to None.
        engine: a distributed engine runs this on shards of whole batches (see :func:`_sharded`). Defaults
            to None (this process).
    """
    if engine is not None and engine.distributed:
        return _sharded(engine, build, calib, batch_size, device, desc, threads, outputs, scales, model)
    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.session import Runner, batches, providers

    plan = _Plan(dict(scales or {}))
    stats_graph = build(plan)
    readers = [] if outputs else stats_graph.readers
    keys = outputs or [reader.key for reader in readers]
    if not keys:  # no wanted site in this model: nothing to run
        return {}, providers(device)[0]
    fixed = fixed_batch(input_specs(stats_graph.model))
    session = Runner(source or stats_graph.model, device=device, threads=threads, mem_pattern=outputs is not None)
    del stats_graph
    names = outputs or session.output_names
    per_site: dict = {key: [] for key in keys}
    for start, feed in batches(calib, batch_size, fixed=fixed, desc=desc, progress=progress):
        samples = len(next(iter(feed.values())))
        while True:
            values = session.run(names, feed)
            if outputs:
                batch = {key: ChannelStats.of(values[key], -1) for key in keys}
                for key in keys:
                    _check_host(model, values[key], key, feed, start, device, threads)
                break
            batch = {r.key: r.read(values, samples, plan.scales.get(r.key, 0)) for r in readers}
            trouble = _trouble(batch, values, readers)
            if not trouble:
                break
            session.close()
            plan = _replan(build, plan, trouble, feed, start, device, threads)
            stats_graph = build(plan)
            readers = stats_graph.readers
            session = Runner(stats_graph.model, device=device, threads=threads, mem_pattern=False)
            del stats_graph
            names = session.output_names
        for key in keys:
            per_site[key].append(batch[key])
    provider = session.provider
    session.close()
    return per_site, provider


def _sharded(engine, build, calib, batch_size: int, device: str, desc: str, threads: int, outputs, scales, model):
    """:func:`_run` on every shard of ``calib`` on ``engine``'s workers; the per-batch statistics joined in shard
    order, so that each site's list is the single-process list, batch for batch.

    Each worker runs its sessions with ``threads`` (0: one thread, its share of the cluster) and opens the
    model from the proto it is sent, never from a path of this machine. A shard that replans (a batch whose
    statistics overflow or cancel) replans from that batch to its own end only; the later shards start from
    the first plan, which measures their batches the same up to float32 rounding.
    """
    def run(shard):
        return _run(build, shard, batch_size, device, False, desc, threads or 1, outputs, scales=scales, model=model)

    parts = engine.map(run, calib, batch_size, desc)
    per_site = {key: [stats for found, _ in parts for stats in found[key]] for key in parts[0][0]}
    return per_site, parts[0][1]


def _trouble(batch: dict, values: dict, readers: list) -> dict:
    """Site key -> "overflow" where a statistic is not finite, or "cancellation" where the moments'
    E[x^2] - E[x]^2 lost too much to float32 (mean^2 above :data:`CANCELLATION` times the variance)."""
    found = {}
    for reader in readers:
        stats = batch[reader.key]
        if not (np.isfinite(stats.mean).all() and np.isfinite(stats.m2).all()):
            found[reader.key] = "overflow"
        elif reader.formula == MOMENTS:
            square = values[reader.spread].astype(np.float64).ravel()
            spread = square - reader.mean_of(values) ** 2
            if np.any((square > 0) & (square > (CANCELLATION + 1) * np.maximum(spread, 0))):
                found[reader.key] = "cancellation"
    return found


def _replan(build, plan: _Plan, trouble: dict, feed: dict, start: int, device: str, threads: int) -> _Plan:
    """The plan that measures a troubled batch right: the moments' cancelling sites centred, and the scales
    that a probe run of the batch finds where a statistic overflowed.

    Raises:
        AsrError: an activation itself is NaN or infinite (see :func:`_probe`).
    """
    if "overflow" not in trouble.values():  # cancellation only: nothing to probe
        return _Plan(dict(plan.scales), plan.centred | set(trouble))
    probed = build(plan, probe=True)
    readers = probed.readers
    values = _probe(probed, feed, start, device, threads)
    scales, centred = dict(plan.scales), set(plan.centred)
    for reader in readers:
        key = reader.key
        absmax = float(values[reader.absmax].max())
        k = max(scales.get(key, 0), scale_exponent(absmax))
        if trouble.get(key) == "overflow" and k == scales.get(key, 0):
            k = scale_exponent(max(absmax, 2.0 ** (k + 32)))  # finite, yet it overflowed: scale further
        if k:
            scales[key] = k
        if trouble.get(key) == "cancellation":
            centred.add(key)
    if scales == plan.scales and centred == plan.centred:
        raise AsrError(f"the statistics at {next(iter(trouble))!r} are not finite although its activations are")
    return _Plan(scales, centred)


def _probe(probed: StatsGraph, feed: dict, start: int, device: str, threads: int) -> dict:
    """Runs one batch through a statistics graph built with ``probe``; returns its outputs.

    Raises:
        AsrError: an activation is NaN or infinite: the first site (in graph order) where one is, and the
            first calibration sample that has it (``start`` is the batch's first).
    """
    from asr_onnx.model.session import Runner

    readers = probed.readers
    with Runner(probed.model, device=device, threads=threads, mem_pattern=False) as session:
        del probed
        values = session.run(None, feed)
    for reader in readers:
        bad = np.flatnonzero(np.isnan(values[reader.bad].ravel()))
        if bad.size:
            raise AsrError(f"NaN or Inf in the activations at {reader.key!r}, first from calibration sample "
                           f"{start + bad[0]} (counting from 0); check the calibration data and the model")
    return values


def _check_host(model, values: np.ndarray, key: str, feed: dict, start: int, device: str, threads: int) -> None:
    """A graph output reduced on the host in float64 cannot overflow: a NaN or Inf in it is the model's.
    A probe of every site then finds where it starts."""
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if finite.all():
        return
    _probe(stats_model(model, probe=True), feed, start, device, threads)
    raise AsrError(f"NaN or Inf in the activations at {key!r}, first from calibration sample "
                   f"{start + int(np.flatnonzero(~finite)[0])} (counting from 0); check the calibration data "
                   "and the model")
