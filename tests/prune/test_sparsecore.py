"""2:4 conformance and sparse-tensor-core eligibility, checked against Polygraphy's own sparsity check."""

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import ArraySet, conv_net, make_model, random_inputs

from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.pipeline.driver import Repair, repair
from asr_onnx.prune.sparsecore import conformance, conforms_nm, eligibility, eligibility_summary, layer_rows


def loop_conforms(w, n, m, axis):
    """The definition, written as loops over every group."""
    w = np.moveaxis(w, axis, 0)
    for start in range(0, w.shape[0], m):
        counts = np.count_nonzero(w[start : start + m], axis=0)
        if np.any(counts > n):
            return False
    return True


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_conforms_nm_matches_the_loop_definition(axis):
    rng = np.random.default_rng(axis)
    for trial in range(20):
        w = rng.normal(size=(8, 8, 4)) * (rng.random((8, 8, 4)) < 0.5 + trial / 40)
        for n, m in [(2, 4), (1, 4), (3, 4), (1, 2)]:
            assert conforms_nm(w, n, m, axis) == loop_conforms(w, n, m, axis)


def test_conforms_nm_is_along_the_given_axis_only():
    w = np.zeros((4, 8), np.float32)
    w[0, :] = 1.0  # row 0 dense, so groups along axis 1 have 4 nonzeros; along axis 0 only 1
    w[1, :] = 1.0
    assert conforms_nm(w, 2, 4, 0) and not conforms_nm(w, 2, 4, 1)
    with pytest.raises(ValueError):
        conforms_nm(np.zeros((6, 4)), 2, 4, 0)


def conv_layer(shape, group=1, op="Conv"):
    """One layer of a one-node model with a weight of ``shape``."""
    cin = shape[1] * group if op == "Conv" else shape[0]
    w = numpy_helper.from_array(np.ones(shape, np.float32), "w")
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", group=group)
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w]))
    return find_layers(to_graph(model))[0]


@pytest.mark.parametrize("shape, group, op, eligible, reason", [
    ((256, 256, 1, 1), 1, "Conv", True, None),
    ((512, 32, 3, 3), 8, "Conv", False, "grouped conv"),
    ((32, 1, 3, 3), 32, "Conv", False, "depthwise conv"),
    ((256, 3, 3, 3), 1, "Conv", False, "not a multiple of 4"),
    ((256, 6, 3, 3), 1, "Conv", False, "not a multiple of 4"),
    ((260, 260, 1, 1), 1, "Conv", True, "ASP skips"),
    ((64, 64, 3, 3), 1, "Conv", True, "fewer than 256 channels"),
    ((256, 256, 3, 3), 1, "ConvTranspose", False, "ConvTranspose"),
])
def test_eligibility(shape, group, op, eligible, reason):
    ok, reasons = eligibility(conv_layer(shape, group, op))
    assert ok == eligible
    if reason is None:
        assert reasons == []
    else:
        assert any(reason in r for r in reasons), reasons


def dense_chain(rows=16, hidden=8, out=12):
    """x[N,16] -> MatMul W1(16,8) -> Gemm W2(8,12) (transB=0) -> Gemm W3(12,12)^T (transB=1)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in [("w1", (rows, hidden)), ("w2", (hidden, out)), ("w3", (out, out))]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm"),
             helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="gemm"),
             helper.make_node("Gemm", ["h2", "w3"], ["y"], name="gemm_t", transB=1)]
    return make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])])


def polygraphy_sparse(path) -> tuple[set, set]:
    """Runs ``polygraphy inspect sparsity`` (the console script's code) and parses its verdicts."""
    code = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, "inspect", "sparsity", str(path)],
                            capture_output=True, text=True, timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 0 and "PASSED" in text, text
    sparse = set(re.findall(r"Found sparse tensor: (\S+)", text))
    dense = set(re.findall(r"Found non-sparse tensor: (\S+)", text))
    assert sparse or dense, text
    return sparse, dense


def test_every_24_pruned_layer_of_a_repair_passes_polygraphy(tmp_path):
    model = conv_net(channels=(4, 8, 16))
    x = random_inputs(32, (4, 8, 8))
    job = repair(model, ArraySet(x), pattern="2:4", method="bn", batch_size=16, device="cpu", progress=False)
    path = tmp_path / "sparse.onnx"
    job.save(path)
    report = job.report()
    pruned = {layer["weight"] for layer in report["layers"] if layer["pruned"]}
    assert report["settings"]["pattern"] == "2:4" and len(pruned) == 4
    sparse, dense = polygraphy_sparse(path)
    assert pruned <= sparse and not dense
    rows = layer_rows(onnx.load(str(path)))
    assert {r["weight"] for r in rows if r["nm_24"] == "yes"} == sparse

    # the dense input fails the same check, so the parse above can fail
    onnx.save(model, tmp_path / "dense.onnx")
    sparse, dense = polygraphy_sparse(tmp_path / "dense.onnx")
    assert not sparse and dense == pruned


def test_axes_of_matmul_and_gemm_agree_with_polygraphy(tmp_path):
    job = Repair(dense_chain(), progress=False).prune(pattern="2:4")
    assert [layer.pruned for layer in job.layers] == [True, True, True]
    path = tmp_path / "chain.onnx"
    job.save(path)
    sparse, dense = polygraphy_sparse(path)
    assert sparse == {"w1", "w2", "w3"} and not dense
    # 2:4 along the output axis instead: every weight fails both checks
    graph = to_graph(dense_chain())
    for layer in find_layers(graph):
        w = layer.weight.values
        out = layer.out_axis
        keep = np.moveaxis(np.indices(np.moveaxis(w, out, -1).shape)[-1] % 4 < 2, -1, out)
        layer.weight.values = np.where(keep, w, 0).astype(np.float32)
    from asr_onnx.model.graph import to_model

    onnx.save(to_model(graph, dense_chain()), tmp_path / "wrong.onnx")
    sparse, dense = polygraphy_sparse(tmp_path / "wrong.onnx")
    rows = layer_rows(onnx.load(str(tmp_path / "wrong.onnx")))
    assert not sparse and dense == {"w1", "w2", "w3"}
    assert [r["nm_24"] for r in rows] == ["no", "no", "no"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # polygraphy casts float max into float32
def test_conformance_agrees_with_polygraphy_in_process():
    """Polygraphy's checker called directly on tensors with a few 2:4 violations."""
    from polygraphy.tools.sparse import SparsityPruner

    model = dense_chain()
    job = Repair(model, progress=False).prune(pattern="2:4")
    pruned = job.pruned
    rng = np.random.default_rng(3)
    broken = set()
    for init in pruned.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if rng.random() < 0.5 or init.name == "w2":
            zeros = np.argwhere(w == 0)
            i = tuple(zeros[rng.integers(len(zeros))])
            w[i] = 1.0  # one group now has 3 nonzeros
            broken.add(init.name)
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    checker = SparsityPruner(pruned)
    checker.check()
    rows = {r["weight"]: r["nm_24"] for r in layer_rows(pruned)}
    assert checker.sparse_tensors == {name for name, v in rows.items() if v == "yes"}
    assert broken and set(rows) - checker.sparse_tensors == broken


def test_layer_rows_structure_and_summary():
    rows = layer_rows(conv_net(channels=(3, 8, 16)))
    assert [r["name"] for r in rows] == ["conv1", "conv2", "proj", "fc"]
    assert [r["norm"]["kind"] for r in rows] == ["BatchNormalization"] * 3 + ["none"]
    assert rows[0]["nm_24"] == "n.a." and rows[0]["eligibility"] == "no"
    assert rows[1]["nm_24"] == "no" and rows[1]["eligible"] and rows[1]["eligibility"] == "maybe"
    assert rows[1]["params"] == 16 * 8 * 9 and rows[1]["zeros"] == 0
    lines = eligibility_summary(rows)
    assert lines[0].startswith("sparse tensor cores: 0 eligible, 3 eligible with notes, 1 not eligible")
    assert "  note: 3 layer(s): fewer than 256 channels: TensorRT rarely picks a sparse tactic" in lines
    assert lines[-1] == "  not eligible: conv1: input channels C=3 not a multiple of 4"


def test_conformance_of_a_layer_uses_its_reduction_axis():
    layer = conv_layer((8, 8, 1, 1))
    w = np.zeros((8, 8, 1, 1), np.float32)
    w[:, ::2] = 1.0  # 2 of every 4 input channels: 2:4 along axis 1, dense along axis 0
    layer.weight.values = w
    assert conformance(layer) == "yes"
    layer.weight.values = np.ascontiguousarray(w.transpose(1, 0, 2, 3))
    assert conformance(layer) == "no"
    assert conformance(conv_layer((8, 6, 1, 1))) == "n.a."
