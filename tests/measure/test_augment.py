"""The statistics graph: what leaves it, in which order, and what its kernels compute."""

import numpy as np
import onnxruntime as ort
import pytest
from activations import activations, sites_of
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.measure.norms import Norm
from asr_onnx.measure.passes import measure
from asr_onnx.measure.stats import ChannelStats, merge_all
from asr_onnx.measure.statsgraph import stats_model


@pytest.mark.parametrize("kernel", ["reduce", "bn"])
@pytest.mark.parametrize("renormalise", [False, True])
def test_extra_outputs_are_per_channel_vectors_only(kernel, renormalise):
    """The memory bound: nothing bigger than a per-channel vector leaves the session."""
    model, x = conv_net(bn=True), random_inputs(8)
    channels = {s.key: (s.bn.inputs[1].shape[0] if s.bn is not None else s.layer.channels) for s in sites_of(model)}
    norms = {key: Norm(np.ones(c), np.zeros(c), np.zeros(c), np.ones(c), 1e-5) for key, c in channels.items()}
    stats_graph = stats_model(model, norms if renormalise else None, kernel=kernel)
    augmented, readers = stats_graph.model, stats_graph.readers
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": x})))
    assert len(outputs) >= 2 * len(readers)
    for reader in readers:
        assert outputs[reader.mean].size == channels[reader.key]
    for value in outputs.values():
        assert value.size <= max(channels.values())
    assert {o.name for o in augmented.graph.output}.isdisjoint({"logits"})


def test_statistic_leaves_are_listed_last_site_first():
    """So that onnxruntime runs each site's reduction right after its producer and frees the activation."""
    stats_graph = stats_model(conv_net(bn=True))
    augmented, readers = stats_graph.model, stats_graph.readers
    tail = [n.output[0] for n in augmented.graph.node[-2 * len(readers):]]  # each site's m2 and size
    assert all(name.startswith("asr_stat.") for name in tail)
    indices = [int(name.split(".")[1]) for name in tail]
    assert indices == sorted(indices, reverse=True) and set(indices) == set(range(len(readers)))


@pytest.mark.parametrize("opset", [13, 17])
def test_bn_kernel_renormalises_as_the_reductions_do(opset):
    """Train-mode renormalisation by one BatchNormalization (scale corrected to the unbiased variance)
    gives the reduction graph's statistics at every site; below opset 14 the reductions are used."""
    model, x = conv_net(bn=True, opset=opset), random_inputs(24) * 2 + 1
    rng = np.random.default_rng(1)
    norms = {}
    for site in sites_of(model):
        c = site.bn.inputs[1].shape[0] if site.bn is not None else site.layer.channels
        norms[site.key] = Norm(rng.uniform(0.5, 2, c), rng.normal(0, 1, c), np.zeros(c), np.ones(c), 1e-3)
    got = {k: measure(model, ArraySet(x), batch_size=8, device="cpu", norms=norms, progress=False, kernel=k)[0]
           for k in ("reduce", "bn")}
    ops = {n.op_type for n in stats_model(model, norms, kernel="bn").model.graph.node}
    assert ("ReduceSumSquare" in ops) == (opset < 14)
    for key, batches in got["reduce"].items():
        for ref, bn in zip(batches, got["bn"][key]):
            assert ref.count == bn.count
            np.testing.assert_allclose(bn.mean, ref.mean, rtol=1e-4, atol=1e-5 * np.abs(ref.mean).max())
            np.testing.assert_allclose(bn.var, ref.var, rtol=1e-4)


def test_conv_moments_need_no_layout_copy_when_shapes_are_static():
    """The dense pass on the CPU reads conv sites with GlobalAveragePool only: no Size node (which needs
    the plain layout) where the count per sample is static, and the statistics still equal numpy's."""
    model, x = conv_net(bn=False), random_inputs(20) * 2 + 3
    sites = sites_of(model)
    stats_graph = stats_model(model, kernel="bn")
    augmented = stats_graph.model
    assert [r.key for r in stats_graph.readers] == [s.key for s in sites]
    conv_sites = {s.key for s in sites if not s.channel_last}
    assert conv_sites and not [n for n in augmented.graph.node if n.op_type == "Size" and n.input[0] in conv_sites]
    per_batch, _ = measure(model, ArraySet(x), batch_size=6, device="cpu", progress=False, kernel="bn")
    full = activations(model, [s.key for s in sites], x)
    for site in sites:
        got, ref = merge_all(per_batch[site.key]), ChannelStats.of(full[site.key], -1 if site.channel_last else 1)
        assert got.count == ref.count
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6 * np.abs(ref.mean).max())
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-4)


def test_graphsurgeon_notes_go_to_the_log_not_the_terminal(capsys, caplog):
    """A Constant-fed node that onnxruntime cannot run: graphsurgeon's fold fails on it and says so, which is
    no concern of the user (the node is left as it is)."""
    import logging

    from onnx import TensorProto, helper, numpy_helper

    from asr_onnx.model.graph import to_graph

    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(3, np.float32), "kv")),
             helper.make_node("Weird", ["k"], ["w"], domain="example.custom"),
             helper.make_node("Add", ["input", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    with caplog.at_level(logging.INFO, logger="asr_onnx"):
        to_graph(model)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    assert any("onnx-graphsurgeon" in r.getMessage() for r in caplog.records)


def test_each_reader_names_its_outputs_count_and_formula():
    """The host reads a site by its reader alone: nothing travels in the model's metadata."""
    from asr_onnx.measure.statsgraph import BIASED_VAR, CENTRED, MOMENTS

    model = conv_net(bn=False)
    reduce, moments = stats_model(model), stats_model(model, kernel="bn")
    assert {r.formula for r in reduce.readers} == {CENTRED}
    assert {r.formula for r in moments.readers} == {MOMENTS, BIASED_VAR}  # conv sites, and the 2-D head
    for stats_graph in (reduce, moments):
        outputs = {o.name for o in stats_graph.model.graph.output}
        assert len(stats_graph.model.metadata_props) == len(model.metadata_props)
        for r in stats_graph.readers:
            assert {r.mean, r.spread} <= outputs and (r.size in outputs) == (r.per_sample is None)
