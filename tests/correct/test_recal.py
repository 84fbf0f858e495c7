"""Recalibration: BN running statistics and folded corrections, checked in the repaired network."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from activations import activations, sites_of
from onnx import numpy_helper
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.measure.stats import ChannelStats
from asr_onnx.pipeline.driver import repair


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_bn_running_stats_are_the_population_stats_of_the_repaired_network():
    """(c): one batch, so the one-pass measurement is exact."""
    x = random_inputs(40)
    job = repair(conv_net(bn=True), ArraySet(x), sparsity=0.8, method="bn", batch_size=40, device="cpu",
                 progress=False)
    sites = sites_of(job.output)
    full = activations(job.output, [s.key for s in sites], x)
    bn_sites = [s for s in sites if s.bn is not None]
    assert len(bn_sites) == 3
    for site in bn_sites:
        ref = ChannelStats.of(full[site.key])
        np.testing.assert_allclose(site.bn.inputs[3].values, ref.mean, rtol=1e-4, atol=1e-4 * np.abs(ref.mean).max())
        np.testing.assert_allclose(site.bn.inputs[4].values, ref.var, rtol=1e-4)


def test_folded_layers_match_the_dense_statistics():
    """(d): on a BN-folded graph each corrected layer's output has the dense mean and variance."""
    x = random_inputs(40)
    dense = conv_net(bn=False)
    job = repair(dense, ArraySet(x), sparsity=0.8, method="bn", batch_size=40, device="cpu", progress=False)
    sites = sites_of(job.output)
    names = [s.key for s in sites]
    before, after = activations(dense, names, x), activations(job.output, names, x)
    assert all(s.bn is None for s in sites) and len(sites) == 4
    assert not any(n.op_type == "Add" and "asr" in n.name for n in job.output.graph.node)  # folded, no new nodes
    for site in sites:
        axis = -1 if site.channel_last else 1
        ref, got = ChannelStats.of(before[site.key], axis), ChannelStats.of(after[site.key], axis)
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-4, atol=1e-4 * np.abs(ref.mean).max())
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-4)


def test_naive_equals_bn_and_pre_bn_gain_is_cancelled_by_exact_recalibration():
    x = random_inputs(40)
    model = conv_net(bn=True)
    common = dict(sparsity=0.8, batch_size=20, device="cpu", progress=False)
    bn = run(repair(model, ArraySet(x), method="bn", **common).output, x)
    naive = run(repair(model, ArraySet(x), method="naive", **common).output, x)
    literal = run(repair(model, ArraySet(x), method="asr", placement="pre-bn", **common).output, x)
    asr = run(repair(model, ArraySet(x), method="asr", **common).output, x)
    np.testing.assert_allclose(naive, bn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(literal, bn, rtol=1e-3, atol=1e-3)  # only the epsilon differs
    assert np.abs(asr - bn).max() > 1e-3  # the default placement makes the method matter


@pytest.mark.parametrize("bn", [True, False])
def test_momentum_moves_part_way_from_the_original_statistics(bn):
    x = random_inputs(40)
    model = conv_net(bn=bn)
    common = dict(sparsity=0.8, batch_size=10, device="cpu", progress=False, method="bn")
    exact = repair(model, ArraySet(x), **common)
    slow = repair(model, ArraySet(x), recal="momentum", momentum=0.1, **common)
    key = exact.measurement.sites[1].key
    ref, rec, moved = exact.measurement.references[key], exact.corrections[key], slow.corrections[key]
    mean, var = ref.mean.copy(), ref.var.copy()
    for batch in slow.measurement.pruned[key]:  # PyTorch's update, written out
        mean = 0.9 * mean + 0.1 * batch.mean
        var = 0.9 * var + 0.1 * batch.m2 / (batch.count - 1)
    np.testing.assert_allclose(moved.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(moved.var, var, rtol=1e-9)
    assert np.all(np.abs(moved.mean - rec.mean) <= np.abs(ref.mean - rec.mean) + 1e-12)
    assert not np.allclose(moved.var, rec.var)


def test_sequential_measurement_makes_bn_exact_over_many_batches():
    """One pass renormalises upstream with batch statistics; level by level is exact layer by layer."""
    x = random_inputs(48)

    def worst_error(sequential):
        job = repair(conv_net(bn=True), ArraySet(x), sparsity=0.8, method="bn", batch_size=8, device="cpu",
                     progress=False, sequential=sequential)
        sites = [s for s in sites_of(job.output) if s.bn is not None]
        full = activations(job.output, [s.key for s in sites], x)
        return max(max(np.abs(s.bn.inputs[3].values - ChannelStats.of(full[s.key]).mean).max(),
                       np.abs(s.bn.inputs[4].values / ChannelStats.of(full[s.key]).var - 1).max()) for s in sites)

    assert worst_error(False) > 1e-3  # batch statistics of 8 samples are visibly not the population's
    assert worst_error(True) < 1e-4


def test_the_classifier_head_is_found_and_can_be_left_alone():
    x = random_inputs(32)
    model = conv_net(bn=True)
    assert [s.key for s in sites_of(model) if s.head] == ["logits"]
    kept = repair(model, ArraySet(x), sparsity=0.5, method="bn", batch_size=16, device="cpu", progress=False,
                  correct_head=False)
    fixed = repair(model, ArraySet(x), sparsity=0.5, method="bn", batch_size=16, device="cpu", progress=False)
    fc = {m: next(t for t in job.output.graph.initializer if t.name.startswith("fc.bias") or "fc.asr_bias" in t.name)
          for m, job in (("kept", kept), ("fixed", fixed))}
    assert fc["kept"].name == "fc.bias" and fc["fixed"].name == "fc.asr_bias"
    assert kept.written["logits"] == "unchanged" and fixed.written["logits"] == "folded"


def eps0_dead_channel_model():
    """conv_net with epsilon-0 BNs, and conv1's first output channel dead (all its weights 0): after any
    pruning its variance is 0, while its BN's running variance is not."""
    model = conv_net(bn=True, eps=0.0)
    weight = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    values = numpy_helper.to_array(weight).copy()
    values[0] = 0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    return model


@pytest.mark.parametrize("method, placement", [("bn", "recal"), ("naive", "pre-bn"), *(
    pytest.param(*case, marks=pytest.mark.slow) for case in (("lw", "recal"), ("lw", "pre-bn"), ("asr", "recal"))),
    ("asr", "pre-bn"), *(pytest.param(*case, marks=pytest.mark.slow) for case in (("none", "recal"), ("auto", "recal")))])
def test_an_epsilon_0_bn_with_a_dead_channel_repairs_to_finite_weights(method, placement, tmp_path):
    from asr_onnx.calib import input_specs, load_calib

    model, x = eps0_dead_channel_model(), random_inputs(32)
    np.save(tmp_path / "x.npy", x)
    job = repair(model, load_calib(tmp_path / "x.npy", input_specs(model)), sparsity=0.5, method=method, placement=placement, batch_size=8,
                 device="cpu", progress=False)
    for init in job.output.graph.initializer:
        assert np.isfinite(numpy_helper.to_array(init)).all(), init.name
    out = ort.InferenceSession(job.output.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.isfinite(out[0]).all()
    if method == "bn":
        assert 0 in job.corrections["conv1.out"].collapsed


def test_a_correction_that_overflows_float32_is_refused_by_site_name(folded_model, calib_dir, tmp_path, capsys):
    """Dense statistics whose head mean is 1e39 (finite in the float64 file) give a head bias that is Inf in
    float32. One error line names the site; nothing is written."""
    from asr_onnx.cli.main import main

    stats, out = tmp_path / "s.npz", tmp_path / "o.onnx"
    common = ["--calib", str(calib_dir), "--batch-size", "16", "-q", "--device", "cpu"]
    assert main(["stats", str(folded_model), "-o", str(stats)] + common) == 0
    with np.load(stats) as data:
        arrays = dict(data)
    head = json.loads(str(arrays["__meta__"]))["sites"].index("logits")
    arrays[f"{head}.mean"] = arrays[f"{head}.mean"] + 1e39
    np.savez(stats, **arrays)
    capsys.readouterr()
    assert main(["repair", str(folded_model), "--stats", str(stats), "-o", str(out)] + common) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'logits'" in err[0] and "non-finite" in err[0]
    assert not out.exists()


def test_a_bn_written_with_its_calibration_statistics_is_the_same_function():
    """reference(kind="calib") rewrites s (x - m) / sqrt(v + eps) + b around the dense calibration mean
    and variance; it must compute exactly what the BN computes, and "running" keeps the BN as it is."""
    from types import SimpleNamespace

    from asr_onnx.measure.norms import reference

    rng = np.random.default_rng(0)
    c, eps = 6, 1e-3
    scale, bias, mean, var = rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.1, 3, c)
    bn = SimpleNamespace(inputs=[None] + [SimpleNamespace(values=v) for v in (scale, bias, mean, var)])
    site = SimpleNamespace(bn=bn, eps=eps)
    x = rng.normal(2.0, 3.0, (100, c))  # another distribution than the running statistics describe
    dense = ChannelStats.of(x, axis=1)

    def apply(norm):
        return norm.scale * (x - norm.mean) / np.sqrt(norm.var + norm.eps) + norm.bias

    calib, running = reference(site, dense, "calib"), reference(site, None, "running")
    np.testing.assert_allclose(apply(calib), scale * (x - mean) / np.sqrt(var + eps) + bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(calib.mean, dense.mean)
    np.testing.assert_array_equal(calib.var, dense.var)
    np.testing.assert_array_equal(running.var, var)


@pytest.mark.parametrize("recal", ["exact", "momentum"])
def test_under_the_calibration_reference_bn_sites_map_onto_the_dense_outputs(recal):
    """With reference="calib" a repaired BN's output has the dense BN output's mean and variance on the
    calibration data (one batch: exact), and its bias is written too."""
    x = 1.5 * random_inputs(40) + 0.5  # not the data the running statistics describe
    dense = conv_net(bn=True)
    job = repair(dense, ArraySet(x), sparsity=0.8, method="bn", batch_size=40, device="cpu", progress=False,
                 reference="calib", recal=recal)
    bn_sites = [s for s in sites_of(job.output) if s.bn is not None]
    outputs = [s.bn.outputs[0].name for s in bn_sites]
    before, after = activations(dense, outputs, x), activations(job.output, outputs, x)
    for name in outputs if recal == "exact" else []:
        want, got = ChannelStats.of(before[name]), ChannelStats.of(after[name])
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-3, atol=1e-3 * np.sqrt(want.var.mean()))
        np.testing.assert_allclose(got.var, want.var, rtol=1e-3)
    assert job.settings["reference"] == "calib"
    assert any(not np.allclose(s.bn.inputs[2].values, d.bn.inputs[2].values)
               for s, d in zip(bn_sites, [s for s in sites_of(dense) if s.bn is not None]))


# ---------------------------------------------------------------- a dense variance past float32 (issue 25)

OVERFLOW_SCALES = [1e20, 1e36]  # BN variances near 1e40 and 1e72; the activations stay finite in float32


@pytest.mark.parametrize("up", OVERFLOW_SCALES)
def test_the_overflowing_bn_graph_matches_its_numpy_oracle_and_its_variances_pass_float32(up):
    import zoo

    model, feeds = zoo.overflowing_bn(up)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    logits, bn_inputs = zoo.overflowing_bn_oracle(zoo.overflowing_bn_weights(), feeds["input"], up)
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    for x in bn_inputs:
        assert np.abs(x).max() < np.finfo(np.float32).max < ChannelStats.of(x).var.max()


@pytest.mark.parametrize("up", OVERFLOW_SCALES)
def test_a_bn_whose_dense_variance_passes_float32_is_written_rescaled_and_keeps_the_dense_outputs(up):
    """Under reference="calib" each BN is rewritten around its dense variance (near 1e40 or 1e72): it is
    stored times 4^-k, with the scale times 2^-k and the epsilon times 4^-k, the same function. Every value
    is finite, and each BN's output has the dense BN output's mean and variance (one batch: exact)."""
    import zoo

    dense, feeds = zoo.overflowing_bn(up)
    x = feeds["input"]
    job = repair(dense, zoo.DictSet(feeds), sparsity=0.5, method="bn", batch_size=len(x), device="cpu",
                 progress=False)
    assert [job.written[s.key] for s in sites_of(dense) if s.bn is not None] == ["bn-rescaled"] * 2
    for init in job.output.graph.initializer:
        assert np.isfinite(numpy_helper.to_array(init)).all(), init.name
    assert np.isfinite(run(job.output, x)).all()
    bn_sites = [s for s in sites_of(job.output) if s.bn is not None]
    assert all(0 < s.eps < 1e-5 for s in bn_sites)  # the epsilon moved with the variance
    outputs = [s.bn.outputs[0].name for s in bn_sites]
    before, after = activations(dense, outputs, x), activations(job.output, outputs, x)
    for name in outputs:
        want, got = ChannelStats.of(before[name]), ChannelStats.of(after[name])
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-3, atol=1e-3 * np.sqrt(want.var.mean()))
        np.testing.assert_allclose(got.var, want.var, rtol=1e-3)


@pytest.mark.parametrize("up", OVERFLOW_SCALES)
def test_at_sparsity_0_the_overflowing_bn_graph_comes_out_as_it_went_in(up):
    import zoo

    dense, feeds = zoo.overflowing_bn(up)
    job = repair(dense, zoo.DictSet(feeds), sparsity=0.0, method="bn", batch_size=8, device="cpu", progress=False)
    assert {numpy_helper.to_array(t).tobytes() for t in job.output.graph.initializer} == \
        {numpy_helper.to_array(t).tobytes() for t in dense.graph.initializer}
    np.testing.assert_array_equal(run(job.output, feeds["input"]), run(dense, feeds["input"]))


@pytest.mark.parametrize("var, eps, k", [
    ([1.0, 2.0], 1e-5, 0),  # representable: nothing moves
    ([1e40, 3e39], 1e-5, 4),  # the smallest k under 2^126: 4^-4 1e40 = 3.9e37
    ([1e72, 1e60], 1e-5, 57),  # eps 4^-57 is subnormal in float32, and no channel feels it
    ([1e76, 0.0], 1e-5, None),  # a channel of variance 0 divides by that subnormal epsilon: no k is exact
])
def test_bn_exponent_keeps_the_ratio_of_scale_and_deviation(var, eps, k):
    from asr_onnx.correct.recal import bn_exponent

    var = np.array(var)
    scale = np.sqrt(var + eps)  # a BN rewritten around its variance: scale and deviation grow together
    assert bn_exponent(scale, var, eps, np.float32) == k


def test_a_bn_that_no_power_of_two_can_hold_is_folded_into_its_conv():
    """A BN whose channels span 1e76 and 0 cannot be written exactly with a float32 epsilon: the correction
    goes into the Conv's weight and bias, the BN is removed, and the layer computes a x + c."""
    import zoo

    from asr_onnx.correct.recal import Correction, Norm, write
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model

    dense, feeds = zoo.overflowing_bn()
    graph = to_graph(dense)
    site = next(s for s in find_sites(graph, find_layers(graph)) if s.bn is not None)
    conv, bn_out, channels, eps = site.key, site.bn.outputs[0].name, site.channels, site.eps
    var = np.where(np.arange(channels) == 0, 0.0, 1e76)
    ref = Norm(np.sqrt(var + eps), np.full(channels, 0.25), np.full(channels, 3e20), var, eps)
    corr = Correction(ref.mean, var * 1.5, np.ones(channels), None, np.ones(channels), None, np.zeros(0, np.int64))
    assert write(graph, site, ref, corr) == "folded-bn" and site.bn is None
    graph.cleanup().toposort()
    out = to_model(graph, dense)
    assert sum(n.op_type == "BatchNormalization" for n in out.graph.node) == 1
    raw = activations(dense, [conv], feeds["input"])[conv].astype(np.float64)
    folded = activations(out, [bn_out], feeds["input"])[bn_out].astype(np.float64)  # the Conv writes it now
    a = ref.scale / np.sqrt(corr.var + eps)
    want = a[None, :, None, None] * (raw - ref.mean[None, :, None, None]) + ref.bias[None, :, None, None]
    np.testing.assert_allclose(folded, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


LIGHT_RESNET50 = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


@pytest.mark.slow
@pytest.mark.skipif(not LIGHT_RESNET50.exists(), reason=f"this onnx ships no {LIGHT_RESNET50.name}")
def test_onnx_light_resnet50_repairs_with_its_overflowing_bns_rescaled():
    """onnx's own opset-9 ResNet-50 (every weight 0.02, built from ConstantOfShape): on inputs in [0, 100) its
    activations pass 1e19 and the dense variance at its last BNs passes float32's range. The repair at 50%
    writes those BNs rescaled, every value finite, and its output is finite."""
    x = 100 * np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    job = repair(str(LIGHT_RESNET50), ArraySet(x, name="gpu_0/data_0"), sparsity=0.5, method="bn", batch_size=1,
                 device="cpu", progress=False)
    assert "bn-rescaled" in job.written.values()
    for init in job.output.graph.initializer:
        assert np.isfinite(numpy_helper.to_array(init)).all(), init.name
    session = ort.InferenceSession(job.output.SerializeToString(), providers=["CPUExecutionProvider"])
    assert all(np.isfinite(session.run(None, {"gpu_0/data_0": x[i:i + 1]})[0]).all() for i in range(len(x)))
