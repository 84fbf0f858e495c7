"""GraphBuilder: adds nodes to an onnx-graphsurgeon graph, respecting the opset."""

from __future__ import annotations

import numpy as np


class GraphBuilder:
    """Adds nodes to a gs graph, respecting the opset (Reduce* axes became an input at 18)."""

    def __init__(self, graph, opset: int):
        self.graph, self.opset, self.count = graph, opset, 0

    def fresh_name(self, hint):
        self.count += 1
        return f"asr_{hint}_{self.count}"

    def op(self, op, inputs, attrs=None, dtype=np.float32, out=None):
        import onnx_graphsurgeon as gs

        out = out or gs.Variable(self.fresh_name(op.lower()), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.fresh_name(op), attrs or {}, inputs, [out]))
        return out

    def const(self, values, hint="c"):
        import onnx_graphsurgeon as gs

        return gs.Constant(self.fresh_name(hint), np.asarray(values))

    def reduce(self, op, x, axes):
        if self.opset >= 18:
            return self.op(op, [x, self.const(np.array(axes, np.int64), "axes")], {"keepdims": 1})
        return self.op(op, [x], {"axes": list(axes), "keepdims": 1})
