"""Recalibration: each site's new normalisation, written into BN nodes or folded into layers.

Every site is treated as a BatchNormalization. A real BN keeps its own parameters. A layer with no
BN after it gets a *virtual* BN, ``scale = sqrt(dense_var + eps)``, ``bias = dense_mean``, running
statistics equal to the dense ones, which is the identity on the dense model. Recalibrating a
virtual BN and folding it into the layer's weight and bias is then the same operation as for a
real BN, and the dense model's per-channel statistics are the target. A LayerNorm site's virtual BN
sits on the LayerNorm's output and folds into its γ and β.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asr_onnx.correct.gains import full_gain, gain, shrink_lambda
from asr_onnx.errors import AsrError
from asr_onnx.measure.norms import Norm, floor_eps
from asr_onnx.measure.stats import ChannelStats, ema

PLACEMENTS = ("recal", "pre-bn")


@dataclass
class Correction:
    """A site's new normalisation.

    Attributes:
        mean, var: the running statistics to store.
        scale: the multiplier on the normalisation's scale (1 for exact recalibration).
        pre_gain: the multiplier on the layer's output rows before normalisation, or None.
        gain: the method's per-channel gain, for the report.
        lam: ASR's lambda, or None.
        collapsed: channels whose recalibrated variance is under the epsilon floor.
    """

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    pre_gain: np.ndarray | None
    gain: np.ndarray
    lam: float | None
    collapsed: np.ndarray


def correct_sites(measurement, method: str, *, correct_head: bool = True, **options) -> dict:
    """Every site's correction (:func:`correct`): site key -> Correction. A site the pruning did not touch,
    and the classifier head unless ``correct_head``, gets method "none"; ``options`` are :func:`correct`'s."""
    if method == "auto":
        raise AsrError("method auto is a choice among corrections: use auto() or run()")
    if measurement is None:
        raise AsrError("measure() must run before correct()")
    m = measurement
    return {s.key: correct(s, m.references[s.key], m.pruned[s.key],
                           "none" if (s.head and not correct_head) or s.key not in m.touched else method, **options)
            for s in m.sites}


def correct(site, ref: Norm, pruned: list[ChannelStats], method: str, *, placement: str = "recal",
            recal: str = "exact", momentum: float = 0.1, lambda_rule="median") -> Correction:
    """One site's correction.

    Args:
        site: the graph.Site.
        ref: its original normalisation (:func:`reference`).
        pruned: per-batch statistics of the site in the pruned network, upstream renormalised.
        method: none, bn, lw, naive or asr.
        placement: "recal" puts the gain into the recalibration's variance; "pre-bn" multiplies it
            into the layer before an ordinary recalibration (the literal order). Defaults to "recal".
        recal: "exact" (population statistics) or "momentum" (PyTorch's running average). Defaults to "exact".
        momentum: the running-average momentum. Defaults to 0.1.
        lambda_rule: ASR's lambda: median, mean or a number. Defaults to "median".
    """
    from asr_onnx.measure.stats import merge_all

    ones = np.ones_like(ref.var)
    if method == "none":
        return Correction(ref.mean, ref.var, ones, None, ones, None, np.zeros(0, np.int64))
    eps = floor_eps(ref.var, ref.eps)  # a BN's own epsilon may be 0: every division uses the floored one
    exact = merge_all(pruned)
    if recal == "exact":
        rec_mean, rec_var, prior = exact.mean, exact.var, 0.0
    elif recal == "momentum":
        rec_mean, rec_var, prior = ema(pruned, ref.mean, ref.var, momentum)
    else:
        raise AsrError(f"unknown recalibration {recal!r}; use exact or momentum")
    if placement == "pre-bn" and site.layer is not None:
        lam = shrink_lambda(lambda_rule, exact.var, eps) if method == "asr" else None
        g = ones if method == "bn" else gain(method, ref.var, exact.var, eps, lam)
        # the gain scales every batch the recalibration sees, but not the prior it starts from
        mean = prior * ref.mean + g * (rec_mean - prior * ref.mean)
        var = prior * ref.var + g**2 * (rec_var - prior * ref.var)
        return Correction(mean, _stored_var(var, ref.eps, eps), ones, g, g, lam, np.flatnonzero(exact.var < eps))
    if placement not in PLACEMENTS:
        raise AsrError(f"unknown placement {placement!r}; use recal or pre-bn")
    lam = shrink_lambda(lambda_rule, rec_var, eps) if method == "asr" else None
    g = gain(method, ref.var, rec_var, eps, lam)
    scale = g / full_gain(ref.var, rec_var, eps)
    return Correction(rec_mean, _stored_var(rec_var, ref.eps, eps), scale, None, g, lam,
                      np.flatnonzero(rec_var < eps))


def _stored_var(var, own_eps: float, eps: float) -> np.ndarray:
    """The running variance to store: ``var + eps - own_eps``, so that the BN, which adds its own epsilon,
    divides by sqrt(var + eps) as the measurement did (the same ``var`` when its own is above the floor)."""
    return var + (eps - own_eps) if eps > own_eps else var


def affine(ref: Norm, corr: Correction) -> tuple[np.ndarray, np.ndarray]:
    """The corrected normalisation as y = a * x + c on the layer's raw output x."""
    pre = 1.0 if corr.pre_gain is None else corr.pre_gain
    inv_std = ref.scale * corr.scale / np.sqrt(corr.var + ref.eps)
    return pre * inv_std, ref.bias - inv_std * corr.mean


# ---------------------------------------------------------------- writing into the graph


def write(graph, site, ref: Norm, corr: Correction) -> str:
    """Writes one correction; returns how: "bn", "bn-rescaled" (its scale, variance and epsilon divided by
    powers of two, see :func:`bn_exponent`), "folded", "folded-bn" (the BN could not hold it and was folded
    into its layer, and removed: ``site.bn`` is then None), "layernorm" (into a LayerNorm's γ and β, see
    :func:`fold_layernorm`) or "unchanged".

    Raises:
        AsrError: a value written would not be finite in the weights' dtype (named by the site).
    """
    if corr.pre_gain is None and np.array_equal(corr.mean, ref.mean) and np.array_equal(corr.var, ref.var) \
            and np.all(corr.scale == 1):
        return "unchanged"
    if site.ln is not None:
        _check_finite(site, fold_layernorm(site.ln, *affine(ref, corr)))
        return "layernorm"
    if site.bn is None:
        a, c = affine(ref, corr)
        _check_finite(site, fold_affine(graph, site.layer, a, c))
        return "folded"
    scale_t, bias_t, mean_t, var_t = site.bn.inputs[1:5]
    dtype = scale_t.values.dtype
    scale = ref.scale * corr.scale
    k = bn_exponent(scale, corr.var, site.eps, dtype)
    if k is None and site.layer is not None:  # no BN of this dtype computes it: the layer takes it
        a, c = affine(ref, corr)
        _check_finite(site, fold_affine(graph, site.layer, a, c))
        _remove_bn(site)
        return "folded-bn"
    k = k or 0  # None, with no layer to fold into: written as it is, and refused by name below
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by name below
        scale_t.values = (scale * 2.0**-k).astype(dtype)
        bias_t.values = np.asarray(ref.bias).astype(dtype)  # a calibration reference has its own bias
        mean_t.values = np.asarray(corr.mean).astype(dtype)
        var_t.values = (np.asarray(corr.var) * 4.0**-k).astype(dtype)
    if k:
        site.bn.attrs["epsilon"] = float(np.float32(site.eps * 4.0**-k))
    written = [scale_t, bias_t, mean_t, var_t]
    if corr.pre_gain is not None:
        written += fold_affine(graph, site.layer, corr.pre_gain, np.zeros_like(corr.pre_gain))
    _check_finite(site, written)
    return "bn-rescaled" if k else "bn"


def bn_exponent(scale, var, eps: float, dtype) -> int | None:
    """The k for which a BN stores ``scale`` 2^-k, ``var`` 4^-k and epsilon ``eps`` 4^-k: 0 when ``scale`` and
    ``var`` are finite in ``dtype``, else the smallest k that brings both under 2^-2 of its range, or None
    when no k gives the BN's function.

    A BN computes scale (x - mean) / sqrt(var + eps) + bias, which depends on scale and sqrt(var + eps) only
    through their ratio: powers of two change neither that ratio nor any digit. A dense variance can pass
    float32's range (3.4e38) while the activations, its square root, do not; the stored variance is then
    that statistic times 4^-k. The epsilon attribute is a float32, so from eps 4^-k under 2^-126 on it
    loses digits; the k is kept only while every channel's scale / sqrt(var + eps), recomputed from the
    values as stored, is within 8 roundings of ``dtype`` of the intended one.

    Args:
        scale, var: the BN's scale and running variance, float64, per channel.
        eps: its epsilon.
        dtype: the dtype of its parameters.
    """
    scale, var = np.asarray(scale, np.float64), np.asarray(var, np.float64)
    info = np.finfo(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(scale.astype(dtype)).all() and np.isfinite(var.astype(dtype)).all():
            return 0
    if not (np.isfinite(scale).all() and np.isfinite(var).all()) or np.any(var + eps <= 0):
        return None
    top = info.maxexp - 2  # room for var + eps, and for the kernel's own arithmetic
    need = max(np.log2(max(float(np.max(var)), 1.0)) / 2 - top / 2, np.log2(max(float(np.max(np.abs(scale))), 1.0)) - top)
    k = max(int(np.ceil(need)), 1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        stored_scale = (scale * 2.0**-k).astype(dtype).astype(np.float64)
        stored_var = (var * 4.0**-k).astype(dtype).astype(np.float64)
        stored_eps = float(np.float32(eps * 4.0**-k))
        ratio = stored_scale / np.sqrt(stored_var + stored_eps)
    wanted = scale / np.sqrt(var + eps)
    if not np.isfinite(ratio).all() or np.any(np.abs(ratio - wanted) > 8 * float(info.eps) * np.abs(wanted)):
        return None
    return k


def _remove_bn(site) -> None:
    """Takes a BN that directly follows its layer out of the graph: the layer writes the BN's output."""
    out = site.bn.outputs[0]
    site.bn.outputs.clear()
    site.layer.node.outputs[0] = out
    site.bn = None


def fold_bn(graph, site) -> None:
    """Folds a BN that directly follows its layer into the layer, and removes the BN node.

    Raises:
        AsrError: a folded value would not be finite in the weights' dtype.
    """
    scale, bias, mean, var = (np.asarray(t.values, np.float64) for t in site.bn.inputs[1:5])
    inv_std = scale / np.sqrt(var + floor_eps(var, site.eps))
    _check_finite(site, fold_affine(graph, site.layer, inv_std, bias - inv_std * mean))
    _remove_bn(site)


def fold_layernorm(node, a: np.ndarray, c: np.ndarray) -> list:
    """Makes a LayerNormalization output ``a * y + c`` per channel (y its output): γ' = a γ, β' = a β + c.

    With the exact recalibration's a = σ_dense / σ_pruned and c = μ_dense - a μ_pruned this is
    β' = a (β - μ_pruned) + μ_dense. Each value is computed in float64 and rounded once.

    Returns:
        the gs.Constants written.
    """
    scale = node.inputs[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = node.inputs[2].values.astype(np.float64) if has_bias else np.zeros(scale.values.size)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by name, not warned about
        gamma = (a * scale.values.astype(np.float64)).astype(scale.values.dtype)
        beta = (a * bias + c).astype(scale.values.dtype)
    return [_own_input(node, 1, gamma, "scale"), _own_input(node, 2, beta, "bias")]


def _own_input(node, index: int, value: np.ndarray, suffix: str):
    """Puts ``value`` into input ``index`` of ``node``: into its constant when no other node reads it, else (and
    where the optional input is absent) into a new one, so that a fold stays local. Returns the gs.Constant."""
    import onnx_graphsurgeon as gs

    current = node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else None
    if current is not None and len(current.outputs) == 1:
        current.values = value
        return current
    const = gs.Constant(f"{node.name or node.outputs[0].name}.asr_{suffix}", value)
    if index < len(node.inputs):
        node.inputs[index] = const
    else:
        node.inputs.append(const)
    return const


def _check_finite(site, constants) -> None:
    """Never writes NaN or Inf: every value a correction wrote must be finite (float32 overflows at 3.4e38)."""
    for const in constants:
        if not np.isfinite(const.values).all():
            raise AsrError(f"the correction at site {site.key!r} gives a non-finite value in {const.name!r}, "
                           "which would be written into the model; its statistics exceed the range of "
                           f"{const.values.dtype}")


def _own_weight(graph, layer):
    """The layer's weight, copied first when other nodes share it, so that a fold stays local."""
    import onnx_graphsurgeon as gs

    weight = layer.weight
    if len(weight.outputs) > 1:
        weight = gs.Constant(f"{weight.name}.{layer.name}", weight.values.copy())
        layer.node.inputs[1] = weight
        layer.weight = weight
    return weight


def _row_factor(layer, a: np.ndarray) -> np.ndarray:
    """``a`` shaped to broadcast over the weight's output-channel axis."""
    shape = layer.weight.shape
    if layer.op == "ConvTranspose":
        cin_group, cout_group = shape[0] // layer.groups, shape[1]
        factor = a.reshape(layer.groups, cout_group)[np.arange(shape[0]) // cin_group]
        return factor.reshape(factor.shape + (1,) * (len(shape) - 2))
    view = [1] * len(shape)
    view[layer.out_axis] = a.size
    return a.reshape(view)


def fold_affine(graph, layer, a: np.ndarray, c: np.ndarray) -> list:
    """Makes ``layer`` output ``a * x + c`` per channel, in its weight and bias (no node where a fold will do).

    Each value is computed in float64 and rounded once to the weight's dtype.

    Returns:
        the gs.Constants written.
    """
    import onnx_graphsurgeon as gs

    weight = _own_weight(graph, layer)
    dtype = weight.values.dtype
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by name, not warned about
        weight.values = (weight.values.astype(np.float64) * _row_factor(layer, a)).astype(dtype)
    node = layer.node
    if layer.op in ("Conv", "ConvTranspose", "Gemm"):
        # Gemm computes alpha * A @ B + beta * C: the scaled B carries alpha, so C takes beta now
        beta = float(node.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
        old = beta * _bias(node, a.size)
        with np.errstate(over="ignore", invalid="ignore"):
            bias = gs.Constant(f"{layer.name}.asr_bias", (a * old + c).astype(dtype))
        set_bias(layer, bias)
        return [weight, bias]
    if np.any(c != 0):
        with np.errstate(over="ignore", invalid="ignore"):
            shift = c.astype(dtype)
        return [weight, _add_bias(graph, layer, shift)]
    return [weight]


def _bias(node, channels: int) -> np.ndarray:
    import onnx_graphsurgeon as gs

    if len(node.inputs) <= 2 or not node.inputs[2].name:
        return np.zeros(channels)
    if not isinstance(node.inputs[2], gs.Constant):
        raise AsrError(f"{node.name}: its bias is computed at run time, so a correction cannot be folded into it")
    return node.inputs[2].values.astype(np.float64)


def _add_bias(graph, layer, c: np.ndarray):
    """A MatMul's shift goes into the Add that follows it when there is one, else into a new Add.

    Returns:
        the gs.Constant that holds the shift.
    """
    import onnx_graphsurgeon as gs

    out = layer.output
    consumers = out.outputs
    if len(consumers) == 1 and consumers[0].op == "Add":
        add = consumers[0]
        const = [t for t in add.inputs if isinstance(t, gs.Constant)]
        if len(const) == 1 and const[0].values.shape[-1:] == c.shape and len(const[0].outputs) == 1:
            with np.errstate(over="ignore", invalid="ignore"):
                const[0].values = (const[0].values.astype(np.float64) + c).astype(const[0].values.dtype)
            return const[0]
    shifted = gs.Variable(f"{out.name}.asr_shifted", dtype=out.dtype, shape=out.shape)
    for node in list(consumers):  # by index: graphsurgeon's synchronised lists refuse slice assignment
        for i, tensor in enumerate(node.inputs):
            if tensor is out:
                node.inputs[i] = shifted
    graph.outputs = [shifted if t is out else t for t in graph.outputs]
    if shifted in graph.outputs:
        shifted.name, out.name = out.name, f"{out.name}.asr_raw"
    shift = gs.Constant(f"{layer.name}.asr_shift_c", c)
    graph.nodes.append(gs.Node("Add", f"{layer.name}.asr_shift", inputs=[out, shift], outputs=[shifted]))
    return shift


def write_all(pruned, references: dict, corrections: dict, fold_bn_nodes: bool = False, *, like=None) -> tuple:
    """Writes every site's correction into a copy of ``pruned`` (BN initializers, or folded into the layer).

    Args:
        pruned: the pruned onnx.ModelProto.
        references: site key -> Norm (a Measurement's references).
        corrections: site key -> Correction.
        fold_bn_nodes: afterwards fold every BN that directly follows its layer into that layer. Defaults to False.
        like: the model whose opset and metadata the output keeps. Defaults to None (``pruned``).

    Returns:
        (the corrected onnx.ModelProto, site key -> what was written there).
    """
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model

    graph = to_graph(pruned)
    sites = find_sites(graph, find_layers(graph))
    written = {s.key: write(graph, s, references[s.key], corrections[s.key]) for s in sites if s.key in corrections}
    if fold_bn_nodes:
        for site in sites:
            if site.bn is not None and site.layer is not None:
                fold_bn(graph, site)
    graph.cleanup().toposort()
    return to_model(graph, like if like is not None else pruned), written


def set_bias(layer, bias) -> None:
    """Makes the gs.Constant ``bias`` the bias input of a Conv or Gemm layer (a Gemm's beta then 1)."""
    node = layer.node
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)
    if layer.op == "Gemm":
        node.attrs["beta"] = 1.0
