"""A model that fixes a batch of 1 is measured with a symbolic batch where shape inference proves it
safe; its output keeps the batch of 1. The oracle is the same graph exported with a dynamic batch."""

import numpy as np
import onnxruntime as ort
import pytest
import zoo
from onnx import helper, numpy_helper

from asr_onnx.measure.stats import merge_all
from asr_onnx.model.batch import BATCH, free_batch
from asr_onnx.pipeline.driver import repair

COMMON = dict(sparsity=0.6, method="bn", batch_size=zoo.N, device="cpu", progress=False)


def outputs(model, x, step):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + step]})[0] for i in range(0, len(x), step)])


@pytest.mark.parametrize("build", [zoo.reshape_batch, zoo.shape_reshape_batch])
def test_a_fixed_batch_1_graph_is_measured_as_its_dynamic_twin(build):
    fixed, feeds = build(1)
    dynamic, _ = build("N")
    plan = free_batch(fixed, 1)  # a target computed from Shape is folded to [1, -1] first, then rewritten
    assert plan is not None and [list(t) for t in plan.targets.values()] == [[0, -1]]
    job, twin = repair(fixed, zoo.DictSet(feeds), **COMMON), repair(dynamic, zoo.DictSet(feeds), **COMMON)
    assert job.settings["symbolic_batch"] and job.settings["batch_size"] == zoo.N
    assert twin.batch.plan is None and not twin.settings["symbolic_batch"]
    for stats, ref in ((job.measurement.pruned, twin.measurement.pruned), (job.measurement.dense, twin.measurement.dense)):
        assert stats.keys() == ref.keys() and stats
        for key in stats:
            got, want = (merge_all(s) if isinstance(s, list) else s for s in (stats[key], ref[key]))
            assert got.count == want.count == want.count
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-5, atol=1e-6, err_msg=key)
            np.testing.assert_allclose(got.var, want.var, rtol=1e-5, atol=1e-7, err_msg=key)
    # the output keeps the user's batch of 1, and computes what the twin's output does
    assert [d.dim_value for d in job.output.graph.input[0].type.tensor_type.shape.dim] == \
        [1] + [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim[1:]]
    shape = next(n.input[1] for n in job.output.graph.node if n.op_type == "Reshape")
    target = next((t for t in job.output.graph.initializer if t.name == shape), None)
    assert target is not None and numpy_helper.to_array(target)[0] == 1  # (the import folds a Shape chain)
    x = feeds["input"]
    np.testing.assert_allclose(outputs(job.output, x, 1), outputs(twin.output, x, zoo.N), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mix", ["softmax", "reduce"])
def test_a_graph_that_mixes_samples_keeps_its_batch_and_is_measured_level_by_level(mix):
    fixed, feeds = zoo.reshape_batch(1, mix=mix)
    assert free_batch(fixed, 1) is None
    job = repair(fixed, zoo.DictSet(feeds), **COMMON)
    assert not job.settings["symbolic_batch"] and job.settings["batch_size"] == 1
    assert all(len(batches) == zoo.N for batches in job.measurement.pruned.values())  # one run per sample


def tiny(nodes, inits, out_shape):
    model = helper.make_model(helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", 1, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", 1, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shape_inference_refuses_what_moves_joins_or_mixes_the_batch():
    moved = tiny([helper.make_node("Transpose", ["input"], ["y"], perm=[1, 0, 2, 3])], {}, [3, 1, 4, 4])
    joined = tiny([helper.make_node("Concat", ["input", "c"], ["y"], axis=1)],
                  {"c": np.zeros((1, 2, 4, 4), np.float32)}, [1, 5, 4, 4])
    folded = tiny([helper.make_node("Reshape", ["input", "s"], ["y"])], {"s": np.array([3, -1])}, [3, 16])
    kept = tiny([helper.make_node("Reshape", ["input", "s"], ["y"])], {"s": np.array([1, 3, -1])}, [1, 3, 16])
    normalised = tiny([helper.make_node("MeanVarianceNormalization", ["input"], ["y"])], {}, [1, 3, 4, 4])
    assert free_batch(normalised, 1) is None  # over axes (0, 2, 3) by default: the samples are mixed
    assert free_batch(moved, 1) is None and free_batch(joined, 1) is None and free_batch(folded, 1) is None
    plan = free_batch(kept, 1)
    assert plan.output_dims == {"y": (BATCH, 3, 16)}
    freed = plan.apply(kept)
    x = zoo.random_inputs(2, (3, 4, 4))
    np.testing.assert_array_equal(outputs(freed, x, 2), x.reshape(2, 3, 16))
