"""asr_onnx.model.graph and asr_onnx.model.files: a model's serialized size bound, and which normalisation each site has."""

import onnx
import pytest
import zoo

from asr_onnx.pipeline.driver import repair

SPARSITY = 0.6


@pytest.mark.parametrize("typed", [False, True])
def test_the_size_bound_is_above_the_serialized_size_by_at_most_22_bytes_per_initializer(typed):
    from onnx import numpy_helper

    from asr_onnx.model.files import is_large, serialized_bound

    model = zoo.conv_net(bn=True)
    for _i, t in enumerate(model.graph.initializer):  # raw bytes (as exporters write them) or typed fields
        values = numpy_helper.to_array(t)
        t.CopyFrom(onnx.helper.make_tensor(t.name, t.data_type, values.shape, values.flatten(), raw=not typed))
    size, bound = model.ByteSize(), serialized_bound(model)
    assert size <= bound <= size + 22 * len(model.graph.initializer)
    assert not is_large(model)


@pytest.mark.parametrize("chain", [("Sub", "Mul", "Add"), ("Mul", "Add")])
def test_decomposed_bn_is_reported_as_folded_affine(chain):
    dense, feeds = zoo.decomposed_bn(chain)
    job = repair(dense, zoo.DictSet(feeds), sparsity=SPARSITY, batch_size=zoo.N, device="cpu", progress=False)
    norms = [s["norm"] for s in job.report()["sites"]]
    assert norms == ["folded-affine", "folded-affine", "folded"]
    kept = [n.op_type for n in job.output.graph.node if n.op_type in chain]
    assert kept == list(chain) * 2  # the chain stays; the correction went into the Conv before it


@pytest.mark.parametrize("axis, computed, is_site", [(-1, False, True), (2, False, True), (1, False, False),
                                                     (-2, False, False), (-1, True, False)])
def test_a_layernorm_is_a_site_only_over_the_last_axis_with_a_constant_scale(axis, computed, is_site):
    """Issue 30: LayerNorm over the last axis of (N, T, C) (axis -1, or 2 where the rank is known) with constant
    γ is a channel-last site of C channels, reported as layernorm; over another axis, or with γ computed at run
    time, it is none, and its output is left alone."""
    from activations import sites_of

    model, feeds = zoo.linear_layernorm(axis=axis, computed_scale=computed)
    ln = [s for s in sites_of(model) if s.ln is not None]
    assert [(s.kind, s.channels, s.channel_last, s.key) for s in ln] == \
        ([("layernorm", 8, True, next(n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"))]
         if is_site else [])
    job = repair(model, zoo.DictSet(feeds), sparsity=SPARSITY, batch_size=zoo.N, device="cpu", progress=False)
    assert [s["norm"] for s in job.report()["sites"]] == ["folded-affine"] + ["layernorm"] * is_site + ["folded"]
