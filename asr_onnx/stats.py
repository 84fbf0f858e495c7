"""Per-channel statistics: in-graph reductions, a session over the calibration set, Chan's merge.

Only per-channel vectors leave the session: for each site, the batch mean, the batch's centred
sum of squares (no catastrophic cancellation) and the element count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import AsrError

FLOAT = 1  # onnx.TensorProto.FLOAT
STAT_PREFIX = "asr_stat."
PER_SAMPLE = "asr_onnx.per_sample"  # metadata of a statistics model: site index -> static count per sample


@dataclass
class ChannelStats:
    """Count, mean and centred sum of squares per channel, in float64.

    Attributes:
        count: elements per channel.
        mean: per-channel mean.
        m2: per-channel sum of squared deviations from the mean.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Unbiased variance, the convention of BatchNormalization's running variance."""
        return self.m2 / max(self.count - 1.0, 1.0)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Chan et al.'s parallel merge of two disjoint sets."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return ChannelStats(count, mean, m2)

    @classmethod
    def of(cls, x: np.ndarray, axis: int = 1) -> "ChannelStats":
        """Exact statistics of a full activation (a reference for tests and small data)."""
        moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        mean = flat.mean(axis=0)
        return cls(float(flat.shape[0]), mean, ((flat - mean) ** 2).sum(axis=0))


def merge_all(batches: list[ChannelStats]) -> ChannelStats:
    total = batches[0]
    for batch in batches[1:]:
        total = total.merge(batch)
    return total


def ema(batches: list[ChannelStats], prior_mean, prior_var, momentum: float):
    """PyTorch's running-statistics update over the batches, starting from the prior.

    Returns:
        (mean, var, prior_weight): the running mean and unbiased variance, and the weight
        (1 - momentum) ** len(batches) that the prior keeps.
    """
    mean, var = np.asarray(prior_mean, np.float64), np.asarray(prior_var, np.float64)
    for batch in batches:
        mean = (1 - momentum) * mean + momentum * batch.mean
        var = (1 - momentum) * var + momentum * batch.var
    return mean, var, (1 - momentum) ** len(batches)


# ---------------------------------------------------------------- the augmented graph


class _Builder:
    """Adds nodes to a gs graph, respecting the opset (Reduce* axes became an input at 18)."""

    def __init__(self, graph, opset: int):
        self.graph, self.opset, self.count = graph, opset, 0

    def _name(self, hint):
        self.count += 1
        return f"asr_{hint}_{self.count}"

    def op(self, op, inputs, attrs=None, dtype=np.float32, out=None):
        import onnx_graphsurgeon as gs

        out = out or gs.Variable(self._name(op.lower()), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self._name(op), attrs or {}, inputs, [out]))
        return out

    def const(self, values, hint="c"):
        import onnx_graphsurgeon as gs

        return gs.Constant(self._name(hint), np.asarray(values))

    def reduce(self, op, x, axes):
        if self.opset >= 18:
            return self.op(op, [x, self.const(np.array(axes, np.int64), "axes")], {"keepdims": 1})
        return self.op(op, [x], {"axes": list(axes), "keepdims": 1})


def _channel_view(b: _Builder, x, channels: int, channel_last: bool):
    """Reshapes to (N, C, S) or (M, C) so that one reduction shape serves every rank."""
    shape = [-1, channels] if channel_last else [0, 0, -1]
    axes = [0] if channel_last else [0, 2]
    return b.op("Reshape", [x, b.const(np.array(shape, np.int64), "shape")]), axes


def _add_site(b: _Builder, site, index, norm=None) -> list:
    """Adds the statistic outputs of one site; with ``norm``, also renormalises the site.

    Args:
        norm: None; (scale, bias, eps) for train-mode normalisation with the batch's statistics; or
            (scale, bias, eps, mean, var) for eval-mode normalisation with fixed (population) statistics.
    """
    x, channels = site.tensor, _channels(site)
    if site.dtype != np.float32:
        x = b.op("Cast", [x], {"to": FLOAT})
    view, axes = _channel_view(b, x, channels, site.channel_last)
    mean = b.reduce("ReduceMean", view, axes)
    centred = b.op("Sub", [view, mean])
    m2 = b.reduce("ReduceSumSquare", centred, axes)
    size = b.op("Size", [view], dtype=np.int64)
    outputs = []
    for name, tensor in (("mean", mean), ("m2", m2), ("size", size)):
        tensor.name = f"{STAT_PREFIX}{index}.{name}"
        outputs.append(tensor)
    if norm is not None:
        shape = (1, channels) if site.channel_last else (1, channels, 1)
        if len(norm) == 3:
            normed = _train_norm(b, norm, centred, m2, size, channels, shape)
        else:
            normed = _eval_norm(b, norm, view, shape)
        restored = b.op("Reshape", [normed, b.op("Shape", [site.tensor], dtype=np.int64)])
        if site.dtype != np.float32:
            restored = b.op("Cast", [restored], {"to": _onnx_type(site.dtype)}, dtype=site.dtype)
        _replace_uses(b.graph, site, restored)
    return outputs


def bn_kernel_fits(site, norm, opset: int) -> bool:
    """Whether one training-mode BatchNormalization can measure (and renormalise) the site.

    It needs opset >= 14 (the ``training_mode`` attribute), a float32 tensor with its channels on axis 1
    (a Gemm's 2-D output qualifies) and either no norm or a train-mode one.
    """
    on_axis_1 = not site.channel_last or site.layer.op == "Gemm"
    return opset >= 14 and site.dtype == np.float32 and on_axis_1 and (norm is None or len(norm) == 3)


def _add_site_bn(b: _Builder, site, index, norm=None) -> list:
    """One site's statistics from a training-mode BatchNormalization (momentum 0): its optional outputs
    are then the batch mean and the biased batch variance. With a train norm that node also does the
    renormalisation (a real BN becomes it); without one it is a side branch on the site tensor.

    BatchNormalization normalises with the biased variance; the scale is multiplied by
    sqrt((n - 1) / n), n the batch's elements per channel, so that the unbiased one is used, as in
    :func:`_train_norm` (up to eps / (n - 1) in the denominator).
    """
    import onnx_graphsurgeon as gs

    channels = _channels(site)
    scale, bias, eps = norm if norm is not None else (np.ones(channels), np.zeros(channels), 1e-5)
    params = [b.const(np.asarray(v, np.float32).reshape(channels), "bn") for v in
              (scale, bias, np.zeros(channels), np.ones(channels))]
    size = b.op("Size", [site.tensor], dtype=np.int64)
    if norm is not None:
        count = b.op("Div", [b.op("Cast", [size], {"to": FLOAT}), b.const(np.float32(channels))])
        dof = b.op("Max", [b.op("Sub", [count, b.const(np.float32(1))]), b.const(np.float32(1))])
        params[0] = b.op("Mul", [params[0], b.op("Sqrt", [b.op("Div", [dof, count])])])
    mean = gs.Variable(f"{STAT_PREFIX}{index}.mean", dtype=np.float32)
    var = gs.Variable(f"{STAT_PREFIX}{index}.var", dtype=np.float32)
    attrs = {"epsilon": float(eps), "momentum": 0.0, "training_mode": 1}
    if norm is not None and site.bn is not None:
        for i, param in enumerate(params):
            site.bn.inputs[1 + i] = param
        site.bn.attrs = attrs
        while len(site.bn.outputs) > 1:
            site.bn.outputs.pop()
        site.bn.outputs.extend([mean, var])
    else:
        normed = gs.Variable(b._name("normed"), dtype=np.float32)
        b.graph.nodes.append(gs.Node("BatchNormalization", b._name("TrainBN"), attrs, [site.tensor] + params,
                                     [normed, mean, var]))
        if norm is not None:
            _replace_uses(b.graph, site, normed)
    size.name = f"{STAT_PREFIX}{index}.size"
    return [mean, var, size]


def _add_site_moments(b: _Builder, site, index, per_sample: int | None = None) -> list:
    """One conv site's batch mean and mean square from GlobalAveragePool, which onnxruntime runs in its
    blocked (NCHWc) layout beside the Conv, so no layout copy and no centred copy of the tensor is made.
    With ``per_sample`` (the static elements per channel and sample) there is no Size node either,
    which would need the tensor in the plain layout.

    The variance is then E[x^2] - E[x]^2 per batch; float32 rounding of E[x^2] bounds its error at
    about 1e-7 * (mean^2 + var), negligible unless a channel's |mean| exceeds its std by 10^3.
    """
    mean = b.reduce("ReduceMean", b.op("GlobalAveragePool", [site.tensor]), [0])
    square = b.reduce("ReduceMean", b.op("GlobalAveragePool", [b.op("Mul", [site.tensor, site.tensor])]), [0])
    outputs = [mean, square]
    if per_sample is None:  # else the host knows the count: batch size x per_sample
        outputs.append(b.op("Size", [site.tensor], dtype=np.int64))
    for name, tensor in zip(("mean", "square", "size"), outputs):
        tensor.name = f"{STAT_PREFIX}{index}.{name}"
    return outputs


def _train_norm(b: _Builder, norm, centred, m2, size, channels: int, shape):
    """scale * (x - batch mean) / sqrt(batch var + eps) + bias, as BatchNormalization in training mode."""
    scale, bias, eps = norm
    # unbiased, as the stored running variance will be, so that one batch reproduces it exactly
    count = b.op("Div", [b.op("Cast", [size], {"to": FLOAT}), b.const(np.float32(channels))])
    dof = b.op("Max", [b.op("Sub", [count, b.const(np.float32(1))]), b.const(np.float32(1))])
    var = b.op("Div", [m2, dof])
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps))])])])
    gain = b.op("Mul", [inv_std, b.const(scale.reshape(shape).astype(np.float32))])
    return b.op("Add", [b.op("Mul", [centred, gain]), b.const(bias.reshape(shape).astype(np.float32))])


def _eval_norm(b: _Builder, norm, view, shape):
    """scale * (x - mean) / sqrt(var + eps) + bias with fixed statistics, as y = a * x + c."""
    scale, bias, eps, mean, var = (np.asarray(v, np.float64) for v in norm)
    a = scale / np.sqrt(var + eps)
    c = bias - a * mean
    scaled = b.op("Mul", [view, b.const(a.reshape(shape).astype(np.float32))])
    return b.op("Add", [scaled, b.const(c.reshape(shape).astype(np.float32))])


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _channels(site) -> int:
    return site.bn.inputs[1].shape[0] if site.bn is not None else site.layer.channels


def _replace_uses(graph, site, new):
    """Points the site's consumers at ``new``: the BN's output for a real BN, else the tensor's readers."""
    if site.bn is not None:
        out = site.bn.outputs[0]
        site.bn.outputs.clear()
        new_producer = new.inputs[0]
        new_producer.outputs[0] = out
        return
    for node in list(site.tensor.outputs):
        if node.name.startswith("asr_"):
            continue
        for i, t in enumerate(node.inputs):
            if t is site.tensor:
                node.inputs[i] = new
    graph.outputs = [new if t is site.tensor else t for t in graph.outputs]


def stats_model(model, norms: dict | None = None, keys=None, kernel: str = "reduce"):
    """A copy of ``model`` whose only outputs are per-channel statistics of every site.

    Args:
        model: onnx.ModelProto.
        norms: site key -> (scale, bias, eps) to renormalise that site with its batch statistics, as a
            BatchNormalization in training mode does, or -> (scale, bias, eps, mean, var) to renormalise it
            with fixed statistics (eval mode). Sites without an entry are left as they are. Defaults to None.
        keys: the sites to measure; the graph past them is dropped. Defaults to None (every site).
        kernel: "reduce" (ReduceMean, Sub, ReduceSumSquare: any provider, exact unbiased renormalisation)
            or "bn" (one training-mode BatchNormalization per site where :func:`bn_kernel_fits`, the
            reductions elsewhere; onnxruntime runs it on the CPU only). Defaults to "reduce".

    Returns:
        (augmented onnx.ModelProto, the sites in output order).
    """
    from .graph import find_layers, find_sites, input_specs, opset, static_shapes, to_graph, to_model

    graph = to_graph(model)
    sites = find_sites(graph, find_layers(graph))
    builder = _Builder(graph, opset(model))
    outputs, measured, counts = [], [], {}
    shapes = static_shapes(model) if kernel == "bn" and norms is None else {}
    batch_dims = {spec.shape[0] for spec in input_specs(model) if spec.shape and spec.shape[0] is not None}
    for index, site in enumerate(sites):
        wanted, norm = keys is None or site.key in keys, (norms or {}).get(site.key)
        if not wanted and norm is None:
            continue
        label = len(measured) if wanted else f"unused{index}"
        if kernel != "bn" or not bn_kernel_fits(site, norm, builder.opset):
            stats = _add_site(builder, site, label, norm)
        elif norm is not None or site.channel_last:
            stats = _add_site_bn(builder, site, label, norm)
        else:
            per_sample = _per_sample(shapes.get(site.key), batch_dims)
            stats = _add_site_moments(builder, site, label, per_sample)
            if per_sample is not None:
                counts[label] = per_sample
        if wanted:
            outputs += stats
            measured.append(site)
    graph.outputs = outputs
    graph.cleanup().toposort()
    augmented = _statistics_early(to_model(graph, model))
    if counts:
        entry = augmented.metadata_props.add()
        entry.key, entry.value = PER_SAMPLE, json.dumps(counts)
    return augmented, measured


def _per_sample(shape, batch_dims: set) -> int | None:
    """Elements per channel and sample of an (N, C, ...) tensor whose N is the inputs' batch dimension
    and whose other dimensions are static, else None."""
    if not shape or len(shape) < 3 or len(batch_dims) != 1 or shape[0] not in batch_dims:
        return None
    rest = shape[2:]
    return int(np.prod(rest)) if all(isinstance(d, int) and d > 0 for d in rest) else None


def _statistics_early(model):
    """Moves the statistic nodes that nothing reads to the end of the node list, last site first.

    onnxruntime orders execution by a reverse depth-first walk from the leaf nodes, expanding the
    last-listed leaf first. With the last site's reduction listed last, the whole network would run
    before any reduction and every site's activation would stay alive until the end (memory growing
    with the number of sites). Listed last site first, each reduction runs right after its producer.
    """
    outputs = {o.name for o in model.graph.output}
    read = {name for node in model.graph.node for name in node.input}

    def site_index(node):
        if any(name in read for name in node.output):
            return None
        stat = next((name for name in node.output if name.startswith(STAT_PREFIX) and name in outputs), None)
        return None if stat is None else int(stat.split(".")[1])

    nodes = list(model.graph.node)
    leaves = sorted((n for n in nodes if site_index(n) is not None), key=site_index, reverse=True)
    moved = {id(n) for n in leaves}
    order = [n for n in nodes if id(n) not in moved] + leaves
    copies = [type(n)() for n in order]
    for copy, node in zip(copies, order):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    return model


SMALL_BATCH = 8  # under this many samples per run, train-mode renormalisation is replaced by levels


def measure(model, calib, *, batch_size: int, device: str = "auto", norms=None, progress: bool = True, desc="measure",
            threads: int = 0, keys=None, kernel: str = "auto", source=None):
    """Runs the calibration set through the augmented model.

    With ``norms`` and fewer than :data:`SMALL_BATCH` samples per run (a model that fixes a batch of 1),
    batch statistics are too noisy to renormalise with, so the sites are measured level by level
    instead: see :func:`measure_levels`.

    Args:
        model: onnx.ModelProto.
        calib: a calib.CalibSet.
        batch_size: samples per session run.
        device: "auto", "cpu" or "cuda". Defaults to "auto".
        norms: see :func:`stats_model`. Defaults to None.
        progress: show a progress bar on a TTY. Defaults to True.
        desc: the progress bar's label.
        threads: onnxruntime intra-op threads; 0 lets it choose. Defaults to 0.
        keys: the sites to measure. Defaults to None (every site).
        kernel: see :func:`stats_model`; "auto" is "bn" on the CPU provider, else "reduce". Defaults to "auto".
        source: the file ``model`` was read from, for onnxruntime to open directly when the model runs
            unchanged (faster than serializing it). Defaults to None.

    Returns:
        (site key -> list of per-batch ChannelStats, the provider used).

    Raises:
        AsrError: a statistic is NaN or infinite, or no batch has the model's fixed batch size.
    """
    if norms is not None and batch_size < SMALL_BATCH:
        return measure_levels(model, calib, batch_size=batch_size, device=device, norms=norms, progress=progress,
                              desc=desc, threads=threads, kernel=kernel)
    if norms is None and keys and set(keys) <= _matrix_outputs(model):  # e.g. only a classifier head
        return _run(lambda: (model, None), calib, batch_size, device, progress, desc, threads, outputs=sorted(keys),
                    source=source)
    kernel = _kernel(kernel, device)
    return _run(lambda: stats_model(model, norms, keys, kernel), calib, batch_size, device, progress, desc, threads)


def _matrix_outputs(model) -> set[str]:
    """The model's (N, C) outputs: their statistics need no extra graph, the model returns them anyway."""
    return {o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 2
            and o.type.tensor_type.elem_type == FLOAT}


def _kernel(kernel: str, device: str) -> str:
    from .runtime import providers

    if kernel == "auto":  # onnxruntime's CUDA BatchNormalization has no training mode
        return "bn" if providers(device)[0] == "CPUExecutionProvider" else "reduce"
    if kernel not in ("bn", "reduce"):
        raise AsrError(f"unknown statistics kernel {kernel!r}; use auto, bn or reduce")
    return kernel


def measure_levels(model, calib, *, batch_size: int, device: str, norms: dict, progress: bool, desc: str,
                   threads: int = 0, kernel: str = "auto"):
    """Train-mode measurement without batch statistics: one pass per level of the site graph.

    A site's level is the largest number of sites on a path from the inputs to it. In pass ``k``,
    every site of a lower level is renormalised with fixed statistics, its own population statistics
    from the pass that measured it, and the sites of level ``k`` are measured. Their statistics are
    then exactly those of the network whose upstream sites are recalibrated on the whole set, which
    is what train-mode renormalisation approximates batch by batch.
    """
    from .graph import find_layers, find_sites, to_graph

    graph = to_graph(model)
    levels = site_levels(graph, find_sites(graph, find_layers(graph)))
    done, provider, count = {}, None, max(levels.values()) + 1
    for level in range(count):
        fixed = {key: tuple(norms[key][:3]) + _population(stats) for key, stats in done.items()}
        wanted = {key for key, at in levels.items() if at == level}
        label = f"{desc} {level + 1}/{count}"
        per_site, provider = _run(lambda: stats_model(model, fixed, wanted, _kernel(kernel, device)), calib,
                                  batch_size, device, progress, label, threads)
        done.update(per_site)
    return done, provider


def _population(batches: list["ChannelStats"]) -> tuple:
    total = merge_all(batches)
    return total.mean, total.var


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


def _run(build, calib, batch_size: int, device: str, progress: bool, desc: str, threads: int = 0,
         outputs: list | None = None, source=None):
    """Per-batch statistics of every site over the set; a last partial batch is skipped when the batch is fixed.

    Args:
        build: makes the (statistics model, sites); called here so that the model proto, a copy of
            every weight, is freed once onnxruntime has its own.
        outputs: measure these (N, C) graph outputs of an unchanged model on the host instead, with
            the model's own session settings. Defaults to None.
        source: the unchanged model's file, opened by onnxruntime instead of the proto. Defaults to None.
    """
    from .graph import _first_line, fixed_batch, input_specs, metadata
    from .progress import bar
    from .runtime import make_session, provider_of, providers, release_memory, runner

    augmented, sites = build()
    keys = outputs or [site.key for site in sites]  # the sites hold the whole graph, weights and all: let it go
    del sites
    if not keys:  # no wanted site in this model: nothing to run
        return {}, providers(device)[0]
    fixed = fixed_batch(input_specs(augmented))
    per_sample = {int(k): v for k, v in json.loads(metadata(augmented).get(PER_SAMPLE, "{}")).items()}
    try:
        session = make_session(source or augmented, device, threads, mem_pattern=outputs is not None)
    except AsrError:
        raise
    except Exception as e:  # onnxruntime's own errors: an unknown op, a bad graph
        raise AsrError(f"onnxruntime cannot load the model: {_first_line(e)}") from None
    del augmented
    names, run = outputs or [o.name for o in session.get_outputs()], runner(session)
    per_site = {key: [] for key in keys}
    total = -(-len(calib) // batch_size)
    for feed in bar(calib.batches(batch_size), total=total, desc=desc, enabled=progress):
        if fixed and len(next(iter(feed.values()))) != fixed:
            continue  # the model cannot take a partial batch; the statistics do not need it
        try:
            values = dict(zip(names, run(names, feed)))
        except Exception as e:
            raise AsrError(f"onnxruntime failed on a calibration batch: {_first_line(e)}") from None
        samples = len(next(iter(feed.values())))
        for index, key in enumerate(keys):
            if outputs:
                per_site[key].append(_checked(ChannelStats.of(values[key], -1), key))
                continue
            if index in per_sample:  # the count that a Size node would have given
                channels = values[f"{STAT_PREFIX}{index}.mean"].size
                values[f"{STAT_PREFIX}{index}.size"] = samples * per_sample[index] * channels
            per_site[key].append(_batch_stats(values, index, key))
    if not per_site[keys[0]]:
        raise AsrError(f"the calibration set has no full batch of {fixed} samples, the model's fixed batch size")
    provider = provider_of(session)
    del session, run
    release_memory()
    return per_site, provider


def _batch_stats(values: dict, index: int, key: str) -> ChannelStats:
    mean = values[f"{STAT_PREFIX}{index}.mean"].astype(np.float64).ravel()
    count = float(values[f"{STAT_PREFIX}{index}.size"]) / mean.size
    m2 = values.get(f"{STAT_PREFIX}{index}.m2")
    if m2 is None and f"{STAT_PREFIX}{index}.square" in values:  # E[x^2] - E[x]^2, floored at 0
        var = np.maximum(values[f"{STAT_PREFIX}{index}.square"].astype(np.float64).ravel() - mean**2, 0.0)
    elif m2 is None:  # the BN kernel gives the biased variance
        var = values[f"{STAT_PREFIX}{index}.var"].astype(np.float64).ravel()
    m2 = var * count if m2 is None else m2.astype(np.float64).ravel()
    return _checked(ChannelStats(count, mean, m2), key)


def _checked(stats: ChannelStats, key: str) -> ChannelStats:
    if not (np.isfinite(stats.mean).all() and np.isfinite(stats.m2).all()):
        raise AsrError(f"NaN or Inf in the activations at {key!r}; check the calibration data and the model")
    return stats
