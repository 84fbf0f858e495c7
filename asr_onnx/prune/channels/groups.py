"""Channel dependency groups, found on the ONNX graph: the tensors whose channels must be removed together.

Every tensor that carries channels on axis 1 gets a *layout*: a tuple of ``(group, repeat)`` segments, one
per block of channels, where each channel of ``group`` fills ``repeat`` consecutive positions (a Flatten
into a Gemm makes ``repeat`` the spatial size). A Conv or Gemm with a constant weight starts a new group;
channel-wise ops (BN, activations, pooling, per-channel affines, depthwise convs) pass the layout on; a
residual Add or an SE-style Mul joins the groups of its two inputs (union-find, as torch-pruning's DepGraph
couples the channels of a residual stream); Concat concatenates layouts. Whatever the walk cannot prove safe
(a graph output of any kind, a second output that is read, an unknown or custom-domain op, a division by the
channels, a computed bias, a grouped conv, a shared constant) keeps its groups whole, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Softplus",
         "Identity", "Dropout", "Cast", "Neg", "Abs", "MaxPool", "AveragePool", "GlobalAveragePool",
         "GlobalMaxPool")
REDUCE = ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")
VARIADIC = ("Max", "Min")  # elementwise ops that take any number of inputs
LAYERS = ("Conv", "Gemm", "MatMul")
KIND_ORDER = ("grouped", "residual", "concat", "se-gate", "depthwise", "flatten-gemm", "bn", "affine", "plain")


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
        edits: every constant to slice.
        depthwise: node -> layout of a depthwise conv, whose ``group`` attribute follows its channels.
        reshapes: node -> layout of a Reshape into a Gemm, whose target's second entry follows its columns.
    """

    sizes: list[int] = field(default_factory=list)
    whole: dict[int, str] = field(default_factory=dict)
    kinds: dict[int, set] = field(default_factory=dict)
    layouts: dict[str, tuple] = field(default_factory=dict)
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

    def finish(self) -> Groups:
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        number = {r: i for i, r in enumerate(roots)}

        def renumber(layout):
            return tuple((number[self.find(g)], r) for g, r in layout)

        return Groups(sizes=[self.sizes[r] for r in roots],
                      whole={number[self.find(g)]: why for g, why in self.whole.items()},
                      kinds={number[r]: k for r, k in self.kinds.items() if r in number},
                      layouts={name: renumber(lay) for name, lay in self.layouts.items()},
                      edits=[Edit(e.node, e.index, e.axis, renumber(e.layout), e.role, e.const) for e in self.edits],
                      depthwise={n: renumber(lay) for n, lay in self.depthwise.items()},
                      reshapes={n: renumber(lay) for n, lay in self.reshapes.items()})


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

    def layout_of(t):
        return None if isinstance(t, gs.Constant) else walk.layouts.get(t.name)

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
        ins = [layout_of(t) for t in node.inputs]
        tracked = [lay for lay in ins if lay]
        out = node.outputs[0].name if node.outputs else None
        where = f"{node.op} {node.name or out}"
        if (node.domain or "") not in ("", "ai.onnx"):
            for lay in tracked:
                walk.stop(lay, f"read by custom-domain op {node.domain}.{node.op}")
            continue
        result = _step(node, ins, shapes, walk, span, param, where)
        if result is None:
            for lay in tracked:
                walk.stop(lay, f"read by {where}")
        elif out is not None:
            walk.layouts[out] = result
        # a second output (MaxPool's Indices, Dropout's mask, ...) that is read or is a graph output has a
        # shape or values that depend on the channel count: the node's channels stay
        extra = [t.name for t in node.outputs[1:] if t.name and (t.name in outputs or readers.get(t.name))]
        if extra and (tracked or result):
            reason = f"{where}: its output {extra[0]} is {'a graph output' if extra[0] in outputs else 'read'}"
            for lay in tracked + [result or ()]:
                walk.stop(lay, reason)
    for t in graph.outputs:
        walk.stop(walk.layouts.get(t.name), f"graph output {t.name}")
    return walk.finish()


def _rank(shapes, t) -> int | None:
    dims = shapes.get(t.name, getattr(t, "shape", None))  # a graph input's declared shape where inference has none
    return None if dims is None else len(dims)


def _step(node, ins, shapes, walk, span, param, where):
    """The output layout of one node, or None when its channels cannot be followed (its inputs stop)."""
    import onnx_graphsurgeon as gs

    op, x = node.op, ins[0] if ins else None
    if op in LAYERS:
        return _layer(node, x, shapes, walk, span, param, where)
    if not any(ins):
        return ()  # a node on constants or untracked tensors only: nothing to follow
    if op in BINARY:
        return _binary(node, ins, shapes, walk, param, where)
    if x is None:
        return None
    if op == "BatchNormalization":
        if len(node.outputs) > 1 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            return None
        if all(param(node, i, 0, x) for i in range(1, 5)):
            walk.mark(x, "bn")
        return x
    if op in UNARY or op in REDUCE or op in ("Squeeze", "Unsqueeze"):
        if any(ins[1:]):
            return None
        if op in REDUCE or op in ("Squeeze", "Unsqueeze"):
            axes = _axes(node)
            rank = _rank(shapes, node.inputs[0])
            if axes is None or not rank or any(a % rank in (0, 1) for a in axes):
                return None
            if op in REDUCE and not int(node.attrs.get("keepdims", 1)) or op == "Unsqueeze":
                return None
        return x
    if op == "Concat":
        rank = _rank(shapes, node.outputs[0])
        axis = int(node.attrs.get("axis", 1))
        if rank is None or axis % rank != 1 or not all(ins):
            return None
        walk.mark(tuple(s for lay in ins for s in lay), "concat")
        return tuple(s for lay in ins for s in lay)
    if op in ("Flatten", "Reshape"):
        return _flatten(node, x, ins, shapes, walk, where)
    return None


def _layer(node, x, shapes, walk, span, param, where):
    """Conv, Gemm or MatMul: reads channels on its input (a consumer) and starts a group (a producer)."""
    import onnx_graphsurgeon as gs

    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or weight.values.dtype.kind != "f":
        return None
    shape = weight.shape
    has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""  # an empty name: the optional input is absent
    if node.op == "Conv":
        groups, c_in = int(node.attrs.get("group", 1)), shape[1] * int(node.attrs.get("group", 1))
        if groups > 1 and shape[1] == 1 and shape[0] == groups and x and span(x) == groups:
            ok = param(node, 1, 0, x) and (not has_bias or param(node, 2, 0, x))
            if ok:
                walk.depthwise[node.outputs[0].name] = x
                walk.mark(x, "depthwise")
            return x
        if groups > 1 and shape[1] == 1 and shape[0] == groups and not x:
            # a depthwise conv keeps its input's channels, which an earlier node stopped following
            reason = f"depthwise {where}: its input's channels are not followed (an earlier group's reason says why)"
            lay = ((walk.new(shape[0], reason), 1),)
            walk.mark(lay, "depthwise")
            return lay
        if groups > 1:
            reason = f"grouped {where} (group={groups}): each group would need the same channels removed"
            walk.stop(x, reason)
            lay = ((walk.new(shape[0], reason), 1),)
            walk.mark(tuple(x or ()) + lay, "grouped")
            return lay
        if x and (span(x) != c_in or any(r != 1 for _, r in x)):
            walk.stop(x, f"{where} reads {c_in} channels, the layout has {span(x)}")
        elif x:
            param(node, 1, 1, x, "consumer")
        g = walk.new(shape[0])
        lay = ((g, 1),)
        if param(node, 1, 0, lay, "producer") and has_bias:
            param(node, 2, 0, lay)  # a computed or shared bias stops the group, with its reason
        return lay
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
            return lay
        if not isinstance(bias, gs.Constant):
            walk.stop(lay, f"{where}: its C input {bias.name} is computed, not a constant")
        elif bias.values.size > 1 and (bias.values.ndim > 2 or bias.values.shape[-1] != shape[out_axis]):
            walk.stop(lay, f"{where}: its C input is not one value per output")
        elif bias.values.size > 1:
            param(node, 2, bias.values.ndim - 1, lay)
        return lay
    # MatMul: reads rows of a 2-D constant; its channel-last output starts a group that stays whole
    if len(shape) != 2:
        return None
    rank = _rank(shapes, node.inputs[0])
    if rank != 2:  # a Linear on tokens: listed with its reason, its layout not followed (the walk's channels are axis 1)
        walk.new(shape[1], f"{where}: a Linear on channel-last tokens (rank {rank or '?'}); attention heads and "
                           "MLP units are not pruned yet")
        return None
    if x:
        if span(x) != shape[0]:
            walk.stop(x, f"{where} reads {shape[0]} rows, the layout has {span(x)}")
        else:
            param(node, 1, 0, x, "consumer")
    return ((walk.new(shape[1], f"{where}: MatMul outputs are not pruned"), 1),)


def _axes(node):
    import onnx_graphsurgeon as gs

    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.ravel(node.inputs[1].values)]
    return None


def _binary(node, ins, shapes, walk, param, where):
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
    if len(ins) == 1:  # a one-input Max or Min is the identity
        return ins[0]
    variables = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)]
    if len(ins) == 2 and len(variables) == 1:
        x, const = ins[variables[0]], node.inputs[1 - variables[0]]
        full = (1,) * (rank - len(const.shape)) + tuple(const.shape)
        axis = 1 - (rank - len(const.shape))
        if full[1] != 1 and not (axis >= 0 and param(node, 1 - variables[0], axis, x)):
            return None
        walk.mark(x, "affine")
        return x
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
    return a


def _flatten(node, x, ins, shapes, walk, where):
    """Flatten, or a Reshape to (batch, -1 or C*H*W): each channel becomes H*W consecutive columns."""
    import onnx_graphsurgeon as gs

    dims = shapes.get(node.inputs[0].name)
    if dims is None or len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[2:]):
        return None
    spatial = int(np.prod(dims[2:], dtype=np.int64))
    if node.op == "Flatten":
        if int(node.attrs.get("axis", 1)) != 1:
            return None
    else:
        target = node.inputs[1]
        if not isinstance(target, gs.Constant) or any(ins[1:]):
            return None
        shape = [int(v) for v in np.ravel(target.values)]
        columns = int(dims[1]) * spatial if isinstance(dims[1], int) else None
        if len(shape) != 2 or shape[1] not in (-1, columns) or (shape[1] == -1 and shape[0] == -1) \
                or (shape[0] not in (0, -1) and shape[0] != dims[0]):
            return None
        walk.reshapes[node.outputs[0].name] = tuple((g, r * spatial) for g, r in x)
    walk.mark(x, "flatten-gemm")
    return tuple((g, r * spatial) for g, r in x)
