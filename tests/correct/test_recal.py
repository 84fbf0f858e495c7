"""Recalibration: BN running statistics and folded corrections, checked in the repaired network."""

import json

import numpy as np
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


@pytest.mark.parametrize("method, placement", [("bn", "recal"), ("naive", "pre-bn"), ("lw", "recal"),
                                               ("lw", "pre-bn"), ("asr", "recal"), ("asr", "pre-bn"),
                                               ("none", "recal"), ("auto", "recal")])
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
