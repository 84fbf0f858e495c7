"""Statistics from the augmented graph against numpy over the full activations."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from asr_onnx.graph import find_layers, find_sites, to_graph
from asr_onnx.stats import ChannelStats, measure, merge_all, stats_model
from models import ArraySet, conv_net, random_inputs


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


@pytest.mark.parametrize("kernel", ["reduce", "bn"])
def test_stats_equal_numpy_over_unequal_batches(kernel):
    model, x = conv_net(bn=True), random_inputs(30) * 3 + 5  # an offset that naive sums would cancel badly
    per_batch, _ = measure(model, ArraySet(x), batch_size=7, device="cpu", progress=False, kernel=kernel)
    sites = sites_of(model)
    full = activations(model, [s.key for s in sites], x)
    for site in sites:
        assert len(per_batch[site.key]) == 5  # 7+7+7+7+2
        got = merge_all(per_batch[site.key])
        ref = ChannelStats.of(full[site.key], -1 if site.channel_last else 1)
        assert got.count == ref.count
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6 * np.abs(ref.mean).max())
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-5)


def test_chan_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(1e3, 1, size=(50, 4))
    parts = [ChannelStats.of(x[:3], -1), ChannelStats.of(x[3:20], -1), ChannelStats.of(x[20:], -1)]
    merged, ref = merge_all(parts), ChannelStats.of(x, -1)
    np.testing.assert_allclose(merged.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, ref.var, rtol=1e-9)


@pytest.mark.parametrize("kernel", ["reduce", "bn"])
@pytest.mark.parametrize("renormalise", [False, True])
def test_extra_outputs_are_per_channel_vectors_only(kernel, renormalise):
    """The memory bound: nothing bigger than a per-channel vector leaves the session."""
    model, x = conv_net(bn=True), random_inputs(8)
    channels = {s.key: (s.bn.inputs[1].shape[0] if s.bn is not None else s.layer.channels) for s in sites_of(model)}
    norms = {key: (np.ones(c), np.zeros(c), 1e-5) for key, c in channels.items()}
    augmented, sites = stats_model(model, norms if renormalise else None, kernel=kernel)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": x})))
    assert len(outputs) >= 2 * len(sites)
    for index, site in enumerate(sites):
        assert outputs[f"asr_stat.{index}.mean"].size == channels[site.key]
    for value in outputs.values():
        assert value.size <= max(channels.values())
    assert {o.name for o in augmented.graph.output}.isdisjoint({"logits"})


def test_statistic_leaves_are_listed_last_site_first():
    """So that onnxruntime runs each site's reduction right after its producer and frees the activation."""
    augmented, sites = stats_model(conv_net(bn=True))
    tail = [n.output[0] for n in augmented.graph.node[-2 * len(sites):]]  # each site's m2 and size
    assert all(name.startswith("asr_stat.") for name in tail)
    indices = [int(name.split(".")[1]) for name in tail]
    assert indices == sorted(indices, reverse=True) and set(indices) == set(range(len(sites)))


@pytest.mark.parametrize("opset", [13, 17])
def test_bn_kernel_renormalises_as_the_reductions_do(opset):
    """Train-mode renormalisation by one BatchNormalization (scale corrected to the unbiased variance)
    gives the reduction graph's statistics at every site; below opset 14 the reductions are used."""
    model, x = conv_net(bn=True, opset=opset), random_inputs(24) * 2 + 1
    rng = np.random.default_rng(1)
    norms = {}
    for site in sites_of(model):
        c = site.bn.inputs[1].shape[0] if site.bn is not None else site.layer.channels
        norms[site.key] = (rng.uniform(0.5, 2, c), rng.normal(0, 1, c), 1e-3)
    got = {k: measure(model, ArraySet(x), batch_size=8, device="cpu", norms=norms, progress=False, kernel=k)[0]
           for k in ("reduce", "bn")}
    ops = {n.op_type for n in stats_model(model, norms, kernel="bn")[0].graph.node}
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
    augmented, sites = stats_model(model, kernel="bn")
    conv_sites = {s.key for s in sites if not s.channel_last}
    assert conv_sites and not [n for n in augmented.graph.node if n.op_type == "Size" and n.input[0] in conv_sites]
    per_batch, _ = measure(model, ArraySet(x), batch_size=6, device="cpu", progress=False, kernel="bn")
    full = activations(model, [s.key for s in sites], x)
    for site in sites:
        got, ref = merge_all(per_batch[site.key]), ChannelStats.of(full[site.key], -1 if site.channel_last else 1)
        assert got.count == ref.count
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6 * np.abs(ref.mean).max())
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-4)


def test_a_graph_output_is_measured_from_the_model_as_it_is():
    """A classifier head whose output is the graph output needs no statistics graph: the logits that the
    model returns anyway are reduced on the host. A key that names no site measures nothing."""
    model, x = conv_net(bn=True), random_inputs(20)
    per_batch, _ = measure(model, ArraySet(x), batch_size=8, device="cpu", progress=False, keys={"logits"})
    logits = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got, ref = merge_all(per_batch["logits"]), ChannelStats.of(logits, -1)
    assert len(per_batch["logits"]) == 3 and got.count == ref.count == 20
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-6)
    assert measure(model, ArraySet(x), batch_size=8, device="cpu", progress=False, keys={"nothing"})[0] == {}
