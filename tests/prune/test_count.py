"""Parameters and multiply-accumulates (asr_onnx.prune.channels.count) on an attention block."""

import numpy as np
import zoo

from asr_onnx.model.graph import static_shapes
from asr_onnx.model.session import make_session
from asr_onnx.prune.channels import count


def test_the_attention_block_runs_as_its_numpy_oracle():
    model, feeds = zoo.attention_block()
    got = make_session(model, "cpu").run(None, feeds)[0]
    np.testing.assert_allclose(got, zoo.attention_oracle(model, feeds["input"]), rtol=1e-5, atol=1e-5)


def test_the_mac_count_includes_the_matmuls_of_two_activations():
    """Issue 30: the report's MACs left out attention's Q·Kᵀ and its product with V. Per sample, with T tokens
    of width C: four projections of T·C·C, and two products of T·T·C."""
    model, _ = zoo.attention_block(tokens=6, width=8)
    t, c = 6, 8
    assert sorted(count.layer_macs(model).values()) == [t * c * c] * 4  # the prunable layers, as before
    assert count.activation_macs(model) == 2 * t * t * c
    assert count.macs(model) == 4 * t * c * c + 2 * t * t * c
    assert count.activation_macs(zoo.conv_net()) == 0  # a CNN's count is unchanged


def test_macs_of_a_model_with_a_dynamic_height_and_width_are_counted_at_the_calibration_dims():
    """With a dynamic H and W shape inference leaves the convs without output shapes, and the channels summary
    counted 0 MACs for them (on a real recogniser, "0 -> 40,960"); it counts both models at a batch's dims."""
    from asr_onnx.prune import channels

    model, feeds = zoo.dynamic_hw_detector()
    dims = {name: value.shape for name, value in feeds.items()}
    plan = channels.plan(model, sparsity=0.5)
    assert channels.summary(plan, model, model)["macs"] == [0, 0]
    counted = channels.summary(plan, model, model, dims=dims)["macs"]
    assert counted[0] == counted[1] == sum(count.layer_macs(model, static_shapes(model, dims=dims)).values()) > 0
