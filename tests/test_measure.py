"""Measurement over a calibration set against numpy over the full activations."""

import numpy as np
import onnxruntime as ort
import pytest

from asr_onnx.measure import measure
from asr_onnx.stats import ChannelStats, merge_all
from models import ArraySet, conv_net, random_inputs
from activations import activations, sites_of


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
