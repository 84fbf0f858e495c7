"""Parameters and multiply-accumulates (asr_onnx.prune.channels.count) on an attention block."""

import numpy as np
import zoo

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
