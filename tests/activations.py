"""Full intermediate tensors and sites of a model: the tests' reference, not the tool's way."""

import onnx
import onnxruntime as ort

from asr_onnx.model.graph import find_layers, find_sites, to_graph


def activations(model, names, x):
    """The full intermediate tensors, exposed as extra outputs: the reference, not the tool's way."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input": x})))


def sites_of(model):
    graph = to_graph(model)
    return find_sites(graph, find_layers(graph))
