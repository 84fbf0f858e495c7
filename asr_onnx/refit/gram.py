"""The Gram graph: the pruned and the dense model side by side, whose only outputs are, per chosen layer,
XᵀX of the pruned layer's input patches, XᵀY with the dense layer's output, and ΣY² per output channel.

Patches are made in-graph (im2col as a depthwise Conv with one-hot kernels, or a reshape for a 1x1 Conv,
Gemm and MatMul) and reduced by a batched MatMul, so that only per-layer matrices leave the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asr_onnx.calib.specs import fixed_batch, input_specs
from asr_onnx.measure.stats import GramStats
from asr_onnx.model.builder import GraphBuilder

DENSE_PREFIX = "asr_dense/"


def patch_size(layer) -> tuple[int, int, int]:
    """(groups, patch length per group, output channels per group) of a Conv, Gemm or MatMul layer."""
    shape = layer.weight.shape
    if layer.op == "Conv":
        return layer.groups, int(np.prod(shape[1:])), shape[0] // layer.groups
    return 1, shape[layer.in_axis], shape[layer.out_axis]


def weight_rows(layer, values: np.ndarray) -> np.ndarray:
    """The weight as (output channels, patch length per group): the row each output channel dots with its patch."""
    if layer.op == "Conv":
        return values.reshape(values.shape[0], -1)
    return values if layer.out_axis == 0 else values.T


def from_rows(layer, rows: np.ndarray) -> np.ndarray:
    """The inverse of :func:`weight_rows`."""
    shape = layer.weight.shape
    if layer.op == "Conv":
        return rows.reshape(shape)
    return rows if layer.out_axis == 0 else rows.T


def one_hot_kernels(channels: int, kernel: tuple) -> np.ndarray:
    """Depthwise im2col weights (channels * k, 1, *kernel): output c * k + j copies input c at kernel offset j,
    the order in which a Conv weight (out, in, *kernel) flattens its input axis and kernel."""
    k = int(np.prod(kernel))
    eye = np.eye(k, dtype=np.float32).reshape(k, 1, *kernel)
    return np.tile(eye, (channels,) + (1,) * (len(kernel) + 1))


def _patches(b: GraphBuilder, layer, x):
    """The layer's input as (groups, patch length, rows)."""
    groups, length, _ = patch_size(layer)
    if layer.op != "Conv":
        flat = b.op("Reshape", [x, b.const(np.array([1, -1, length], np.int64), "shape")])
        return b.op("Transpose", [flat], {"perm": [0, 2, 1]})
    node, kernel = layer.node, tuple(layer.weight.shape[2:])
    channels = layer.weight.shape[1] * groups
    trivial = (all(k == 1 for k in kernel) and all(s == 1 for s in node.attrs.get("strides", [1]))
               and not any(node.attrs.get("pads", [0])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
    if not trivial:
        attrs = {key: node.attrs[key] for key in ("strides", "pads", "dilations", "auto_pad") if key in node.attrs}
        attrs.update(group=channels, kernel_shape=list(kernel))
        x = b.op("Conv", [x, b.const(one_hot_kernels(channels, kernel), "im2col")], attrs)
    view = b.op("Reshape", [x, b.const(np.array([0, groups, length, -1], np.int64), "shape")])
    moved = b.op("Transpose", [view], {"perm": [1, 2, 0, 3]})  # (groups, length, N, positions)
    return b.op("Reshape", [moved, b.const(np.array([0, length, -1], np.int64), "shape")])


def _target(b: GraphBuilder, layer, x, weight, as_rows: bool = True, skips: tuple | None = None):
    """The dense layer's output without bias, as (groups, channels per group, rows), or a Conv's as it is
    (N, channels, ...) when not ``as_rows``.

    Args:
        skips: (dense skip tensor, pruned skip tensor, :class:`BlockTarget`) for a block target: the output
            then gains (dense_skip − pruned_skip) / a per output channel. Defaults to None (the layer's own).
    """
    groups, _, per_group = patch_size(layer)
    if layer.op == "Conv":
        attrs = {key: layer.node.attrs[key] for key in ("strides", "pads", "dilations", "auto_pad", "group")
                 if key in layer.node.attrs}
        y = _with_skip(b, b.op("Conv", [x, weight], attrs), skips, len(layer.weight.shape))
        if not as_rows:
            return y
        view = b.op("Reshape", [y, b.const(np.array([0, groups, per_group, -1], np.int64), "shape")])
        moved = b.op("Transpose", [view], {"perm": [1, 2, 0, 3]})
        return b.op("Reshape", [moved, b.const(np.array([0, per_group, -1], np.int64), "shape")])
    if layer.out_axis == 0:  # Gemm with transB: the weight is (out, in)
        weight = b.op("Transpose", [weight], {"perm": [1, 0]})
    y = _with_skip(b, b.op("MatMul", [x, weight]), skips, 0)
    flat = b.op("Reshape", [y, b.const(np.array([1, -1, per_group], np.int64), "shape")])
    return b.op("Transpose", [flat], {"perm": [0, 2, 1]})


MIN_BLOCK_SCALE = 1e-3  # |a| below this fraction of the BN's largest |a|: that channel keeps its layer target


@dataclass(frozen=True)
class BlockTarget:
    """A layer whose output reaches a residual Add (through a BN or directly): its refit target becomes the
    dense block output less the pruned skip, z_d + (s_d − s_p) / a per output channel, so that the pruned
    block output a·z + b + s_p matches the dense one a·z_d + b + s_d (the BN, a·z + b, is the same in both).

    Attributes:
        skip: the Add's other input, by its name in the pruned graph (the dense one's is prefixed).
        inverse_scale: float64 1/a per output channel (1 without a BN), 0 where |a| is under
            :data:`MIN_BLOCK_SCALE` of the largest (the correction is left out there).
    """

    skip: str
    inverse_scale: np.ndarray


def _bn_scale(node) -> np.ndarray | None:
    """a = γ / sqrt(var + ε) of a BatchNormalization with constant parameters, float64, or None."""
    import onnx_graphsurgeon as gs

    if node.op != "BatchNormalization" or len(node.inputs) < 5 or not all(
            isinstance(t, gs.Constant) for t in node.inputs[1:5]):
        return None
    gamma, var = (node.inputs[i].values.astype(np.float64).ravel() for i in (1, 4))
    return gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))


def _from_layer(tensor, layer_nodes: set[int]) -> bool:
    """Whether ``tensor`` is a layer's output, or a BN's over a layer's output."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "BatchNormalization" and producer.inputs[0].inputs:
        producer = producer.inputs[0].inputs[0]
    return producer is not None and id(producer) in layer_nodes


def _reads(tensor, wanted) -> bool:
    """Whether ``tensor`` is ``wanted`` or is computed from it."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if t is wanted:
            return True
        if id(t) not in seen:
            seen.add(id(t))
            stack.extend(i for node in t.inputs for i in node.inputs)
    return False


def block_targets(graph, layers, shapes: dict) -> dict[int, BlockTarget]:
    """The layers (find_layers index) that are the last layer of a residual branch: L -> [BN] -> Add(branch,
    skip), each with one consumer, where the skip is computed (not a constant), has the branch's known
    shape (no broadcast), is no deeper than L's input (it is on hand, pruned and dense, when L is refitted),
    and, where it is a layer's output (or a BN's over one), is what the branch reads (the identity path of a
    block after one without a skip, as in MobileNetV2), not a branch of its own (a projection shortcut: two
    branches with layers keep the layer target).

    Args:
        graph: the pruned gs graph (toposorted here).
        layers: its find_layers.
        shapes: tensor name -> dims (see :func:`asr_onnx.model.graph.static_shapes`).
    """
    import onnx_graphsurgeon as gs

    from asr_onnx.refit.frontier import tensor_depths

    graph.toposort()
    layer_nodes = {id(layer.node) for layer in layers}
    depth = tensor_depths(graph, layer_nodes)
    found = {}
    for index, layer in enumerate(layers):
        if layer.op not in ("Conv", "Gemm", "MatMul") or len(layer.output.outputs) != 1:
            continue
        branch, scale = layer.output, np.ones(layer.channels)
        node = branch.outputs[0]
        if node.op == "BatchNormalization":
            scale = _bn_scale(node)
            if scale is None or len(scale) != layer.channels or len(node.outputs[0].outputs) != 1:
                continue
            branch = node.outputs[0]
            node = branch.outputs[0]
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        skip = node.inputs[1] if node.inputs[0] is branch else node.inputs[0]
        if (skip is branch or isinstance(skip, gs.Constant) or skip.name not in depth
                or depth[skip.name] > depth.get(layer.node.inputs[0].name, -1)
                or (_from_layer(skip, layer_nodes) and not _reads(layer.node.inputs[0], skip))):
            continue
        known = shapes.get(skip.name), shapes.get(branch.name)
        if known[0] is None or tuple(known[0]) != tuple(known[1] or ()):
            continue
        magnitude = np.abs(scale)
        floor = MIN_BLOCK_SCALE * float(magnitude.max(initial=0.0))
        inverse = np.where(magnitude > floor, 1.0 / np.where(magnitude > floor, scale, 1.0), 0.0)
        if np.isfinite(inverse).all() and inverse.any():
            found[index] = BlockTarget(skip.name, inverse)
    return found


def _with_skip(b: GraphBuilder, y, skips: tuple | None, rank: int):
    """``y`` (a layer's output, channels on axis 1 for a Conv of weight rank ``rank``, else last) plus
    (dense_skip − pruned_skip) / a per channel; ``y`` itself without ``skips``."""
    if skips is None:
        return y
    dense_skip, pruned_skip, target = skips
    inverse = target.inverse_scale.astype(np.float32)
    if rank:  # a Conv: (C, 1, ...) broadcasts over (N, C, spatial)
        inverse = inverse.reshape((-1,) + (1,) * (rank - 2))
    gap = b.op("Sub", [dense_skip, pruned_skip])
    return b.op("Add", [y, b.op("Mul", [gap, b.const(inverse, "inverse_scale")])])


def shifted_plan(size: int, kernel: int, dilation: int, pad: int, out: int):
    """One spatial axis of a stride-1 Conv, for XᵀX by shifts: per shift e (kernel offset j − i, 0 to
    kernel − 1 and their negatives), the cut points of the positions u at which both x[u] and x[u + dilation e]
    lie in the image, and per offset i (with i + e in the kernel) which of the segments between the cut
    points lie inside the positions that offset i reads, [dilation i − pad, dilation i − pad + out).

    Returns:
        {e: (cuts, {i: one bool per segment})}.
    """
    plan = {}
    for e in range(-(kernel - 1), kernel):
        low, high = max(0, -dilation * e), min(size, size - dilation * e)
        offsets = [i for i in range(kernel) if 0 <= i + e < kernel]
        if high <= low or not offsets:
            continue
        cuts = sorted({low, high} | {min(max(dilation * i - pad + end, low), high)
                                     for i in offsets for end in (0, out)})
        inside = {i: [dilation * i - pad <= a and b <= dilation * i - pad + out for a, b in zip(cuts, cuts[1:])]
                  for i in offsets}
        plan[e] = (cuts, inside)
    return plan


MAX_SHIFT_PIECES = 1024  # segment products of a ShiftedGram: 29 for a 3x3 kernel, 505 for 7x7, 2,581 for 11x11
# The multiply-adds of one node of a Gram graph, for one batch: well under a second at a CPU's 50-100 G/s, so that
# a signal, which onnxruntime honours between nodes, stops a run at once. XᵀX by im2col is cut into blocks of
# rows to stay under it; what cannot be cut (im2col itself, a segment product) bounds the batch instead.
MAX_NODE_MACS = 3.2e10


def _structured(layer, shape) -> bool:
    """Whether XᵀX of this Conv's patches is summed by shifts (stride 1, 2-D, known spatial size), which pays
    while the segment products stay few: their count grows as the fourth power of the kernel (29,261 for a
    21x21 kernel, each a handful of nodes), and past :data:`MAX_SHIFT_PIECES` the patches are made by im2col."""
    node = layer.node
    return (layer.op == "Conv" and len(layer.weight.shape) == 4 and len(shape or ()) == 4
            and all(isinstance(d, int) and d > 0 for d in shape[2:])
            and all(s == 1 for s in node.attrs.get("strides", [1]))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and int(np.prod(layer.weight.shape[2:])) > 1
            and len(_shift_pieces(_shift_geometry(layer, shape)[-1])) <= MAX_SHIFT_PIECES)


def _shift_geometry(layer, shape):
    """(kernel, dilations, pads, output size, per spatial axis its :func:`shifted_plan`) of a stride-1 2-D Conv."""
    kernel = tuple(layer.weight.shape[2:])
    attrs = layer.node.attrs
    dil = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0])) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 4
    size = shape[2:]
    out = [size[a] + pads[a] + pads[a + 2] - dil[a] * (kernel[a] - 1) for a in (0, 1)]
    return kernel, dil, pads, out, [shifted_plan(size[a], kernel[a], dil[a], pads[a], out[a]) for a in (0, 1)]


def _shift_pieces(plans) -> list[tuple]:
    """Every segment product of a ShiftedGram: (ey, ex, sy, sx, rows of the segment, its columns); the shifts
    −e are left out (their blocks are the transposes of those of e)."""
    pieces = []
    for ey, (cuts_y, _) in plans[0].items():
        for ex, (cuts_x, _) in plans[1].items():
            if ey < 0 or (ey == 0 and ex < 0):
                continue
            pieces += [(ey, ex, sy, sx, y1 - y0, x1 - x0) for sy, (y0, y1) in enumerate(zip(cuts_y, cuts_y[1:]))
                       for sx, (x0, x1) in enumerate(zip(cuts_x, cuts_x[1:]))]
    return pieces


@dataclass(frozen=True)
class GramWork:
    """What the Gram outputs of one layer cost per calibration sample.

    Attributes:
        length: the patch length per group (input channels x kernel).
        positions: the output positions (rows of the patch matrix) per sample.
        macs: the multiply-adds.
        node_macs: the multiply-adds of its largest node that cannot be cut into blocks (im2col, a segment
            product; onnxruntime cannot stop a node halfway).
        tensor_bytes: the bytes of the largest tensor made for them.
    """

    length: int
    positions: int
    macs: float
    node_macs: float
    tensor_bytes: float


def gram_work(layer, in_shape, out_shape) -> GramWork | None:
    """What the Gram outputs of one layer cost per calibration sample, or None when the shapes are not known.

    By im2col, the patch matrix (patch length x output positions, float32) is the largest tensor, and XᵀX
    takes positions x length² multiply-adds; summed by shifts, each segment product takes its area times
    the input channels squared, and no tensor is larger than the input.

    Args:
        layer: a Conv, Gemm or MatMul.
        in_shape, out_shape: the dims of its data input and of its output (the first one the batch).
    """
    groups, length, per_group = patch_size(layer)
    dims = [d for shape in (in_shape, out_shape) for d in (shape or [None])[1:]]
    if not in_shape or not out_shape or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    rows = int(np.prod(out_shape[2:])) if layer.op == "Conv" else int(np.prod(in_shape[1:-1]))
    if _structured(layer, in_shape):
        channels = layer.weight.shape[1]
        kernel, _, _, out, plans = _shift_geometry(layer, in_shape)
        area = sum(h * w for *_, h, w in _shift_pieces(plans))
        cross = per_group * int(np.prod(kernel)) * out[0] * out[1]
        largest = max(h * w for *_, h, w in _shift_pieces(plans))
        macs = groups * channels * (channels * area + cross)
        return GramWork(length, rows, float(macs), float(groups * channels * max(channels * largest, cross)),
                        4.0 * float(np.prod(in_shape[1:])))
    macs = rows * groups * length * (length + per_group)
    uncut = rows * groups * max(length, per_group)  # one row of XᵀX and XᵀY
    if layer.op == "Conv":
        uncut = max(uncut, rows * groups * length * int(np.prod(layer.weight.shape[2:])))  # im2col, a one-hot Conv
        macs += uncut
    return GramWork(length, rows, float(macs), float(uncut), 4.0 * rows * groups * length)


def _slice(b: GraphBuilder, x, starts, ends, axes):
    if b.opset >= 10:
        return b.op("Slice", [x, b.const(np.array(starts, np.int64), "starts"), b.const(np.array(ends, np.int64), "ends"),
                              b.const(np.array(axes, np.int64), "axes")])
    return b.op("Slice", [x], {"starts": list(starts), "ends": list(ends), "axes": list(axes)})


class ShiftedGram:
    """The Gram outputs of a stride-1 2-D Conv, summed by shifts instead of im2col: for kernel offsets i and
    j, the block XᵀX[(·, i), (·, j)] = Σ_p x[p + D i] x[p + D j]ᵀ is the sum, over the positions u = p + D i,
    of x[u] x[u + D (j − i)]ᵀ. Positions are cut into segments (:func:`shifted_plan`) so that each block is
    a sum of whole segments; each segment product is computed once per shift and shared by every block of
    that shift, and the blocks of −e are the transposes of those of e. That needs about 13 products of x
    with itself, not 81, for a 3x3 kernel. XᵀY is one product per offset: x at offset i against Y.
    """

    def __init__(self, b: GraphBuilder, layer, x, target, shape):
        groups, _, per_group = patch_size(layer)
        self.groups, self.channels = groups, layer.weight.shape[1]
        kernel, dil, pads, out, self.plans = _shift_geometry(layer, shape)
        size = shape[2:]
        self.kernel, self.dil, self.pads = kernel, dil, pads
        self.per_group = per_group
        xt = b.op("Transpose", [x], {"perm": [1, 0, 2, 3]})  # (C, N, H, W)
        yt = b.op("Transpose", [target], {"perm": [1, 0, 2, 3]})  # (out channels, N, Ho, Wo)
        self.outputs, self.pieces, self.cross = [], {}, {}

        def product(a, a_channels: int, c, c_channels: int):
            """Σ over rows of a cᵀ per group: (groups, a_channels, c_channels)."""
            left = b.op("Reshape", [a, b.const(np.array([groups, a_channels, -1], np.int64), "shape")])
            right = b.op("Reshape", [c, b.const(np.array([groups, c_channels, -1], np.int64), "shape")])
            out = b.op("MatMul", [left, b.op("Transpose", [right], {"perm": [0, 2, 1]})])
            self.outputs.append(out)
            return out.name

        for ey, ex, sy, sx, _, _ in _shift_pieces(self.plans):
            y0, y1 = self.plans[0][ey][0][sy:sy + 2]
            x0, x1 = self.plans[1][ex][0][sx:sx + 2]
            a = _slice(b, xt, [y0, x0], [y1, x1], [2, 3])
            c = a if (ey, ex) == (0, 0) else _slice(b, xt, [y0 + dil[0] * ey, x0 + dil[1] * ex],
                                                     [y1 + dil[0] * ey, x1 + dil[1] * ex], [2, 3])
            self.pieces[(ey, ex, sy, sx)] = product(a, self.channels, c, self.channels)
        for iy in range(kernel[0]):
            for ix in range(kernel[1]):  # x at offset i against Y, over the output positions where x[p + D i] is in the image
                p_y = (max(0, pads[0] - dil[0] * iy), min(out[0], size[0] + pads[0] - dil[0] * iy))
                p_x = (max(0, pads[1] - dil[1] * ix), min(out[1], size[1] + pads[1] - dil[1] * ix))
                if p_y[1] <= p_y[0] or p_x[1] <= p_x[0]:
                    continue
                u_y, u_x = [p + dil[0] * iy - pads[0] for p in p_y], [p + dil[1] * ix - pads[1] for p in p_x]
                a = _slice(b, xt, [u_y[0], u_x[0]], [u_y[1], u_x[1]], [2, 3])
                c = _slice(b, yt, [p_y[0], p_x[0]], [p_y[1], p_x[1]], [2, 3])
                self.cross[(iy, ix)] = product(a, self.channels, c, per_group)
        self.yy = b.reduce("ReduceSumSquare", b.op("Reshape", [yt, b.const(np.array([0, -1], np.int64), "shape")]), [1])
        self.rows = b.op("Shape", [target], dtype=np.int64)
        self.outputs += [self.yy, self.rows]
        self.names = [t.name for t in self.outputs]

    def stats(self, values: dict) -> GramStats:
        """The batch's GramStats in float64, assembled from the products ``values`` (by output name)."""
        c, (kh, kw) = self.channels, self.kernel
        xtx = np.zeros((self.groups, c, kh, kw, c, kh, kw))
        xty = np.zeros((self.groups, c, kh, kw, self.per_group))
        for (ey, ex, sy, sx), name in self.pieces.items():
            piece = values[name].astype(np.float64)
            for iy, in_y in self.plans[0][ey][1].items():
                if not in_y[sy]:
                    continue
                for ix, in_x in self.plans[1][ex][1].items():
                    if in_x[sx]:
                        xtx[:, :, iy, ix, :, iy + ey, ix + ex] += piece
                        if (ey, ex) != (0, 0):
                            xtx[:, :, iy + ey, ix + ex, :, iy, ix] += piece.transpose(0, 2, 1)
        for (iy, ix), name in self.cross.items():
            xty[:, :, iy, ix] = values[name]
        length = c * kh * kw
        shape = values[self.rows.name]
        return GramStats(float(np.prod(shape[[0, 2, 3]])), xtx.reshape(self.groups, length, length),
                         xty.reshape(self.groups, length, -1), values[self.yy.name].astype(np.float64).ravel())


def prefixed(model):
    """A copy of ``model`` whose names, except the graph inputs', start with :data:`DENSE_PREFIX`."""
    from onnx.compose import add_prefix

    return add_prefix(model, DENSE_PREFIX, rename_inputs=False)


def _side_by_side(dense, pruned, dense_prefixed=None):
    """The pruned graph with the dense one (names prefixed; ``dense_prefixed``, if given, is
    :func:`prefixed` of ``dense``) beside it on the same graph inputs, and both graphs' layers."""
    from asr_onnx.model.graph import find_layers, to_graph

    graph = to_graph(pruned)
    dense_graph = to_graph(dense_prefixed if dense_prefixed is not None else prefixed(dense))
    layers, dense_layers = find_layers(graph), find_layers(dense_graph)
    inputs = {t.name: t for t in graph.inputs}
    for node in dense_graph.nodes:  # the dense copy reads the same graph inputs
        for i, t in enumerate(node.inputs):
            if t.name in inputs:
                node.inputs[i] = inputs[t.name]
    graph.nodes.extend(dense_graph.nodes)
    return graph, layers, dense_layers


class Im2colGram:
    """The Gram outputs of any layer from its patches (im2col in-graph, or a reshape) and one product, cut into
    blocks of rows of XᵀX and XᵀY where one would exceed :data:`MAX_NODE_MACS`.

    Args:
        rows: the patch rows of one run (batch x positions), or 0 when not known (one product).
    """

    def __init__(self, b: GraphBuilder, layer, x, target, rows: int = 0):
        groups, length, _ = patch_size(layer)
        patches = _patches(b, layer, x)
        across = [b.op("Transpose", [patches], {"perm": [0, 2, 1]}), b.op("Transpose", [target], {"perm": [0, 2, 1]})]
        step = max(int(MAX_NODE_MACS // (groups * length * rows)), 1) if rows else length
        if step >= length:
            xtx, xty = (b.op("MatMul", [patches, other]) for other in across)
        else:
            blocks = [_slice(b, patches, [start], [min(start + step, length)], [1]) for start in range(0, length, step)]
            xtx, xty = (b.op("Concat", [b.op("MatMul", [block, other]) for block in blocks], {"axis": 1})
                        for other in across)
        yy = b.reduce("ReduceSumSquare", target, [2])
        rows = b.op("Shape", [target], dtype=np.int64)
        self.outputs = [xtx, xty, yy, rows]
        self.names = [t.name for t in self.outputs]

    def stats(self, values: dict) -> GramStats:
        """The batch's GramStats in float64 from the outputs ``values`` (by name)."""
        xtx, xty, yy, rows = (values[name] for name in self.names)
        return GramStats(float(rows[-1]), xtx.astype(np.float64), xty.astype(np.float64), yy.astype(np.float64).ravel())


def _add_grams(b: GraphBuilder, layers, dense_layers, indices: list[int], shapes: dict, batch: int = 0,
               blocks: dict | None = None, tensors: dict | None = None):
    """The Gram outputs of the layers ``indices``: (output tensors, per layer its ShiftedGram or Im2colGram);
    ``batch``: the samples of one run, or 0 when not known; ``blocks``: index -> :class:`BlockTarget` of the
    layers refitted towards the block output, whose skips are found in ``tensors`` (name -> tensor)."""
    outputs, grams = [], []
    for index in indices:
        layer, dense_layer = layers[index], dense_layers[index]
        x = layer.node.inputs[0]
        skips = None
        if blocks and index in blocks:
            block = blocks[index]
            skips = (tensors[DENSE_PREFIX + block.skip], tensors[block.skip], block)
        if _structured(layer, shapes.get(x.name)):
            target = _target(b, layer, dense_layer.node.inputs[0], dense_layer.weight, as_rows=False, skips=skips)
            gram = ShiftedGram(b, layer, x, target, shapes[x.name])
        else:
            work = gram_work(layer, shapes.get(x.name), shapes.get(layer.output.name))
            gram = Im2colGram(b, layer, x, _target(b, layer, dense_layer.node.inputs[0], dense_layer.weight,
                                                   skips=skips),
                              batch * work.positions if work else 0)
        outputs += gram.outputs
        grams.append(gram)
    return outputs, grams


def gram_model(dense, pruned, indices: list[int], shapes: dict | None = None, batch: int = 0,
               blocks: dict | None = None):
    """Both models on the same inputs, with the Gram outputs of the layers ``indices`` (find_layers order).

    Args:
        shapes: tensor name -> dims of ``pruned`` (see :func:`asr_onnx.model.graph.static_shapes`). Defaults to
            None: inferred from its declared inputs.
        batch: the samples of one run, which sets how XᵀX is cut (see :class:`Im2colGram`). Defaults to 0:
            not known, not cut.
        blocks: index -> :class:`BlockTarget` of the layers refitted towards the block output (see
            :func:`block_targets`). Defaults to None: every layer towards its own output.

    Returns:
        (onnx.ModelProto, per layer its outputs: an object with ``names`` and ``stats(values)``).
    """
    from asr_onnx.model.graph import opset, static_shapes, to_model

    graph, layers, dense_layers = _side_by_side(dense, pruned)
    shapes = static_shapes(pruned) if shapes is None else shapes
    outputs, grams = _add_grams(GraphBuilder(graph, opset(pruned)), layers, dense_layers, indices, shapes, batch,
                                blocks, graph.tensors() if blocks else None)
    graph.outputs = outputs
    graph.cleanup().toposort()
    return to_model(graph, pruned), grams


class SideBySide:
    """The pruned and the dense graph side by side, built once, cut into segments by depth (see
    :mod:`asr_onnx.refit.frontier`): each segment is exported with only its own nodes, so that a pass over one
    depth level costs that level, not the network.

    Args:
        dense, pruned: onnx.ModelProto of the same graph.
        shapes: as for :func:`gram_model`. Defaults to None.
    """

    def __init__(self, dense, pruned, shapes: dict | None = None):
        from asr_onnx.model.graph import opset, static_shapes
        from asr_onnx.refit.frontier import tensor_depths

        self.like, self.opset = pruned, opset(pruned)
        self.shapes = static_shapes(pruned) if shapes is None else shapes
        self.graph, self.layers, self.dense_layers = _side_by_side(dense, pruned)
        self.graph.toposort()
        self.depth = tensor_depths(self.graph, {id(layer.node) for layer in self.layers + self.dense_layers})
        self.producers = {t.name: node for node in self.graph.nodes for t in node.outputs}

    def set_weight(self, index: int, values: np.ndarray) -> None:
        """The pruned layer ``index``'s weight (find_layers order) from now on."""
        self.layers[index].weight.values = values

    def frontier(self, at: int) -> list[str]:
        """Both graphs' frontier at depth ``at``."""
        from asr_onnx.refit.frontier import frontier

        return frontier(self.graph, self.depth, at)

    def segment(self, low: int, high: int, indices: list[int], inputs: dict[str, np.dtype], kept: list[str],
                batch: int = 0, blocks: dict | None = None):
        """The nodes of depth in (``low``, ``high``], fed with the tensors ``inputs`` (name -> dtype), with the
        Gram outputs of the layers ``indices`` (``batch`` and ``blocks`` as for :func:`gram_model`) and the
        tensors ``kept`` as outputs.

        Returns:
            (onnx.ModelProto, per layer its outputs, as for :func:`gram_model`).
        """
        import onnx_graphsurgeon as gs

        from asr_onnx.model.graph import to_model

        def depth_of(node):
            return max((self.depth.get(t.name, -1) for t in node.outputs), default=-1)

        chosen = {id(node) for node in self.graph.nodes if low < depth_of(node) <= high}
        stack = [node for node in self.graph.nodes if id(node) in chosen]
        while stack:  # constants that no graph input reaches are computed where they are needed
            for t in stack.pop().inputs:
                node = self.producers.get(t.name)
                if node is not None and t.name not in self.depth and id(node) not in chosen:
                    chosen.add(id(node))
                    stack.append(node)
        tensors = self.graph.tensors()
        feeds = []
        for name, dtype in inputs.items():
            tensor = tensors[name]
            tensor.dtype, tensor.shape = dtype, None
            feeds.append(tensor)
        sub = gs.Graph(nodes=[node for node in self.graph.nodes if id(node) in chosen], inputs=feeds,
                       opset=self.opset)
        outputs, grams = _add_grams(GraphBuilder(sub, self.opset), self.layers, self.dense_layers, indices, self.shapes,
                                    batch, blocks, tensors)
        added = [node for node in sub.nodes if id(node) not in chosen]
        for tensor in (tensors[name] for name in kept):
            tensor.dtype, tensor.shape = None, None  # onnxruntime infers them
        sub.outputs = outputs + [tensors[name] for name in kept]
        used = {t.name for node in sub.nodes for t in node.inputs}
        sub.inputs = [t for t in feeds if t.name in used]
        try:
            return to_model(sub, self.like), grams
        finally:
            for node in added:  # unhook the Gram nodes from the shared graph's tensors
                node.inputs.clear()
                node.outputs.clear()


def accumulate(dense, pruned, indices: list[int], calib, *, batch_size: int, device: str = "auto",
               threads: int = 0, progress: bool = False, desc: str = "gram",
               shapes: dict | None = None, blocks: dict | None = None) -> tuple[list[GramStats], str]:
    """Runs the Gram graph over the calibration set; per-batch float32 sums are added up in float64. A signal
    stops a batch's run at once (see :mod:`asr_onnx.model.stoppable`).

    Args:
        shapes, blocks: as for :func:`gram_model`. Defaults to None.

    Returns:
        (one GramStats per index, the provider used).

    Raises:
        AsrError: onnxruntime fails. A sum that is not finite (activations too large to square in
            float32) is returned as it is, for the caller to skip.
    """
    from asr_onnx.model.session import Runner, batches

    fixed = fixed_batch(input_specs(pruned))
    model, grams = gram_model(dense, pruned, indices, shapes, fixed or batch_size, blocks)
    wanted = [name for gram in grams for name in gram.names]
    totals: list[GramStats | None] = [None] * len(indices)
    with Runner(model, device=device, threads=threads, mem_pattern=False, what="the Gram graph",
                stoppable=True) as session:
        del model
        for _, feed in batches(calib, batch_size, fixed=fixed, desc=desc, progress=progress):
            add_batch(totals, grams, session.run(wanted, feed))
    return totals, session.provider


def add_batch(totals: list, grams: list, values: dict) -> None:
    """Adds one batch's float32 Gram outputs (``values`` by name) to ``totals`` in float64, in place."""
    for i, gram in enumerate(grams):
        batch = gram.stats(values)
        totals[i] = batch if totals[i] is None else totals[i].merge(batch)
