"""fp16 output: float16 weights and arithmetic, float32 I/O unless asked, shape arithmetic kept float32."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import conv_net, make_model, random_inputs

from asr_onnx.errors import AsrError
from asr_onnx.verify.fp16 import to_fp16


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


def numpy_wide_bn(model, x, after):
    """zoo.wide_bn computed in float64 from its initializers."""
    from oracles import conv3x3

    a = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    channel = (1, -1, 1, 1)
    h = conv3x3(x.astype(np.float64), a["w1"]) + a["b2"].reshape(channel)
    names = ("bn4", "bn5", "bn6", "bn7", "fc12", "fcb13") if after == "conv" else \
        ("bn7", "bn8", "bn9", "bn10", "fc15", "fcb16")
    if after == "add":
        h = h + conv3x3(x.astype(np.float64), a["w4"])
    scale, bias, mean, var, fc, fcb = (a[n] for n in names)
    h = (h - mean.reshape(channel)) / np.sqrt(var.reshape(channel) + 1e-5) * scale.reshape(channel)
    h = np.maximum(h + bias.reshape(channel), 0).mean(axis=(2, 3))
    return h @ fc.T + fcb


@pytest.mark.parametrize("after", ["conv", "add"])
def test_a_bn_variance_above_the_float16_range_is_folded_or_kept_in_float32(after):
    """A variance of 1e8 clipped to 65504 made a PP-OCRv4 detector's output unrelated to the dense one."""
    import zoo

    from asr_onnx.verify.fp16 import FP16_MAX, check_fp16

    model, feeds = zoo.wide_bn(after)
    x = feeds["input"]
    want = numpy_wide_bn(model, x, after)
    _, fp32 = run(model, feeds)
    np.testing.assert_allclose(fp32, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())  # the oracle is right
    half = to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    bns = [n for n in half.graph.node if n.op_type == "BatchNormalization"]
    inits = {t.name: t for t in half.graph.initializer}
    if after == "conv":  # folded into the Conv: no float16 tensor holds the variance or the 1e4-sized activations
        assert not bns
    else:  # kept, with its parameters in float32, and run in float32
        assert len(bns) == 1 and all(inits[name].data_type == TensorProto.FLOAT for name in bns[0].input[1:])
        assert np.abs(numpy_helper.to_array(inits[bns[0].input[4]])).max() > FP16_MAX
        producer = next(n for n in half.graph.node if bns[0].input[0] in n.output)
        assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in half.graph.initializer)
    assert any(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    _, got = run(half, feeds)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    errors = check_fp16(model, half, zoo.DictSet(feeds), device="cpu")
    assert list(errors) == ["fc" + ("14" if after == "conv" else "17")] and 0 < errors[next(iter(errors))] <= 1e-2


@pytest.mark.parametrize("mix", [None, "softmax"])
def test_a_fixed_batch_1_model_is_checked_batched_where_its_batch_can_be_freed(mix):
    import zoo

    from asr_onnx.model.batch import free_batch
    from asr_onnx.verify.fp16 import FIXED_LIMIT, check_fp16

    model, feeds = zoo.reshape_batch(1, mix=mix)
    half = to_fp16(model)
    assert (free_batch(half, 1) is None) == (mix is not None)
    with pytest.raises(AsrError, match=f"on {zoo.N if mix is None else FIXED_LIMIT} calibration samples"):
        check_fp16(model, half, zoo.DictSet(feeds), device="cpu", tolerance=0)
    errors = check_fp16(model, half, zoo.DictSet(feeds), device="cpu")
    assert 0 < max(errors.values()) <= 1e-2


def test_an_output_that_leaves_the_float16_range_is_refused():
    """An output of 1.6e5 (twice a Mul by 400): no constant is out of range, but the float16 output is
    infinite; the check says so instead of writing it."""
    from asr_onnx.verify.fp16 import check_fp16

    nodes = [helper.make_node("Mul", ["x", "k"], ["a"]), helper.make_node("Mul", ["a", "k"], ["y"])]
    model = make_model(nodes, [numpy_helper.from_array(np.array(400.0, np.float32), "k")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    import zoo

    feeds = {"x": np.full((3, 4), 1.0, np.float32)}
    with pytest.raises(AsrError, match="not finite in float16"):
        check_fp16(model, to_fp16(model, keep_io=False), zoo.DictSet(feeds), device="cpu")


def test_the_cli_refuses_a_float16_output_that_is_far_from_float32(tmp_path, capsys):
    from asr_onnx.cli.main import main

    nodes = [helper.make_node("Mul", ["x", "k"], ["a"]), helper.make_node("Sub", ["a", "x"], ["y"])]
    model = make_model(nodes, [numpy_helper.from_array(np.array(1.0001, np.float32), "k")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    source, calib, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "half.onnx"
    onnx.save(model, source)
    np.save(calib, np.random.default_rng(0).normal(0, 1, (8, 4)).astype(np.float32))
    code = main(["repair", str(source), "--sparsity", "0", "--method", "none", "--fp16", "-o", str(out)])
    assert code == 1 and "--calib is required for --fp16" in capsys.readouterr().err
    code = main(["repair", str(source), "--calib", str(calib), "--sparsity", "0", "--method", "none", "--fp16",
                 "-o", str(out), "-q"])  # -q: no stage lines before the error off a TTY
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: fp16: output 'y' differs from float32") and len(err.splitlines()) == 1
    assert not out.exists()  # y = 1e-4 * x, but 1.0001 is 1 in float16


def test_constant_wanted_in_both_precisions_is_stored_twice_and_huge_values_stay_float32():
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
    half = to_fp16(model)
    dtypes = {t.name: t.data_type for t in half.graph.initializer}
    assert dtypes["k"] == TensorProto.FLOAT16 and dtypes["k_fp32"] == TensorProto.FLOAT
    assert dtypes["big"] == TensorProto.FLOAT  # not clipped to 65504: kept, and its Add runs in float32
    assert numpy_helper.to_array(next(t for t in half.graph.initializer if t.name == "big"))[0] == 1e6
    _, out = run(half, {"x": np.array([[2.0]], np.float32)})
    assert out[0, 0] == pytest.approx(3.0 + 1.5 * 0 + 1e6, rel=1e-6)


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


def test_a_model_with_float16_inputs_is_scored_on_float32_data():
    """An --fp16-io model is evaluated (the verdict, --eval) on the same float32 data as its dense model: the one
    batch loop gives each float feed the float type of the input; onnxruntime refused float32 for float16."""
    from zoo import ArraySet

    from asr_onnx.verify.evaluation import evaluate

    dense = conv_net(bn=True)
    half = to_fp16(dense, keep_io=False)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    data = random_inputs(16)
    scored = evaluate(half, ArraySet(data), reference=dense, device="cpu", progress=False)
    assert scored["samples"] == 16 and scored["agreement"] == 1.0 and scored["logit_rel_l2"] < 1e-2
