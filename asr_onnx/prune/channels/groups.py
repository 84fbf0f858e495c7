"""Channel dependency groups, found on the ONNX graph: the tensors whose channels must be removed together.

Every tensor that carries channels gets a channel *axis* (1 for NCHW, the last for channel-last tokens) and a
*layout* along it: a tuple of ``(group, repeat)`` segments, one per block of channels, where each channel of
``group`` fills ``repeat`` consecutive positions (a Flatten into a Gemm makes ``repeat`` the spatial size). A
Conv, Gemm or MatMul with a constant weight starts a new group; channel-wise ops (BN, activations, pooling,
per-channel affines, depthwise convs) pass the layout on, a Transpose moves its axis; a residual Add or an
SE-style Mul joins the groups of its two inputs (union-find, as torch-pruning's DepGraph couples the channels
of a residual stream); Concat concatenates layouts. A Reshape that splits the channels into (heads, head_dim)
makes each head one unit of its group, so that attention's Q, K and V projections lose whole heads together
(their two MatMuls join them) with the output projection's input rows; the Reshape that merges the heads back
gives each head ``head_dim`` positions again. Whatever the walk cannot prove safe (a graph output of any
kind, a second output that is read, an unknown or custom-domain op, a division by the channels, a computed
bias, a grouped conv, a shared constant, a LayerNorm or a MatMul that sums over the channels) keeps its
groups whole, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Softplus",
         "Identity", "Dropout", "Cast", "Neg", "Abs", "Erf", "Gelu", "Mish")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")  # over axes 2..: channels on axis 1
REDUCE = ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")
VARIADIC = ("Max", "Min")  # elementwise ops that take any number of inputs
LAYERS = ("Conv", "Gemm", "MatMul")
KIND_ORDER = ("grouped", "heads", "layernorm", "residual", "concat", "se-gate", "depthwise", "flatten-gemm", "tokens",
              "bn", "affine", "plain")


@dataclass
class Edit:
    """A constant input of a node sliced along ``axis`` by the kept positions of ``layout``.

    Attributes:
        node: the first output name of the node (unique in an ONNX graph).
        index: which input of the node holds the constant.
        axis: the constant's axis that runs over the layout's positions.
        layout: ((group, repeat), ...).
        role: "producer" (a layer's output channels), "consumer" (a layer's input channels) or "param".
        const: the constant's name when it was walked.
    """

    node: str
    index: int
    axis: int
    layout: tuple
    role: str = "param"
    const: str = ""


@dataclass
class Groups:
    """What :func:`find_groups` finds.

    Attributes:
        sizes: channels per group.
        whole: group -> why it cannot be pruned (absent: prunable).
        kinds: group -> the dependency kinds it takes part in.
        layouts: tensor name -> layout, for every tracked tensor.
        axes: tensor name -> the axis its layout runs along, for every tracked tensor with channels.
        edits: every constant to slice.
        depthwise: node -> layout of a depthwise conv, whose ``group`` attribute follows its channels.
        reshapes: node -> (axis, layout) of a Reshape whose target entry at ``axis`` follows the kept positions.
    """

    sizes: list[int] = field(default_factory=list)
    whole: dict[int, str] = field(default_factory=dict)
    kinds: dict[int, set] = field(default_factory=dict)
    layouts: dict[str, tuple] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)
    edits: list[Edit] = field(default_factory=list)
    depthwise: dict[str, tuple] = field(default_factory=dict)
    reshapes: dict[str, tuple] = field(default_factory=dict)

    def kind(self, group: int) -> str:
        """The most telling kind of a group (residual before concat before se-gate ...)."""
        kinds = self.kinds.get(group, set())
        return next((k for k in KIND_ORDER if k in kinds), "plain")

    def prunable(self) -> list[int]:
        return [g for g in range(len(self.sizes)) if g not in self.whole]


class _Walk:
    """Union-find over groups while the graph is walked; :meth:`finish` renumbers the roots."""

    def __init__(self):
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.whole: dict[int, str] = {}
        self.kinds: dict[int, set] = {}
        self.layouts: dict[str, tuple] = {}
        self.axes: dict[str, int] = {}
        self.edits: list[Edit] = []
        self.depthwise: dict[str, tuple] = {}
        self.reshapes: dict[str, tuple] = {}

    def new(self, size: int, whole: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(int(size))
        if whole:
            self.whole[len(self.parent) - 1] = whole
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        if b in self.whole:
            self.whole.setdefault(a, self.whole.pop(b))
        self.kinds.setdefault(a, set()).update(self.kinds.pop(b, set()))

    def stop(self, layout, reason: str) -> None:
        for g, _ in layout or ():
            self.whole.setdefault(self.find(g), reason)

    def mark(self, layout, kind: str) -> None:
        for g, _ in layout:
            self.kinds.setdefault(self.find(g), set()).add(kind)

    def coarsen(self, g: int, unit: int) -> None:
        """Makes ``unit`` consecutive channels of ``g``'s group one channel (a head of ``unit`` channels), in the
        group's sizes and in every layout, edit and slice recorded so far."""
        root = self.find(g)
        members = {m for m in range(len(self.parent)) if self.find(m) == root}
        for m in members:
            self.sizes[m] //= unit

        def wider(layout):
            return tuple((m, r * unit if m in members else r) for m, r in layout)

        self.layouts = {name: wider(lay) for name, lay in self.layouts.items()}
        self.edits = [Edit(e.node, e.index, e.axis, wider(e.layout), e.role, e.const) for e in self.edits]
        self.depthwise = {n: wider(lay) for n, lay in self.depthwise.items()}
        self.reshapes = {n: (axis, wider(lay)) for n, (axis, lay) in self.reshapes.items()}

    def finish(self) -> Groups:
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        number = {r: i for i, r in enumerate(roots)}

        def renumber(layout):
            return tuple((number[self.find(g)], r) for g, r in layout)

        return Groups(sizes=[self.sizes[r] for r in roots],
                      whole={number[self.find(g)]: why for g, why in self.whole.items()},
                      kinds={number[r]: k for r, k in self.kinds.items() if r in number},
                      layouts={name: renumber(lay) for name, lay in self.layouts.items()},
                      axes=dict(self.axes),
                      edits=[Edit(e.node, e.index, e.axis, renumber(e.layout), e.role, e.const) for e in self.edits],
                      depthwise={n: renumber(lay) for n, lay in self.depthwise.items()},
                      reshapes={n: (axis, renumber(lay)) for n, (axis, lay) in self.reshapes.items()})


def find_groups(graph, shapes: dict) -> Groups:
    """Walks a graph (onnx-graphsurgeon, topologically sorted here) and returns its channel groups.

    Args:
        graph: an onnx-graphsurgeon graph.
        shapes: tensor name -> dims from ONNX shape inference (see :func:`asr_onnx.model.graph.static_shapes`).
    """
    import onnx_graphsurgeon as gs

    walk = _Walk()
    graph.toposort()
    sizes = walk.sizes

    def span(layout) -> int:
        return sum(sizes[g] * r for g, r in layout)

    def flow_of(t) -> tuple:
        if isinstance(t, gs.Constant) or t.name not in walk.layouts:
            return None, None
        return walk.layouts[t.name], walk.axes.get(t.name)

    readers: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            readers[t.name] = readers.get(t.name, 0) + 1
    outputs = {t.name for t in graph.outputs}
    interface = outputs | {t.name for t in graph.inputs}

    def param(node, index, axis, layout, role="param") -> bool:
        """Records a constant slice, or stops the layout when the constant is shared or is a graph output."""
        const = node.inputs[index]
        if not isinstance(const, gs.Constant):
            walk.stop(layout, f"{node.op} {node.name or node.outputs[0].name}: input {index} ({const.name}) is "
                              "computed, not a constant")
            return False
        if const.name in interface:
            walk.stop(layout, f"constant {const.name} is also a graph input or output")
            return False
        if readers.get(const.name, 0) > 1:
            walk.stop(layout, f"constant {const.name} is shared by several nodes")
            return False
        walk.edits.append(Edit(node.outputs[0].name, index, axis, layout, role, const.name))
        return True

    for node in graph.nodes:
        flows = [flow_of(t) for t in node.inputs]
        ins, axes = [f[0] for f in flows], [f[1] for f in flows]
        tracked = [lay for lay in ins if lay]
        out = node.outputs[0].name if node.outputs else None
        where = f"{node.op} {node.name or out}"
        if (node.domain or "") not in ("", "ai.onnx"):
            for lay in tracked:
                walk.stop(lay, f"read by custom-domain op {node.domain}.{node.op}")
            continue
        result = _step(node, ins, axes, shapes, walk, span, param, where)
        if result is None:
            for lay in tracked:
                walk.stop(lay, f"read by {where}")
        elif out is not None:
            walk.layouts[out] = result[0]
            if result[0]:
                walk.axes[out] = result[1]
        # a second output (MaxPool's Indices, Dropout's mask, ...) that is read or is a graph output has a
        # shape or values that depend on the channel count: the node's channels stay
        extra = [t.name for t in node.outputs[1:] if t.name and (t.name in outputs or readers.get(t.name))]
        if extra and (tracked or (result and result[0])):
            reason = f"{where}: its output {extra[0]} is {'a graph output' if extra[0] in outputs else 'read'}"
            for lay in tracked + [result[0] if result else ()]:
                walk.stop(lay, reason)
    for t in graph.outputs:
        walk.stop(walk.layouts.get(t.name), f"graph output {t.name}")
    return walk.finish()


def _rank(shapes, t) -> int | None:
    dims = shapes.get(t.name, getattr(t, "shape", None))  # a graph input's declared shape where inference has none
    return None if dims is None else len(dims)


NONE: tuple = ((), None)  # a node whose output carries no channel that the walk follows


def _step(node, ins, axes, shapes, walk, span, param, where):
    """(layout, axis) of one node's output, or None when its channels cannot be followed (its inputs stop)."""
    import onnx_graphsurgeon as gs

    op, x, axis = node.op, ins[0] if ins else None, axes[0] if axes else None
    if op in LAYERS:
        return _layer(node, x, axis, ins, axes, shapes, walk, span, param, where)
    if not any(ins):
        return NONE  # a node on constants or untracked tensors only: nothing to follow
    if op in BINARY:
        return _binary(node, ins, axes, shapes, walk, param, where)
    if x is None:
        return None
    rank = _rank(shapes, node.inputs[0])
    if op == "BatchNormalization":
        if axis != 1 or len(node.outputs) > 1 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            return None
        if all(param(node, i, 0, x) for i in range(1, 5)):
            walk.mark(x, "bn")
        return x, axis
    if op in UNARY or (op in POOLS and axis == 1):
        return None if any(ins[1:]) else (x, axis)
    if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
        return _normalise(node, x, axis, rank, walk, where)
    if op in REDUCE or op in ("Squeeze", "Unsqueeze"):
        return _reduce(node, x, axis, rank, ins)
    if op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1) if rank else ())]
        return (x, perm.index(axis)) if rank and axis in perm else None
    if op == "Concat":
        rank = _rank(shapes, node.outputs[0])
        if rank is None or int(node.attrs.get("axis", 1)) % rank != axis or not all(ins) \
                or any(a != axis for a in axes):
            return None
        walk.mark(tuple(s for lay in ins for s in lay), "concat")
        return tuple(s for lay in ins for s in lay), axis
    if op in ("Flatten", "Reshape"):
        return _reshape(node, x, axis, ins, shapes, walk, where)
    return None


def _normalise(node, x, axis, rank, walk, where):
    """Softmax and LayerNormalization: a layout along an axis they normalise over stays whole (every channel's
    output depends on the others); along another axis it passes on. LayerNorm's output starts a whole group."""
    if not rank:
        return None
    if node.op != "LayerNormalization" and "axis" not in node.attrs:
        return None  # the default axis is 1 before opset 13 and -1 after: the walk does not know the opset
    first = int(node.attrs.get("axis", -1)) % rank
    if node.op != "LayerNormalization":
        return (x, axis) if axis < first else None  # older opsets normalise over first..rank-1: stay safe
    if axis < first:
        return x, axis
    reason = (f"LayerNorm {where} normalises over these channels: the residual stream's width is shared by every "
              "block (only attention heads and MLP units are pruned)")
    walk.stop(x, reason)
    layout = ((walk.new(sum(walk.sizes[g] * r for g, r in x), reason), 1),)
    walk.mark(x + layout, "layernorm")
    return layout, axis


def _reduce(node, x, axis, rank, ins):
    """Reduce, Squeeze and Unsqueeze over other axes: the channel axis moves by the axes removed or added
    before it."""
    axes = _axes(node)
    if axes is None or not rank or any(ins[1:]):
        return None
    if node.op == "Unsqueeze":
        out_rank = rank + len(axes)
        added = sorted(a % out_rank for a in axes)
        moved = axis
        for a in added:
            if a <= moved:
                moved += 1
        return (x, moved) if 0 not in added else None
    axes = [a % rank for a in axes]
    if 0 in axes or axis in axes:
        return None
    removed = node.op == "Squeeze" or not int(node.attrs.get("keepdims", 1))
    return x, axis - (sum(a < axis for a in axes) if removed else 0)


def _layer(node, x, axis, ins, axes, shapes, walk, span, param, where):
    """Conv, Gemm or MatMul: reads channels on its input (a consumer) and starts a group (a producer)."""
    import onnx_graphsurgeon as gs

    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op == "MatMul" and not isinstance(weight, gs.Constant) and not isinstance(node.inputs[0], gs.Constant):
        return _matmul(node, ins, axes, shapes, walk, where)
    if not isinstance(weight, gs.Constant) or weight.values.dtype.kind != "f":
        return None
    shape = weight.shape
    has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""  # an empty name: the optional input is absent
    if x and node.op in ("Conv", "Gemm") and axis != 1:
        walk.stop(x, f"{where} reads channels on axis 1, the layout's are on axis {axis}")
        x = None
    if node.op == "Conv":
        groups, c_in = int(node.attrs.get("group", 1)), shape[1] * int(node.attrs.get("group", 1))
        if groups > 1 and shape[1] == 1 and shape[0] == groups and x and span(x) == groups:
            ok = param(node, 1, 0, x) and (not has_bias or param(node, 2, 0, x))
            if ok:
                walk.depthwise[node.outputs[0].name] = x
                walk.mark(x, "depthwise")
            return x, 1
        if groups > 1 and shape[1] == 1 and shape[0] == groups and not x:
            # a depthwise conv keeps its input's channels, which an earlier node stopped following
            reason = f"depthwise {where}: its input's channels are not followed (an earlier group's reason says why)"
            lay = ((walk.new(shape[0], reason), 1),)
            walk.mark(lay, "depthwise")
            return lay, 1
        if groups > 1:
            reason = f"grouped {where} (group={groups}): each group would need the same channels removed"
            walk.stop(x, reason)
            lay = ((walk.new(shape[0], reason), 1),)
            walk.mark(tuple(x or ()) + lay, "grouped")
            return lay, 1
        if x and (span(x) != c_in or any(r != 1 for _, r in x)):
            walk.stop(x, f"{where} reads {c_in} channels, the layout has {span(x)}")
        elif x:
            param(node, 1, 1, x, "consumer")
        g = walk.new(shape[0])
        lay = ((g, 1),)
        if param(node, 1, 0, lay, "producer") and has_bias:
            param(node, 2, 0, lay)  # a computed or shared bias stops the group, with its reason
        return lay, 1
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or len(shape) != 2:
            return None
        trans_b = int(node.attrs.get("transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        if x and span(x) != shape[in_axis]:
            walk.stop(x, f"{where} reads {shape[in_axis]} columns, the layout has {span(x)}")
        elif x:
            param(node, 1, in_axis, x, "consumer")
        g = walk.new(shape[out_axis])
        lay = ((g, 1),)
        bias = node.inputs[2] if has_bias else None
        if not param(node, 1, out_axis, lay, "producer") or bias is None:
            return lay, 1
        if not isinstance(bias, gs.Constant):
            walk.stop(lay, f"{where}: its C input {bias.name} is computed, not a constant")
        elif bias.values.size > 1 and (bias.values.ndim > 2 or bias.values.shape[-1] != shape[out_axis]):
            walk.stop(lay, f"{where}: its C input is not one value per output")
        elif bias.values.size > 1:
            param(node, 2, bias.values.ndim - 1, lay)
        return lay, 1
    # MatMul with a constant (in, out) weight: a Linear on the last axis (rank 2, or channel-last tokens)
    rank = _rank(shapes, node.inputs[0])
    if len(shape) != 2:
        return None
    if not rank or rank < 2:  # listed whole with its reason: a Paddle export's computed Reshape hides the rank
        walk.new(shape[1], f"{where}: ONNX shape inference gives its input no rank, so the walk cannot tell which "
                           "axis holds the channels")
        return None
    if x and (axis != rank - 1 or span(x) != shape[0]):
        walk.stop(x, f"{where} reads {shape[0]} rows on its last axis, the layout has {span(x)} on axis {axis}")
    elif x:
        param(node, 1, 0, x, "consumer")
    lay = ((walk.new(shape[1]), 1),)
    param(node, 1, 1, lay, "producer")
    if rank > 2:
        walk.mark(lay, "tokens")
    return lay, rank - 1


def _matmul(node, ins, axes, shapes, walk, where):
    """A MatMul of two activations (attention's Q·Kᵀ and its product with V): a layout on a batch axis (the
    heads) passes on where both inputs carry the same one (their groups join); one on A's rows or B's columns
    passes on alone; one on the axis the product sums over stays whole."""
    rank = _rank(shapes, node.outputs[0])
    ranks = [_rank(shapes, t) for t in node.inputs[:2]]
    if rank is None or rank < 3 or any(r != rank for r in ranks) or len(ins) != 2:
        return None
    (a, b), (axis_a, axis_b) = ins, axes
    summed = [lay for lay, ax, axis in ((a, axis_a, rank - 1), (b, axis_b, rank - 2)) if lay and ax == axis]
    for lay in summed:
        walk.stop(lay, f"{where} sums over these channels (an attention product)")
    passed = [(lay, ax) for lay, ax, axis in ((a, axis_a, rank - 1), (b, axis_b, rank - 2)) if lay and ax != axis]
    if len(passed) == 2 and axis_a == axis_b and axis_a < rank - 2 and len(a) == len(b) and all(
            walk.sizes[ga] == walk.sizes[gb] and ra == rb for (ga, ra), (gb, rb) in zip(a, b)):
        for (ga, _), (gb, _) in zip(a, b):
            walk.union(ga, gb)
        return a, axis_a
    if len(passed) == 1 and passed[0][1] >= rank - 2:  # A's rows or B's columns
        return passed[0]
    for lay, _ in passed:
        walk.stop(lay, f"{where}: its two inputs carry channels on different axes")
    return NONE


def _axes(node):
    import onnx_graphsurgeon as gs

    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.ravel(node.inputs[1].values)]
    return None


def _binary(node, ins, axes, shapes, walk, param, where):
    """Elementwise ops: by a constant (an affine, sliced where per channel) or of tracked tensors (joined).

    A division by tracked channels stays whole: a removed channel is zero in the masked model.
    """
    import onnx_graphsurgeon as gs

    rank = _rank(shapes, node.outputs[0])
    tracked = [lay for lay in ins if lay]
    if rank is None or rank < 2 or (len(ins) != 2 and node.op not in VARIADIC):
        return None
    if node.op == "Div" and ins[1]:
        for lay in tracked:
            walk.stop(lay, f"{where} divides by the channels (a removed channel is a division by zero)")
        return None
    if any(_rank(shapes, t) != rank for t, lay in zip(node.inputs, ins) if lay):
        return None  # broadcast to a higher rank moves the channel axis
    axis = next(ax for lay, ax in zip(ins, axes) if lay)
    if any(ax != axis for lay, ax in zip(ins, axes) if lay):
        for lay in tracked:
            walk.stop(lay, f"{where} joins tensors whose channels lie on different axes")
        return None
    if len(ins) == 1:  # a one-input Max or Min is the identity
        return ins[0], axis
    variables = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)]
    if len(ins) == 2 and len(variables) == 1:
        x, const = ins[variables[0]], node.inputs[1 - variables[0]]
        full = (1,) * (rank - len(const.shape)) + tuple(const.shape)
        const_axis = axis - (rank - len(const.shape))
        if full[axis] != 1 and not (const_axis >= 0 and param(node, 1 - variables[0], const_axis, x)):
            return None
        walk.mark(x, "affine")
        return x, axis
    if len(tracked) != len(ins):
        other = next(t.name for t, lay in zip(node.inputs, ins) if not lay)
        for lay in tracked:
            walk.stop(lay, f"read by {where} with {other}, whose channels the walk does not follow")
        return None
    a = ins[0]
    if any(len(a) != len(b) or any(walk.sizes[ga] != walk.sizes[gb] or ra != rb
                                   for (ga, ra), (gb, rb) in zip(a, b)) for b in ins[1:]):
        for lay in ins:
            walk.stop(lay, f"{where} joins tensors whose channel layouts differ")
        return None
    joined = any(walk.find(ga) != walk.find(gb) for b in ins[1:] for (ga, _), (gb, _) in zip(a, b))
    for b in ins[1:]:
        for (ga, _), (gb, _) in zip(a, b):
            walk.union(ga, gb)
    if joined:  # x * sigmoid(x) (SiLU) joins nothing
        walk.mark(a, "residual" if node.op in ("Add", "Sub") else "se-gate")
    return a, axis


def _reshape(node, x, axis, ins, shapes, walk, where):
    """Flatten or Reshape. The channel axis either merges with the axes after it (a Flatten into a Gemm, the heads
    back into channels: each channel fills their product of positions) or splits into exactly two, (heads,
    head_dim) with the channels whole heads: each head becomes one channel of the group. Only the axes from the
    channels on need static sizes: in row-major order a position's channel depends on nothing before them, so
    the batch and the token axes (window partitions) may be regrouped freely. The target entry that counts
    the channels follows the kept ones."""
    import onnx_graphsurgeon as gs

    dims, out = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    if dims is None or out is None or axis is None or axis < 1 or any(ins[1:]):
        return None
    target = None
    if node.op == "Reshape":
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        target = [int(v) for v in np.ravel(node.inputs[1].values)]
    elif int(node.attrs.get("axis", 1)) < 1:
        return None
    if not all(isinstance(d, int) and d > 0 for d in dims[axis:]):
        return None

    def suffix(values, k) -> int | None:
        tail = values[k:]
        return int(np.prod(tail, dtype=np.int64)) if all(isinstance(d, int) and d > 0 for d in tail) else None

    for b in range(len(out)):
        if not isinstance(out[b], int) or suffix(out, b) != suffix(dims, axis) or out[b] == 1 < dims[axis]:
            continue  # (an axis of 1 before the channels is not where they go)
        merged = next((m for m in range(axis + 1, len(dims) + 1) if suffix(dims, m) == suffix(out, b + 1)), None)
        if merged is not None and suffix(dims, axis) == out[b] * suffix(dims, merged):
            inner = suffix(dims[:merged], axis + 1) or 1
            layout = tuple((g, r * inner) for g, r in x)
            if len(out) == 2 or inner > 1:
                walk.mark(x, "flatten-gemm" if len(out) == 2 else "heads")
            return _target(node, target, b, axis, layout, walk)
        if b + 2 <= len(out) and isinstance(out[b + 1], int) and out[b] * out[b + 1] == dims[axis] \
                and suffix(out, b + 2) == suffix(dims, axis + 1):
            unit = out[b + 1]
            if len(x) != 1 or x[0][1] != 1 or walk.sizes[x[0][0]] % unit:
                walk.stop(x, f"{where} splits the channels into ({out[b]}, {unit}) across several groups")
                return None
            walk.coarsen(x[0][0], unit)
            walk.mark(x, "heads")
            return _target(node, target, b, axis, ((x[0][0], 1),), walk)
        walk.stop(x, f"{where} splits the channels into more than two axes (a fused QKV projection, say): a head "
                     "of Q, K and V would be three groups in one")
        return None
    return None


def _target(node, target, b, axis, layout, walk):
    """The (layout, axis) after a Reshape, with its target entry ``b`` recorded to follow the kept positions
    (-1 is inferred, and 0 copies the input's channel count, which shrinks with it)."""
    if target is None:
        return layout, b
    copied = any(i < len(target) and target[i] == 0 for i in (b, axis))  # 0 copies the input's entry i
    if len(target) <= b or (copied and b != axis):  # a channel count copied to or from another axis
        return None
    if target[b] > 0:
        walk.reshapes[node.outputs[0].name] = (b, layout)
    return layout, b
