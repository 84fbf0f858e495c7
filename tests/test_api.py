"""The Repair pipeline's own choices: which sites the dense pass measures."""

import numpy as np
import onnx
import pytest
from models import ArraySet, conv_net, random_inputs

from asr_onnx.api import Repair
from asr_onnx.errors import AsrError


def test_dense_pass_measures_only_the_sites_without_a_bn_under_the_running_reference():
    """With reference="running" a real BN's reference is its running statistics, so only BN-less sites
    need the dense pass; the default, "calib", measures them all."""
    calib = ArraySet(random_inputs(32))
    lean = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    lean.measure(calib, reference="running")
    virtual = {s.key for s in lean._sites if s.bn is None}
    assert virtual and set(lean.dense_stats) == virtual != {s.key for s in lean._sites}
    default = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7).measure(calib)
    assert set(default.dense_stats) == {s.key for s in default._sites}
    assert all(site["reference"] == "dense calibration statistics" for site in default.report()["sites"])
    full = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    full.measure(calib, all_dense=True, reference="running")
    assert set(full.dense_stats) == {s.key for s in full._sites}
    for key in virtual:
        np.testing.assert_allclose(lean.dense_stats[key].var, full.dense_stats[key].var, rtol=1e-5)
    a = lean.correct("asr").fold().output.graph.initializer
    b = {t.name: t for t in full.correct("asr").fold().output.graph.initializer}
    for tensor in a:  # the same repair, up to float32 rounding in a different statistics graph
        np.testing.assert_allclose(onnx.numpy_helper.to_array(tensor), onnx.numpy_helper.to_array(b[tensor.name]),
                                   rtol=1e-4, atol=1e-6)
    sites = lean.report()["sites"]
    assert all(("dense_var" in site) == (site["tensor"] in virtual) for site in sites)
    assert all(site["reference"] == "bn running statistics" for site in sites if site["tensor"] not in virtual)


def test_cached_dense_statistics_must_cover_the_sites_without_a_bn():
    calib = ArraySet(random_inputs(32))
    job = Repair(conv_net(bn=True), device="cpu", batch_size=16, progress=False).prune(0.7)
    with pytest.raises(AsrError, match="another model"):
        job.measure(calib, dense_stats={}, reference="running")  # the Gemm head has no BN: it needs them
