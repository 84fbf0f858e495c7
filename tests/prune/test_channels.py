"""Structured channel pruning (issue 16): dependency groups on the zoo's graphs, surgery checked against a
PyTorch oracle of the shrunk graph and against the masked model, the constant fold, scores and the CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import zoo
from onnx import numpy_helper
from paths import SAMPLES

from asr_onnx.measure.stats import GramStats
from asr_onnx.model.graph import static_shapes
from asr_onnx.pipeline.driver import Repair
from asr_onnx.prune import channels
from asr_onnx.prune.channels import count, select


def torch_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """An independent interpreter of the zoo's ops in PyTorch (float64): the graph's first output."""
    values = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    values[model.graph.input[0].name] = torch.from_numpy(x.astype(np.float64))
    for node in model.graph.node:
        a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        ins = [values[name] for name in node.input if name]
        values[node.output[0]] = torch_op(node.op_type, ins, a)
    return values[model.graph.output[0].name].numpy()


def torch_op(op, ins, a):
    if op == "Conv":
        pads = a.get("pads", [0, 0, 0, 0])
        return F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1, 1]),
                        padding=pads[:2], groups=a.get("group", 1))
    if op == "BatchNormalization":
        return F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5))
    if op == "Gemm":
        w = ins[1].T if a.get("transB", 0) else ins[1]
        return a.get("alpha", 1.0) * ins[0] @ w + (a.get("beta", 1.0) * ins[2] if len(ins) > 2 else 0)
    if op == "Reshape":
        return ins[0].reshape([int(v) for v in ins[1]])
    if op == "Clip":
        return torch.clamp(ins[0], float(ins[1]), float(ins[2]))
    if op == "Softmax":
        return torch.softmax(ins[0], a.get("axis", -1))
    if op == "Concat":
        return torch.cat(ins, a["axis"])
    if op == "MaxPool":
        return F.max_pool2d(ins[0], a["kernel_shape"], a["strides"])
    unary = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Flatten": lambda t: t.flatten(1),
             "GlobalAveragePool": lambda t: t.mean((2, 3), keepdim=True)}
    if op in unary:
        return unary[op](ins[0])
    return {"Add": torch.add, "Mul": torch.mul}[op](ins[0], ins[1])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def shrunk(model, sparsity=0.5, score="magnitude", exclude=()):
    plan = channels.plan(model, sparsity=sparsity, score=score, exclude=exclude)
    masked = channels.mask(model, plan.groups, plan.keep)
    return plan, masked, channels.shrink(masked, plan.groups, plan.keep)


def check_valid(model):
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


EXPECTED = {  # kind -> the kinds of the prunable groups (the head's group is a graph output, the one before it
    # reaches the head's Gemm through GlobalAveragePool and Flatten)
    "residual": {"residual", "flatten-gemm"}, "depthwise": {"depthwise", "flatten-gemm"},
    "grouped": {"flatten-gemm"}, "concat": {"concat", "flatten-gemm"},
    "se-gate": {"se-gate", "plain", "flatten-gemm"}, "flatten-gemm": {"flatten-gemm", "plain"},
    "flatten": {"flatten-gemm", "plain"}, "affine": {"affine", "flatten-gemm"},
}


@pytest.mark.parametrize("kind", list(zoo.CHANNEL_CLASSES))
def test_every_group_kind_prunes_to_a_valid_smaller_graph(kind):
    model, feeds = zoo.CHANNEL_CLASSES[kind]()
    x = feeds["input"]
    np.testing.assert_allclose(run(model, x), torch_run(model, x), rtol=1e-4, atol=1e-5)  # the oracle holds
    plan, masked, small = shrunk(model)
    groups = plan.groups
    assert {groups.kind(g) for g in groups.prunable()} == EXPECTED[kind]
    check_valid(small)
    out = run(small, x)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, torch_run(small, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, run(masked, x), rtol=1e-4, atol=1e-5)  # slicing computes what masking does
    assert count.params(small) < count.params(model) and count.macs(small) < count.macs(model)


def test_grouped_conv_and_unsafe_tensors_stay_whole_with_the_reason():
    model, _ = zoo.channels_grouped()
    groups = channels.plan(model, sparsity=0.5).groups
    assert sorted(why.split(" (")[0].split(" ")[0] for why in groups.whole.values()) == ["graph", "grouped", "grouped"]
    model, feeds = zoo.channels_unsafe()
    plan, _, small = shrunk(model)
    reasons = sorted(plan.groups.whole.values())
    assert any(r.startswith("graph output") for r in reasons) and any("Softmax" in r for r in reasons)
    assert any(r.startswith("read by Add") for r in reasons)
    assert [plan.groups.kind(g) for g in plan.groups.prunable()] == ["flatten-gemm"]  # the conv before the head
    check_valid(small)
    assert np.isfinite(run(small, feeds["input"])).all()
    custom, _ = zoo.custom_domain()
    whole = channels.plan(custom, sparsity=0.5).groups.whole.values()
    assert any("custom-domain op com.microsoft.Gelu" in r for r in whole)


def test_zero_channels_removed_returns_the_input_model():
    model, feeds = zoo.channels_residual()
    calib = zoo.DictSet(feeds)
    assert channels.shrink(model, *channels.plan(model, sparsity=0.0).groups_keep()) is model
    for method in ("none", "bn"):
        job = Repair(model, device="cpu", progress=False).prune(0.0, "channels").run(calib, method)
        assert job.report()["channels"]["params"] == [count.params(model)] * 2
        for out, init in zip(job.output.graph.initializer, model.graph.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(out), numpy_helper.to_array(init))
        np.testing.assert_array_equal(run(job.output, feeds["input"]), run(model, feeds["input"]))


def zeroed_positions(model, small):
    """The input channels the 3x3 conv lost: exactly the dense model's zero channels."""
    first = numpy_helper.to_array(model.graph.initializer[0])
    zero = np.flatnonzero(np.abs(first).reshape(len(first), -1).sum(1) == 0)
    return zero, numpy_helper.to_array(small.graph.initializer[0]).shape[0]


def test_exact_zero_channels_pruned_and_refitted_reproduce_the_dense_outputs():
    model, feeds = zoo.channels_zero()
    calib = zoo.DictSet(feeds)
    later = [model.graph.node[2].name]  # the 3x3 conv's own channels stay
    job = Repair(model, device="cpu", progress=False).prune(0.375, "channels", exclude=later)
    job.run(calib, "bn", reconstruct="ls")
    zero, kept = zeroed_positions(model, job.output)
    assert list(zero) == [1, 4, 6] and kept == 5
    np.testing.assert_allclose(run(job.output, feeds["input"]), run(model, feeds["input"]), atol=1e-5, rtol=1e-5)


def test_a_removed_constant_channel_is_folded_into_the_consumers_bias():
    """After a BN the zero filters give a constant (beta - gamma mu / sigma, then ReLU): shrinking folds it
    into the 1x1 conv's bias, so pruning alone still gives the dense outputs."""
    model, feeds = zoo.channels_zero(bn=True)
    x = feeds["input"]
    plan, masked, small = shrunk(model, 0.375, exclude=[model.graph.node[3].name])  # the 1x1 conv's stay
    np.testing.assert_allclose(run(masked, x), run(model, x), atol=1e-5)
    np.testing.assert_allclose(run(small, x), run(model, x), atol=1e-5)
    np.testing.assert_allclose(torch_run(small, x), torch_run(model, x), atol=1e-5)


def test_flops_target_is_met_and_macs_are_counted():
    model, _ = zoo.channels_residual()
    shapes = static_shapes(model)
    conv = model.graph.node[0]
    out = shapes[conv.output[0]]
    assert count.layer_macs(model)[conv.output[0]] == 8 * out[2] * out[3] * 3 * 9  # out elements x (in x kernel)
    plan = channels.plan(model, flops_target=0.5)
    small = channels.shrink(channels.mask(model, plan.groups, plan.keep), plan.groups, plan.keep)
    assert count.macs(small) <= 0.5 * count.macs(model)
    assert count.macs(small) > 0.3 * count.macs(model)  # stops once the target is reached
    with pytest.raises(Exception, match="cannot be reached"):
        channels.plan(model, flops_target=0.01)


def test_greedy_error_matrix_matches_the_consumers_output_error():
    """Σ_{i,j∈R} H[i,j] is the squared output error of a consumer that loses the input channels R."""
    rng = np.random.default_rng(3)
    channels_in, kernel, outputs = 5, 2, 4
    x, w = rng.normal(size=(200, channels_in * kernel)), rng.normal(size=(outputs, channels_in * kernel))
    y = x @ w.T
    gram = GramStats.of(x, y)
    patch = np.arange(channels_in)[:, None] * kernel + np.arange(kernel)
    h = select.consumer_h(w, gram.xtx[0], float(gram.yy.sum()), patch)
    removed = [1, 3]
    cols = patch[removed].ravel()
    direct = ((x[:, cols] @ w[:, cols].T) ** 2).sum() / (y**2).sum()
    assert h[np.ix_(removed, removed)].sum() == pytest.approx(direct, rel=1e-9)
    order, steps = select.greedy_order(h)
    first = min(range(channels_in), key=lambda i: h[i, i])
    assert order[0] == first and steps[0] == pytest.approx(h[first, first]) and (steps >= 0).all()


def test_greedy_removes_the_channels_that_change_nothing_first():
    model, feeds = zoo.channels_zero()
    plan = channels.plan(model, sparsity=0.375, score="greedy", calib=zoo.ArraySet(feeds["input"]),
                         exclude=[model.graph.node[2].name])
    (group, kept), = plan.keep.items()
    assert list(kept) == [0, 2, 3, 5, 7]
    order, steps = plan.orders[group]
    assert sorted(order[:3]) == [1, 4, 6] and np.allclose(steps[:3], 0) and steps[3] > 0


def test_bn_scale_removes_the_smallest_summed_gammas():
    model, _ = zoo.channels_depthwise()
    plan = channels.plan(model, sparsity=0.5, score="bn-scale")
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gamma = sum(np.abs(inits[bn.input[1]]) for bn in bns)
    (group, kept), = ((g, k) for g, k in plan.keep.items() if plan.groups.kind(g) == "depthwise")
    assert list(kept) == sorted(np.argsort(gamma)[4:])


def test_cli_channels_report_and_errors(tmp_path):
    from asr_onnx.cli.main import main

    model, feeds = zoo.channels_residual()
    path, calib, out, report = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    np.save(calib, feeds["input"])
    args = ["repair", str(path), "--calib", str(calib), "-o", str(out), "--pattern", "channels", "-q",
            "--device", "cpu", "--report", str(report), "--guard", "off"]
    assert main(args + ["--flops-target", "0.6", "--score", "greedy", "--reconstruct", "ls"]) == 0
    entry = json.loads(report.read_text())["channels"]
    assert entry["macs"][1] <= 0.6 * entry["macs"][0] and entry["params"][1] < entry["params"][0]
    assert {"kind", "channels", "removed", "whole"} == set(entry["groups"][0])
    check_valid(onnx.load(str(out)))
    out.unlink()
    assert main(args[:-2] + ["--flops-target", "0.5", "--pattern", "global"]) == 2
    assert main(args + ["--score", "wanda"]) == 2
    assert not out.exists()
    assert main(["repair", str(path), "-o", str(out), "--pattern", "channels", "--score", "greedy",
                 "--method", "none", "-q"]) == 1


def test_the_stage_chain_shrinks_once_before_saving(tmp_path):
    model, feeds = zoo.channels_se_gate()
    calib = zoo.DictSet(feeds)
    job = Repair(model, device="cpu", progress=False).prune(0.5, "channels", score="bn-scale")
    job.measure(calib).correct("bn").fold()
    masked_out = run(job.output, feeds["input"])
    job.to_fp16(calib=calib).save(tmp_path / "o.onnx")
    saved = onnx.load(str(tmp_path / "o.onnx"))
    check_valid(saved)
    assert count.params(saved) == job.report()["channels"]["params"][1] < count.params(model)
    np.testing.assert_allclose(run(saved, feeds["input"]), masked_out, rtol=2e-2, atol=2e-2)  # float16


def test_a_flops_target_keeps_channel_counts_in_blocks_of_eight():
    """onnxruntime's CPU convs block channels by 8: a FLOPs target rounds every kept count of 8 or more down."""

    model = onnx.load(str(SAMPLES / "vgg_bn_bn.onnx"))
    plan = channels.plan(model, flops_target=0.5)
    kept = [len(k) for k in plan.keep.values()]
    assert kept and all(k % select.ALIGN == 0 for k in kept if k >= select.ALIGN)
    small = channels.shrink(channels.mask(model, *plan.groups_keep()), *plan.groups_keep())
    assert count.macs(small) <= 0.5 * count.macs(model)
