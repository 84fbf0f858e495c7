"""fp16 output: float16 weights and arithmetic, float32 I/O unless asked, shape arithmetic kept float32."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from asr_onnx.errors import AsrError
from asr_onnx.fp16 import to_fp16
from models import conv_net, make_model, random_inputs


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, session.run(None, feeds)[0]


def elem_types(values):
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize("keep_io", [True, False])
def test_conv_net_in_fp16_matches_fp32(keep_io):
    model = conv_net(bn=True)
    x = random_inputs(16)
    _, ref = run(model, {"input": x})
    half = to_fp16(model, keep_io=keep_io)
    onnx.checker.check_model(half, full_check=True)
    io = TensorProto.FLOAT if keep_io else TensorProto.FLOAT16
    assert elem_types(half.graph.input) == {"input": io} and elem_types(half.graph.output) == {"logits": io}
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    assert sum(n.op_type == "Cast" for n in half.graph.node) == (2 if keep_io else 0)
    session, out = run(half, {"input": x if keep_io else x.astype(np.float16)})
    assert out.dtype == (np.float32 if keep_io else np.float16)
    scale = np.abs(ref).max()
    assert np.abs(out.astype(np.float32) - ref).max() <= 5e-3 * scale  # fp16 has 11 significant bits
    assert np.abs(out.astype(np.float32) - ref).max() > 0  # it really computed in float16
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # the input model is untouched


def awkward_model():
    """Conv -> Resize by fp32 scales, + Resize to sizes computed in float from Shape, + a Range (no fp16)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "factor"),
        numpy_helper.from_array(np.array(0, np.float32), "start"),
        numpy_helper.from_array(np.array(16, np.float32), "limit"),
        numpy_helper.from_array(np.array(1, np.float32), "delta"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["r1"], mode="nearest"),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["shape_f", "factor"], ["sizes_f"]),
        helper.make_node("Cast", ["sizes_f"], ["sizes"], to=TensorProto.INT64),
        helper.make_node("Resize", ["c", "", "", "sizes"], ["r2"], mode="nearest"),
        helper.make_node("Add", ["r1", "r2"], ["s"]),
        helper.make_node("Range", ["start", "limit", "delta"], ["ramp"]),
        helper.make_node("Mul", ["ramp", "half"], ["ramp_half"]),
        helper.make_node("Add", ["s", "ramp_half"], ["y"]),
    ]
    return make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])])


def test_scales_shape_arithmetic_and_ops_without_fp16_stay_float32():
    model = awkward_model()
    x = random_inputs(4, (4, 8, 8))
    _, ref = run(model, {"x": x})
    half = to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    dtypes = {t.name: t.data_type for t in half.graph.initializer}
    assert dtypes["w"] == TensorProto.FLOAT16
    # Resize scales are tensor(float) in the schema; sizes come from float arithmetic on a Shape
    assert dtypes["scales"] == dtypes["factor"] == TensorProto.FLOAT
    # Range has no float16 kernel in the schema: its inputs stay float32, a Cast joins it to the fp16 Add
    assert dtypes["start"] == dtypes["limit"] == dtypes["delta"] == TensorProto.FLOAT
    casts = {n.output[0]: n for n in half.graph.node if n.op_type == "Cast"}
    shape_cast = next(n for n in half.graph.node if n.input[0] == "shape")
    assert shape_cast.attribute[0].i == TensorProto.FLOAT  # not rewritten to float16
    assert any(n.input[0] in ("ramp", "ramp_half") and n.attribute[0].i == TensorProto.FLOAT16 for n in casts.values())
    _, out = run(half, {"x": x})
    assert out.shape == ref.shape == (4, 4, 16, 16)
    assert np.abs(out - ref).max() <= 5e-3 * np.abs(ref).max()


def test_constant_wanted_in_both_precisions_is_stored_twice_and_huge_values_are_clipped():
    nodes = [helper.make_node("Mul", ["x", "k"], ["a"]),
             helper.make_node("Range", ["zero", "k", "k"], ["r"]),  # float32 only
             helper.make_node("ReduceSum", ["r"], ["rs"], keepdims=1),
             helper.make_node("Add", ["a", "rs"], ["b"]),
             helper.make_node("Add", ["b", "big"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1.5, np.float32), "k"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1e6], np.float32), "big")]
    model = make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], opset=17)
    with pytest.warns(UserWarning, match="clipped"):
        half = to_fp16(model)
    dtypes = {t.name: t.data_type for t in half.graph.initializer}
    assert dtypes["k"] == TensorProto.FLOAT16 and dtypes["k_fp32"] == TensorProto.FLOAT
    assert numpy_helper.to_array(next(t for t in half.graph.initializer if t.name == "big"))[0] == 65504
    _, out = run(half, {"x": np.array([[2.0]], np.float32)})
    assert out[0, 0] == pytest.approx(3.0 + 1.5 * 0 + 65504, rel=1e-3)


def test_control_flow_is_refused():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)]
    model = make_model(nodes, [numpy_helper.from_array(np.array(0, np.float32), "zero")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(AsrError, match="control flow"):
        to_fp16(model)
