"""Measurement over a calibration set against numpy over the full activations."""

import numpy as np
import onnxruntime as ort
import pytest
import zoo
from activations import activations, sites_of
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.errors import AsrError
from asr_onnx.measure.passes import measure
from asr_onnx.measure.stats import ChannelStats, merge_all
from asr_onnx.pipeline.driver import repair


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


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("kernel", ["reduce", "bn"])
def test_activations_of_1e19_and_1e30_are_measured_exactly(bn, kernel):
    """Finite float32 activations whose squares overflow: each site is measured as x * 2**-k and scaled back
    in float64, and the statistics equal float64 numpy's over the full activations."""
    model, feeds = zoo.huge_activations(bn)
    x = feeds["input"]
    per_batch, _ = measure(model, ArraySet(x), batch_size=8, device="cpu", progress=False, kernel=kernel)
    sites = sites_of(model)
    full = activations(model, [s.key for s in sites], x)
    assert max(np.abs(v).max() for v in full.values()) > 1e30
    for site in sites:
        got, ref = merge_all(per_batch[site.key]), ChannelStats.of(full[site.key], -1 if site.channel_last else 1)
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6 * np.abs(ref.mean).max())
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-5)


@pytest.mark.parametrize("bn", [False, True])
def test_a_model_with_activations_of_1e30_repairs(bn):
    model, feeds = zoo.huge_activations(bn)
    x = feeds["input"]
    for method in ("bn", "asr"):
        job = repair(model, ArraySet(x), sparsity=0.5, method=method, batch_size=8, device="cpu", progress=False)
        out = ort.InferenceSession(job.output.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                         {"input": x})[0]
        assert np.isfinite(out).all()
        for key, corr in job.corrections.items():
            assert np.isfinite(corr.var).all() and np.isfinite(corr.scale).all(), key
        assert job.corrections[sites_of(model)[-2].key].var.max() > 1e50  # the 1e30 site, in float64


@pytest.mark.parametrize("bn", [False, True])
def test_a_truly_non_finite_activation_names_the_site_and_the_first_sample(bn):
    """Also where the dense pass reads only the logits (BN kept): a probe of every site finds the first."""
    x = random_inputs(24)
    x[13, 0, 2, 2], x[20, 1, 0, 0] = np.inf, np.nan
    with pytest.raises(AsrError, match=r"NaN or Inf in the activations at 'conv1.out', first from calibration "
                                       r"sample 13 "):
        repair(conv_net(bn=bn), ArraySet(x), sparsity=0.5, batch_size=8, device="cpu", progress=False)


@pytest.mark.parametrize("ratio", [100, 1000])
def test_dense_moments_keep_the_variance_of_a_channel_far_from_zero(ratio):
    """A conv output whose |mean| is 100 or 1000 times its std: E[x^2] - E[x]^2 in float32 would lose 1e-2
    to all of the variance, so such a site is measured centred; the result equals float64 numpy's."""
    g = zoo.G(13)
    w = g.weight((4, 3, 3, 3), 27) / np.sqrt(2)  # unit-variance outputs on unit-variance inputs
    h = g.relu(g.node("Conv", ["input", g.init("w", w), g.init("b", np.full(4, float(ratio)))], "conv",
                      pads=[1, 1, 1, 1]))
    model = g.model([("input", ["N", 3, 8, 8], None)], g.head(h, 4))
    x = random_inputs(48)
    site = sites_of(model)[0]
    ref = ChannelStats.of(activations(model, [site.key], x)[site.key], 1)
    assert np.all(ref.mean**2 / ref.var > ratio**2 / 4)
    per_batch, _ = measure(model, ArraySet(x), batch_size=16, device="cpu", progress=False, kernel="bn")
    got = merge_all(per_batch[site.key])
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-4)
