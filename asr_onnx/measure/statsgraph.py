"""The statistics graph: a copy of the model whose only outputs are per-channel vectors of every site.

Each site's spread leaves the graph as a centred sum of squares (reductions), a training-mode BN's
variance, or a mean square (GlobalAveragePool moments), with the batch mean and the element count.
A site whose activations are too large to square in float32 is measured as x * 2**-k (``scales``), and
the host multiplies the scale back in float64. :func:`stats_model` returns the graph with one
:class:`StatReader` per site, which says where that site's statistics are and how to read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asr_onnx.measure.norms import Norm
from asr_onnx.measure.stats import ChannelStats
from asr_onnx.model.builder import GraphBuilder

FLOAT = 1  # onnx.TensorProto.FLOAT
STAT_PREFIX = "asr_stat."
SCALE_FROM = 2.0**32  # a site whose activations reach this magnitude is scaled before it is squared


def scale_exponent(magnitude: float) -> int:
    """The k for which x * 2**-k is at most 1 in magnitude, or 0 below :data:`SCALE_FROM` (no scaling).

    Squares of float32 values overflow above 1.8e19 (2**64) and sums of squares earlier; a power of two
    scales without rounding, so x * 2**-k and its statistics are exact to float32 as x's would be.
    """
    if not magnitude >= SCALE_FROM:  # also NaN
        return 0
    return min(int(np.ceil(np.log2(min(float(magnitude), 2.0**128)))), 126)  # 2**-126: float32's smallest normal number


CENTRED, MOMENTS, BIASED_VAR = "centred", "moments", "biased var"  # how a site's spread leaves the graph


@dataclass(frozen=True)
class StatReader:
    """Where one site's statistics are among a statistics graph's outputs, and how they become ChannelStats.

    Attributes:
        key: the site's key.
        mean: the output holding the batch mean per channel.
        spread: the output holding the spread: under :data:`CENTRED` the centred sum of squares, under
            :data:`MOMENTS` the mean square E[x^2], under :data:`BIASED_VAR` a training-mode BN's biased variance.
        formula: CENTRED, MOMENTS or BIASED_VAR.
        size: the output holding the element count of the site tensor, or None when ``per_sample`` gives it.
        per_sample: the static elements per channel and sample, or None (``size`` gives the count).
        absmax: the probe output of the largest |x|, or None without the probe.
        bad: the probe output that is NaN exactly for a sample with a NaN or Inf at the site, or None.
    """

    key: str
    mean: str
    spread: str
    formula: str
    size: str | None = None
    per_sample: int | None = None
    absmax: str | None = None
    bad: str | None = None

    def read(self, values: dict, samples: int, k: int = 0) -> ChannelStats:
        """This site's batch statistics from one run's outputs (name -> array), scaled back by 2**k in float64.

        Args:
            values: output name -> array.
            samples: the batch's samples (with ``per_sample``, the count is their product).
            k: the site was measured as x * 2**-k. Defaults to 0.
        """
        mean = self.mean_of(values)
        per_channel = samples * self.per_sample if self.size is None else float(values[self.size]) / mean.size
        spread = values[self.spread].astype(np.float64).ravel()
        if self.formula == CENTRED:
            m2 = spread
        elif self.formula == MOMENTS:  # E[x^2] - E[x]^2, floored at 0
            m2 = np.maximum(spread - mean**2, 0.0) * per_channel
        else:
            m2 = spread * per_channel
        return ChannelStats(per_channel, np.ldexp(mean, k), np.ldexp(m2, 2 * k))

    def mean_of(self, values: dict) -> np.ndarray:
        """The batch mean as measured (of x * 2**-k), in float64."""
        return values[self.mean].astype(np.float64).ravel()


@dataclass
class StatsGraph:
    """A statistics graph: the model whose outputs are the statistics, and one reader per measured site.

    Attributes:
        model: the onnx.ModelProto.
        readers: one :class:`StatReader` per measured site, in graph order.
    """

    model: object
    readers: list


def _scaled(b: "GraphBuilder", x, k: int):
    return x if k == 0 else b.op("Mul", [x, b.const(np.float32(2.0**-k), "scale")])


def _channel_view(b: GraphBuilder, x, channels: int, channel_last: bool):
    """Reshapes to (N, C, S) or (M, C) so that one reduction shape serves every rank."""
    shape = [-1, channels] if channel_last else [0, 0, -1]
    axes = [0] if channel_last else [0, 2]
    return b.op("Reshape", [x, b.const(np.array(shape, np.int64), "shape")]), axes


def _add_site(b: GraphBuilder, site, index, norm: Norm | None = None, fixed: bool = False, k: int = 0) -> list:
    """Adds the statistic outputs (mean, m2, size) of one site; with ``norm``, also renormalises the site.

    Args:
        norm: None, or the normalisation to renormalise the site with: with the batch's statistics
            (train mode; its mean and var are not used), or with ``fixed``, with its own mean and var (eval mode).
        fixed: see ``norm``. Defaults to False.
        k: the statistics are those of x * 2**-k (the renormalisation is not changed by it).
    """
    x, channels = site.tensor, _channels(site)
    if site.dtype != np.float32:
        x = b.op("Cast", [x], {"to": FLOAT})
    view, axes = _channel_view(b, x, channels, site.channel_last)
    scaled = _scaled(b, view, k)
    mean = b.reduce("ReduceMean", scaled, axes)
    centred = b.op("Sub", [scaled, mean])
    m2 = b.reduce("ReduceSumSquare", centred, axes)
    size = b.op("Size", [view], dtype=np.int64)
    outputs = []
    for name, tensor in (("mean", mean), ("m2", m2), ("size", size)):
        tensor.name = f"{STAT_PREFIX}{index}.{name}"
        outputs.append(tensor)
    if norm is not None:
        shape = (1, channels) if site.channel_last else (1, channels, 1)
        if not fixed:  # on the scaled tensor, with the epsilon scaled alike
            normed = _train_norm(b, (norm.scale, norm.bias, norm.eps * 4.0**-k), centred, m2, size, channels, shape)
        else:
            normed = _eval_norm(b, norm, view, shape)
        restored = b.op("Reshape", [normed, b.op("Shape", [site.tensor], dtype=np.int64)])
        if site.dtype != np.float32:
            restored = b.op("Cast", [restored], {"to": _onnx_type(site.dtype)}, dtype=site.dtype)
        _replace_uses(b.graph, site, restored)
    return outputs


def bn_kernel_fits(site, opset: int, fixed: bool = False) -> bool:
    """Whether one training-mode BatchNormalization can measure (and renormalise) the site.

    It needs opset >= 14 (the ``training_mode`` attribute), a float32 tensor with its channels on axis 1
    (a Gemm's 2-D output qualifies) and no renormalisation with ``fixed`` statistics. Defaults: ``fixed`` False.
    """
    on_axis_1 = not site.channel_last or (site.layer is not None and site.layer.op == "Gemm")
    return opset >= 14 and site.dtype == np.float32 and on_axis_1 and not fixed


def _add_site_bn(b: GraphBuilder, site, index, norm: Norm | None = None, k: int = 0) -> list:
    """One site's statistics from a training-mode BatchNormalization (momentum 0): its optional outputs
    are then the batch mean and the biased batch variance. With a train norm that node also does the
    renormalisation (a real BN becomes it); without one it is a side branch on the site tensor.

    BatchNormalization normalises with the biased variance; the scale is multiplied by
    sqrt((n - 1) / n), n the batch's elements per channel, so that the unbiased one is used, as in
    :func:`_train_norm` (up to eps / (n - 1) in the denominator). With ``k``, the node reads x * 2**-k and
    its epsilon is scaled alike, which leaves the renormalised output as it was.
    """
    import onnx_graphsurgeon as gs

    channels = _channels(site)
    scale, bias, eps = (norm.scale, norm.bias, norm.eps) if norm is not None else \
        (np.ones(channels), np.zeros(channels), 1e-5)
    eps, source = eps * 4.0**-k, _scaled(b, site.tensor, k)
    params = [b.const(np.asarray(v, np.float32).reshape(channels), "bn") for v in
              (scale, bias, np.zeros(channels), np.ones(channels))]
    size = b.op("Size", [site.tensor], dtype=np.int64)
    if norm is not None:
        count, dof = _count_and_dof(b, size, channels)
        params[0] = b.op("Mul", [params[0], b.op("Sqrt", [b.op("Div", [dof, count])])])
    mean = gs.Variable(f"{STAT_PREFIX}{index}.mean", dtype=np.float32)
    var = gs.Variable(f"{STAT_PREFIX}{index}.var", dtype=np.float32)
    attrs = {"epsilon": float(eps), "momentum": 0.0, "training_mode": 1}
    if norm is not None and site.bn is not None:
        site.bn.inputs[0] = source
        for i, param in enumerate(params):
            site.bn.inputs[1 + i] = param
        site.bn.attrs = attrs
        while len(site.bn.outputs) > 1:
            site.bn.outputs.pop()
        site.bn.outputs.extend([mean, var])
    else:
        normed = gs.Variable(b.fresh_name("normed"), dtype=np.float32)
        b.graph.nodes.append(gs.Node("BatchNormalization", b.fresh_name("TrainBN"), attrs, [source] + params,
                                     [normed, mean, var]))
        if norm is not None:
            _replace_uses(b.graph, site, normed)
    size.name = f"{STAT_PREFIX}{index}.size"
    return [mean, var, size]


def _add_site_moments(b: GraphBuilder, site, index, per_sample: int | None = None, k: int = 0) -> list:
    """One conv site's batch mean and mean square from GlobalAveragePool, which onnxruntime runs in its
    blocked (NCHWc) layout beside the Conv, so no layout copy and no centred copy of the tensor is made.
    With ``per_sample`` (the static elements per channel and sample) there is no Size node either,
    which would need the tensor in the plain layout.

    The variance is then E[x^2] - E[x]^2 per batch, whose float32 error is about 1e-6 * (mean^2 + var):
    the host checks mean^2 / var per batch and has a site whose mean is large against its spread measured
    by the centred reductions instead (``centred`` in :func:`stats_model`).
    """
    x = _scaled(b, site.tensor, k)
    mean = b.reduce("ReduceMean", b.op("GlobalAveragePool", [x]), [0])
    square = b.reduce("ReduceMean", b.op("GlobalAveragePool", [b.op("Mul", [x, x])]), [0])
    outputs = [mean, square]
    if per_sample is None:  # else the host knows the count: batch size x per_sample
        outputs.append(b.op("Size", [site.tensor], dtype=np.int64))
    for name, tensor in zip(("mean", "square", "size"), outputs):
        tensor.name = f"{STAT_PREFIX}{index}.{name}"
    return outputs


def _add_probe(b: GraphBuilder, site, index) -> list:
    """Two diagnostic outputs of a site: its largest |x| (for the scale) and, per sample, a sum that is
    NaN exactly when the sample has a NaN or Inf there (x - x is 0 for every finite x, in every opset)."""
    x = site.tensor if site.dtype == np.float32 else b.op("Cast", [site.tensor], {"to": FLOAT})
    rows = b.op("Reshape", [x, b.const(np.array([0, -1], np.int64), "shape")])
    bad = b.reduce("ReduceSumSquare", b.op("Sub", [rows, rows]), [1])
    flat = b.op("Reshape", [x, b.const(np.array([-1], np.int64), "shape")])
    absmax = b.reduce("ReduceMax", b.op("Abs", [flat]), [0])
    for name, tensor in (("absmax", absmax), ("bad", bad)):
        tensor.name = f"{STAT_PREFIX}{index}.{name}"
    return [absmax, bad]


def _train_norm(b: GraphBuilder, norm, centred, m2, size, channels: int, shape):
    """scale * (x - batch mean) / sqrt(batch var + eps) + bias, as BatchNormalization in training mode."""
    scale, bias, eps = norm
    # unbiased, as the stored running variance will be, so that one batch reproduces it exactly
    _, dof = _count_and_dof(b, size, channels)
    var = b.op("Div", [m2, dof])
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps))])])])
    gain = b.op("Mul", [inv_std, b.const(scale.reshape(shape).astype(np.float32))])
    return b.op("Add", [b.op("Mul", [centred, gain]), b.const(bias.reshape(shape).astype(np.float32))])


def _count_and_dof(b: GraphBuilder, size, channels: int):
    """Elements per channel n (from a Size node's total) and the unbiased divisor max(n - 1, 1), in-graph."""
    count = b.op("Div", [b.op("Cast", [size], {"to": FLOAT}), b.const(np.float32(channels))])
    return count, b.op("Max", [b.op("Sub", [count, b.const(np.float32(1))]), b.const(np.float32(1))])


def _eval_norm(b: GraphBuilder, norm: Norm, view, shape):
    """scale * (x - mean) / sqrt(var + eps) + bias with fixed statistics, as y = a * x + c."""
    scale, bias, eps, mean, var = (np.asarray(v, np.float64) for v in (norm.scale, norm.bias, norm.eps, norm.mean,
                                                                          norm.var))
    a = scale / np.sqrt(var + eps)
    c = bias - a * mean
    scaled = b.op("Mul", [view, b.const(a.reshape(shape).astype(np.float32))])
    return b.op("Add", [scaled, b.const(c.reshape(shape).astype(np.float32))])


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _channels(site) -> int:
    return site.bn.inputs[1].shape[0] if site.bn is not None else site.channels


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


def stats_model(model, norms: dict | None = None, keys=None, kernel: str = "reduce", scales: dict | None = None,
                centred=(), probe: bool = False, fixed: dict | None = None) -> StatsGraph:
    """A copy of ``model`` whose only outputs are per-channel statistics of every site.

    Args:
        model: onnx.ModelProto.
        norms: site key -> norms.Norm to renormalise that site with its batch statistics (its scale, bias
            and eps), as a BatchNormalization in training mode does. Defaults to None.
        keys: the sites to measure; the graph past them is dropped. Defaults to None (every site).
        kernel: "reduce" (ReduceMean, Sub, ReduceSumSquare: any provider, exact unbiased renormalisation)
            or "bn" (one training-mode BatchNormalization per site where :func:`bn_kernel_fits`, the
            reductions elsewhere; onnxruntime runs it on the CPU only). Defaults to "reduce".
        scales: site key -> k: that site's statistics are those of x * 2**-k (:func:`scale_exponent`),
            for the host to scale back. Defaults to None (k = 0 everywhere).
        centred: site keys that the GlobalAveragePool moments must not read (their mean is large against
            their spread): the centred reductions measure them. Defaults to none.
        probe: also output each site's largest |x| and per-sample NaN/Inf flags (:func:`_add_probe`), to
            diagnose a batch whose statistics are not finite. Defaults to False.
        fixed: site key -> norms.Norm to renormalise that site with the Norm's own (population) mean and
            var, as a BatchNormalization in eval mode does; a site is in ``norms`` or here, not in both.
            Defaults to None.

    Returns:
        the :class:`StatsGraph`: the statistics model and a reader per measured site, in graph order.
    """
    from asr_onnx.calib.specs import input_specs
    from asr_onnx.model.graph import find_layers, find_sites, opset, static_shapes, to_graph, to_model

    graph = to_graph(model)
    sites = find_sites(graph, find_layers(graph))
    builder = GraphBuilder(graph, opset(model))
    outputs, readers = [], []
    renorms = {**{key: (norm, False) for key, norm in (norms or {}).items()},
               **{key: (norm, True) for key, norm in (fixed or {}).items()}}
    # (an empty norms or fixed still builds the Size outputs, as a renormalising graph does)
    shapes = static_shapes(model) if kernel == "bn" and norms is None and fixed is None else {}
    batch_dims = {spec.shape[0] for spec in input_specs(model) if spec.shape and spec.shape[0] is not None}
    for index, site in enumerate(sites):
        wanted, (norm, is_fixed) = keys is None or site.key in keys, renorms.get(site.key, (None, False))
        if not wanted and norm is None:
            continue
        label, k = len(readers) if wanted else f"unused{index}", (scales or {}).get(site.key, 0)
        probed = _add_probe(builder, site, label) if probe and wanted else []
        per_sample = None
        if kernel != "bn" or not bn_kernel_fits(site, builder.opset, is_fixed) or (norm is None and site.key in centred):
            stats, formula = _add_site(builder, site, label, norm, is_fixed, k), CENTRED
        elif norm is not None or site.channel_last:
            stats, formula = _add_site_bn(builder, site, label, norm, k), BIASED_VAR
        else:
            per_sample = _per_sample(shapes.get(site.key), batch_dims)
            stats, formula = _add_site_moments(builder, site, label, per_sample, k), MOMENTS
        if wanted:
            outputs += stats + probed
            names = [t.name for t in stats + probed]
            readers.append(StatReader(site.key, names[0], names[1], formula,
                                      size=names[2] if per_sample is None else None, per_sample=per_sample,
                                      absmax=names[-2] if probed else None, bad=names[-1] if probed else None))
    graph.outputs = outputs
    graph.cleanup().toposort()
    return StatsGraph(_statistics_early(to_model(graph, model)), readers)


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
