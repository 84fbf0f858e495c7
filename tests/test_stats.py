"""Statistics from the augmented graph against numpy over the full activations."""

import numpy as np
import onnx
import onnxruntime as ort

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


def test_stats_equal_numpy_over_unequal_batches():
    model, x = conv_net(bn=True), random_inputs(30) * 3 + 5  # an offset that naive sums would cancel badly
    per_batch, _ = measure(model, ArraySet(x), batch_size=7, device="cpu", progress=False)
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


def test_extra_outputs_are_per_channel_vectors_only():
    """The memory bound: nothing bigger than a per-channel vector leaves the session."""
    model, x = conv_net(bn=True), random_inputs(8)
    augmented, sites = stats_model(model)
    channels = {s.key: (s.bn.inputs[1].shape[0] if s.bn is not None else s.layer.channels) for s in sites}
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x})
    assert len(outputs) == 3 * len(sites)
    for value, site in zip(outputs[::3], sites):
        assert value.size == channels[site.key]
    for value in outputs:
        assert value.size <= max(channels.values())
    assert {o.name for o in augmented.graph.output}.isdisjoint({"logits"})


def test_statistic_leaves_are_listed_last_site_first():
    """So that onnxruntime runs each site's reduction right after its producer and frees the activation."""
    augmented, sites = stats_model(conv_net(bn=True))
    tail = [n.output[0] for n in augmented.graph.node[-2 * len(sites):]]  # each site's m2 and size
    assert all(name.startswith("asr_stat.") for name in tail)
    indices = [int(name.split(".")[1]) for name in tail]
    assert indices == sorted(indices, reverse=True) and set(indices) == set(range(len(sites)))
