"""Issue 30: the zoo's transformer graphs exported by torch.onnx (tests/zoo.py's last block).

Each runs in onnxruntime as its PyTorch module computes, holds the ops that make it what it is, and comes back
from a repair at sparsity 0 as it went in. Its Linear layers (a MatMul by a constant (C_in, C_out) weight on
channel-last tokens) are pruned 2:4 along C_in, and the refit's Gram sums run over all N·T tokens. The same two
properties on a hand-built token MatMul, with the refit against a numpy solve: tests/refit/test_reconstruct.py's
test_2_4_on_a_token_matmul_runs_along_the_reduction_axis_and_refits_on_every_token.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import helper, numpy_helper

from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.pipeline.defaults import resolved_defaults
from asr_onnx.pipeline.driver import Repair
from asr_onnx.refit.gram import accumulate

pytest.importorskip("torch")

NAMES = sorted(zoo.TRANSFORMERS)


def run(model, feeds, names=None) -> list:
    """The model's output, or the tensors ``names``, on ``feeds`` in onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if names:
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def constants(model) -> dict:
    """name -> value of every initializer and Constant node output."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def ops(model, op) -> list:
    return [node for node in model.graph.node if node.op_type == op]


def linear_layers(model) -> list:
    return [layer for layer in find_layers(to_graph(model)) if layer.op == "MatMul"]


def relative(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", NAMES)
def test_a_transformer_graph_runs_in_onnxruntime_as_its_torch_module(name):
    """24 samples through a graph exported with a batch of 2 (the batch axis is symbolic), against the module in
    float64."""
    model, feeds = zoo.TRANSFORMERS[name]()
    got = run(model, feeds)[0]
    want = zoo.transformer_oracle(name, feeds["input"])
    assert got.shape == want.shape == feeds["input"].shape
    assert relative(got, want) < 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", NAMES)
def test_a_transformer_graph_has_weights_that_are_not_trivial(name):
    """Random LayerNorm gains and shifts and nonzero biases: an identity that held only for gains of 1 and shifts
    of 0 would not pass for these graphs."""
    model, _ = zoo.TRANSFORMERS[name]()
    values = constants(model)
    for node in ops(model, "LayerNormalization"):
        scale, bias = values[node.input[1]], values[node.input[2]]
        assert scale.std() > 0.1 and np.all(bias != 0), node.name
    biases = [values[n.input[0]] for n in ops(model, "Add") if n.input[0] in values and n.input[0].endswith("bias")]
    assert biases and all(np.all(b != 0) for b in biases)


def test_ln_after_linear_is_matmul_add_layernorm_gelu_matmul_add():
    model, _ = zoo.ln_after_linear()
    assert [n.op_type for n in model.graph.node if n.op_type != "Constant"] == [
        "MatMul", "Add", "LayerNormalization", "Div", "Erf", "Add", "Mul", "Mul", "MatMul", "Add"]
    (norm,), values = ops(model, "LayerNormalization"), constants(model)
    assert attrs(norm)["axis"] == -1 and norm.input[0] == ops(model, "Add")[0].output[0]
    assert [values[n.input[1]].shape for n in ops(model, "MatMul")] == [(8, 16), (16, 8)]


def test_mha_heads_splits_the_heads_with_constant_reshapes_and_scales_after_q_kt():
    """As sample_models/train.py's Attention: q, k and v each Reshape to (-1, 6, 4, 4), the heads first by a
    Transpose (k's to (N, heads, head_dim, T)), the scale 4^-0.5 a Mul after Q·Kᵀ, then Softmax; the heads merged
    by Transpose (0, 2, 1, 3) and Reshape (-1, 6, 16)."""
    model, _ = zoo.mha_heads()
    values = constants(model)
    assert [values[n.input[1]].tolist() for n in ops(model, "Reshape")] == [[-1, 6, 4, 4]] * 3 + [[-1, 6, 16]]
    assert sorted(attrs(n)["perm"] for n in ops(model, "Transpose")) == [[0, 2, 1, 3]] * 3 + [[0, 2, 3, 1]]
    weighted = [n for n in ops(model, "MatMul") if n.input[1] in values]
    assert [values[n.input[1]].shape for n in weighted] == [(16, 16)] * 4 + [(16, 32), (32, 16)]
    products = [n for n in ops(model, "MatMul") if n.input[1] not in values]  # of two activations
    assert len(products) == 2 and len(ops(model, "LayerNormalization")) == 2
    (scale,), (softmax,) = ops(model, "Mul")[:1], ops(model, "Softmax")
    assert scale.input[0] == products[0].output[0] and float(values[scale.input[1]]) == 0.5
    assert softmax.input[0] == scale.output[0] and attrs(softmax)["axis"] == -1


def test_convnext_block_is_a_depthwise_7x7_then_a_channel_last_layernorm_and_mlp():
    model, _ = zoo.convnext_block()
    values = constants(model)
    (conv,) = ops(model, "Conv")
    assert conv.input[0] == "input" and attrs(conv)["group"] == 8 and attrs(conv)["pads"] == [3] * 4
    assert values[conv.input[1]].shape == (8, 1, 7, 7) and values[conv.input[2]].shape == (8,)
    first, last = ops(model, "Transpose")
    assert first.input[0] == conv.output[0] and attrs(first)["perm"] == [0, 2, 3, 1]
    (norm,) = ops(model, "LayerNormalization")
    assert norm.input[0] == first.output[0] and attrs(norm)["axis"] == -1
    assert [values[n.input[1]].shape for n in ops(model, "MatMul")] == [(8, 32), (32, 8)]
    assert attrs(last)["perm"] == [0, 3, 1, 2] and ops(model, "Add")[-1].input == ["input", last.output[0]]


def test_window_attention_partitions_4x4_windows_and_adds_the_relative_position_bias():
    """Swin's window partition and reverse as Reshape/Transpose with constant targets; the fused qkv split by a
    Reshape, a Transpose and three Gathers; q scaled before Q·Kᵀ; and the relative-position bias, which
    constant folding gathered from the table at export, a constant equal to the module's table[index]."""
    import torch

    model, _ = zoo.window_attention()
    values = constants(model)
    assert [values[n.input[1]].tolist() for n in ops(model, "Reshape")] == [
        [-1, 2, 4, 2, 4, 16], [-1, 16, 16],  # partition: (N, 8, 8, C) -> (4 N windows, 16 tokens, C)
        [-1, 16, 3, 2, 8], [-1, 16, 16],  # qkv into (3, heads, head_dim); the heads merged again
        [-1, 2, 2, 4, 4, 16], [-1, 64, 16]]  # reverse
    assert [attrs(n)["perm"] for n in ops(model, "Transpose")] == [
        [0, 1, 3, 2, 4, 5], [2, 0, 3, 1, 4], [0, 1, 3, 2], [0, 2, 1, 3], [0, 1, 3, 2, 4, 5]]
    gathers = ops(model, "Gather")
    assert [int(values[n.input[1]]) for n in gathers] == [0, 1, 2] and all(attrs(n)["axis"] == 0 for n in gathers)
    (scale,) = ops(model, "Mul")[:1]
    assert scale.input[0] == gathers[0].output[0] and np.isclose(float(values[scale.input[1]]), 8**-0.5)
    logits = next(n for n in ops(model, "MatMul") if n.input[0] == scale.output[0])
    biased = next(n for n in ops(model, "Add") if n.input[0] == logits.output[0])
    assert ops(model, "Softmax")[0].input[0] == biased.output[0]
    with torch.no_grad():
        expected = zoo.transformer_module("window_attention").bias().numpy()
    assert expected.shape == (2, 16, 16) and np.array_equal(values[biased.input[1]], expected)


def test_window_attention_exported_without_constant_folding_keeps_swins_table_gather():
    """Without the exporter's constant folding the bias is gathered in the graph, as Swin writes it: Gather(table,
    Reshape(index, [-1])), and each Linear is a MatMul by a Transposed initializer. It runs as the module, its
    Linears are found with the folded export's weights, and a default repair at sparsity 0 changes nothing."""
    import torch

    model, feeds = zoo.window_attention(fold=False)
    np.testing.assert_allclose(run(model, feeds)[0], zoo.transformer_oracle("window_attention", feeds["input"]),
                               rtol=1e-5, atol=1e-5)
    values, module = constants(model), zoo.transformer_module("window_attention")
    (gather,) = [n for n in ops(model, "Gather") if n.input[0] in values]
    (flat,) = [n for n in ops(model, "Reshape") if n.output[0] == gather.input[1]]
    with torch.no_grad():
        assert np.array_equal(values[gather.input[0]], module.table.numpy())
    assert np.array_equal(values[flat.input[0]], module.index.numpy()) and values[flat.input[1]].tolist() == [-1]
    folded, _ = zoo.window_attention()
    for got, want in zip(linear_layers(model), linear_layers(folded), strict=True):
        assert np.array_equal(got.weight.values, want.weight.values), got.name
    _, allocation, score, reconstruct = resolved_defaults("global", "bn", "0", None, None, None, True)
    job = Repair(model, batch_size=8, device="cpu", progress=False).prune(0.0, allocation=allocation, score=score)
    job.run(zoo.DictSet(feeds), "bn", reconstruct=reconstruct)
    assert relative(run(job.output, feeds)[0], run(model, feeds)[0]) < 1e-6


@pytest.mark.parametrize("recipe", ["default", "bn"])
@pytest.mark.parametrize("name", NAMES)
def test_a_repair_at_sparsity_0_leaves_a_transformer_graph_as_it_was(name, recipe):
    """The CLI's default repair (its allocation, score and refit: pipeline.defaults.resolved_defaults) and method "bn"
    without the refit, at sparsity 0 on random calibration tokens: every weight as it was, the outputs too."""
    model, feeds = zoo.TRANSFORMERS[name]()
    calib = zoo.DictSet(feeds)
    job = Repair(model, batch_size=8, device="cpu", progress=False)
    if recipe == "default":
        _, allocation, score, reconstruct = resolved_defaults("global", "bn", "0", None, None, None, True)
        assert reconstruct == "ls"
        job.prune(0.0, allocation=allocation, score=score).run(calib, "bn", reconstruct=reconstruct)
    else:
        job.prune(0.0).run(calib, "bn")
        assert not job.refits
    for got, want in zip(find_layers(to_graph(job.output)), find_layers(to_graph(model)), strict=True):
        assert np.array_equal(got.weight.values, want.weight.values), got.name
    got, want = run(job.output, feeds)[0], run(model, feeds)[0]
    assert relative(got, want) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_2_4_keeps_the_two_largest_of_every_four_weights_along_c_in_of_each_linear(name):
    """Every Linear (not the depthwise Conv, nor attention's products of two activations) keeps, for each output
    column, 2 of every 4 consecutive weights along C_in (axis 0 of the MatMul weight): the larger two, as they were."""
    model, _ = zoo.TRANSFORMERS[name]()
    job = Repair(model, device="cpu", batch_size=8, progress=False).prune(0.0, "2:4")
    dense, pruned = linear_layers(model), linear_layers(job.pruned)
    assert len(pruned) == {"ln_after_linear": 2, "mha_heads": 6, "convnext_block": 2, "window_attention": 4}[name]
    for before, after in zip(dense, pruned, strict=True):
        w, kept = before.weight.values, after.weight.values
        assert after.in_axis == 0 and w.shape == kept.shape and w.shape[0] % 4 == 0, after.name
        quads, kept_quads = np.abs(w).reshape(-1, 4, w.shape[1]), kept.reshape(-1, 4, w.shape[1])
        assert np.all((kept_quads != 0).sum(axis=1) == 2), after.name
        larger = np.argsort(-quads, axis=1)[:, :2]  # per (quad, column) the two largest of its four
        assert np.all(np.take_along_axis(kept_quads != 0, larger, axis=1)), after.name
        assert np.array_equal(kept[kept != 0], w[kept != 0]), after.name


@pytest.mark.parametrize("name", NAMES)
def test_the_gram_sums_of_a_linear_run_over_all_n_t_tokens(name):
    """The refit's sums for each Linear of the 2:4-pruned graph against numpy over every token of every sample:
    XᵀX of the pruned layer's input, XᵀY with the dense layer's output (no bias), ΣY², and N·T rows (in the
    windows of window_attention, N·4 windows of 16 tokens). Three batches of 8 samples, merged in float64."""
    dense_model, feeds = zoo.TRANSFORMERS[name]()
    pruned_model = Repair(dense_model, device="cpu", progress=False).prune(0.0, "2:4").pruned
    every = find_layers(to_graph(pruned_model))
    indices = [i for i, layer in enumerate(every) if layer.op == "MatMul"]
    grams, _ = accumulate(dense_model, pruned_model, indices, zoo.DictSet(feeds), batch_size=8, device="cpu")
    inputs = [every[i].node.inputs[0].name for i in indices]
    x_pruned, x_dense = run(pruned_model, feeds, inputs), run(dense_model, feeds, inputs)
    tokens = feeds["input"].shape[1] if name != "convnext_block" else 64
    for i, gram, xp, xd in zip(indices, grams, x_pruned, x_dense, strict=True):
        xp, xd = (x.reshape(-1, x.shape[-1]).astype(np.float64) for x in (xp, xd))
        y = xd @ find_layers(to_graph(dense_model))[i].weight.values.astype(np.float64)
        assert gram.count == len(xp) == len(feeds["input"]) * tokens
        for got, want in ((gram.xtx[0], xp.T @ xp), (gram.xty[0], xp.T @ y), (gram.yy, (y**2).sum(axis=0))):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=every[i].name)
