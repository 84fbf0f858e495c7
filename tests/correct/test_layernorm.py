"""LayerNorm sites (issue 30): a LayerNorm over channels has its output's per-channel statistics restored through its
γ and β, checked in onnxruntime against numpy's forward pass of the dense model."""

import numpy as np
import onnxruntime as ort
import pytest
import zoo
from activations import activations, sites_of
from onnx import numpy_helper

from asr_onnx.measure.passes import measure
from asr_onnx.measure.stats import ChannelStats, merge_all
from asr_onnx.pipeline.driver import repair

COMMON = dict(sparsity=0.6, method="bn", device="cpu", progress=False)


def ln_key(model) -> str:
    return next(s.key for s in sites_of(model) if s.ln is not None)


def ln_stats(model, x) -> ChannelStats:
    """The per-channel statistics of the model's LayerNorm output (channels last), from onnxruntime."""
    return ChannelStats.of(activations(model, [ln_key(model)], x)[ln_key(model)], -1)


def assert_same_stats(got: ChannelStats, ref: ChannelStats) -> None:
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-4, atol=1e-5 * np.sqrt(ref.var).max())
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-4)


def test_the_measured_layernorm_statistics_are_numpys():
    """The dense statistics at a LayerNorm site, over unequal batches and every token, are float64 numpy's."""
    model, feeds = zoo.linear_layernorm()
    x = feeds["input"]
    per_batch, _ = measure(model, zoo.DictSet(feeds), batch_size=20, device="cpu", progress=False)
    got, (normed, _) = merge_all(per_batch[ln_key(model)]), zoo.linear_layernorm_oracle(model, x)
    ref = ChannelStats.of(normed, -1)
    assert len(per_batch[ln_key(model)]) == 3 and got.count == ref.count == 48 * 5
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_exact_correction_gives_the_layernorm_output_the_dense_statistics(bias):
    """After exact recalibration (one batch: the upstream renormalisation is the population's) the pruned model's
    LayerNorm output has numpy's dense per-channel mean and variance; a LayerNorm without β gets one. Pruning
    alone, and the repair with LayerNorm sites off, do not have them."""
    model, feeds = zoo.linear_layernorm(bias=bias)
    x = feeds["input"]
    dense = ChannelStats.of(zoo.linear_layernorm_oracle(model, x)[0], -1)
    job = repair(model, zoo.DictSet(feeds), batch_size=48, **COMMON)
    key = ln_key(model)
    assert job.written[key] == "layernorm"
    ln = next(n for n in job.output.graph.node if n.op_type == "LayerNormalization")
    assert len(ln.input) == 3 and all(np.isfinite(numpy_helper.to_array(t)).all() for t in job.output.graph.initializer)
    assert_same_stats(ln_stats(job.output, x), dense)
    without = repair(model, zoo.DictSet(feeds), batch_size=48, layernorm=False, **COMMON)
    assert key not in without.written and key not in {s.key for s in without.measurement.sites}
    for other in (job.pruned, without.output):
        got = ln_stats(other, x)
        assert np.abs(got.var / dense.var - 1).max() > 1e-2 or np.abs(got.mean - dense.mean).max() > 1e-2


def test_every_layernorm_of_a_convnext_like_net_gets_the_dense_statistics():
    """Rank-4 channel-last LayerNorms (N, H, W, C), each after a depthwise conv and a Transpose, two stages deep."""
    model, feeds = zoo.convnext_like()
    x = feeds["input"]
    keys = [s.key for s in sites_of(model) if s.ln is not None]
    job = repair(model, zoo.DictSet(feeds), batch_size=8, **COMMON)
    assert len(keys) == 4 and all(job.written[key] == "layernorm" for key in keys)
    dense, fixed = activations(model, keys, x), activations(job.output, keys, x)
    for key in keys:
        assert dense[key].ndim == 4
        assert_same_stats(ChannelStats.of(fixed[key], -1), ChannelStats.of(dense[key], -1))


@pytest.mark.parametrize("build", [zoo.linear_layernorm, zoo.convnext_like])
def test_sparsity_zero_leaves_the_outputs_as_they_were(build):
    model, feeds = build()
    job = repair(model, zoo.DictSet(feeds), sparsity=0.0, method="bn", device="cpu", progress=False)
    keys = [s.key for s in job.measurement.sites if s.ln is not None]
    assert keys and all(job.written[key] == "unchanged" for key in keys)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_array_equal(run(job.output), run(model))


def test_asr_shrinks_a_layernorm_gain_toward_one():
    """The methods' gains apply to a LayerNorm site as to any virtual BN: ASR's lies between 1 and the exact one."""
    model, feeds = zoo.linear_layernorm()
    key = ln_key(model)
    exact = repair(model, zoo.DictSet(feeds), batch_size=48, **COMMON).corrections[key].gain
    asr = repair(model, zoo.DictSet(feeds), batch_size=48, **COMMON | {"method": "asr"}).corrections[key].gain
    assert np.abs(exact - 1).max() > 1e-2
    assert np.all(np.abs(asr - 1) <= np.abs(exact - 1) + 1e-12) and not np.allclose(asr, exact)


def test_a_shared_scale_is_copied_before_the_fold():
    """Two LayerNorms reading one γ and one β: folding into the first leaves the second's as they were (the
    first gets its own), and the model still runs in onnxruntime as numpy says."""
    import onnx
    from onnx import helper

    from asr_onnx.correct.recal import fold_layernorm
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model

    model, feeds = zoo.linear_layernorm()
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    twin = helper.make_node("LayerNormalization", list(ln.input), ["twin"], name="twin", axis=-1, epsilon=1e-5)
    model.graph.node.insert(list(model.graph.node).index(ln) + 1, twin)
    model.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in (ln.output[0], "twin"))
    graph = to_graph(model)
    first, second = (s for s in find_sites(graph, find_layers(graph)) if s.ln is not None)
    gamma, beta = (t.values.astype(np.float64) for t in first.ln.inputs[1:3])
    a, c = np.linspace(0.5, 2.0, 8), np.linspace(-1.0, 1.0, 8)
    fold_layernorm(first.ln, a, c)
    np.testing.assert_array_equal(second.ln.inputs[1].values, gamma.astype(np.float32))
    np.testing.assert_array_equal(second.ln.inputs[2].values, beta.astype(np.float32))
    graph.cleanup().toposort()
    out = to_model(graph, model)
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in out.graph.output], session.run(None, feeds)))
    normed, _ = zoo.linear_layernorm_oracle(model, feeds["input"])
    np.testing.assert_allclose(got["twin"], normed, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[first.key], a * normed + c, rtol=1e-4, atol=1e-4)
