"""ChannelStats on the host: Chan's merge against a one-pass computation."""

import numpy as np

from asr_onnx.measure.stats import ChannelStats, merge_all


def test_chan_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(1e3, 1, size=(50, 4))
    parts = [ChannelStats.of(x[:3], -1), ChannelStats.of(x[3:20], -1), ChannelStats.of(x[20:], -1)]
    merged, ref = merge_all(parts), ChannelStats.of(x, -1)
    np.testing.assert_allclose(merged.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, ref.var, rtol=1e-9)
