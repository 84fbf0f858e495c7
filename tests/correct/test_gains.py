"""The methods' gains: pure numpy."""

import numpy as np
import pytest

from asr_onnx.correct.gains import asr_gain, full_gain, gain, shrink_lambda
from asr_onnx.errors import AsrError

REF = np.array([1.0, 2.0, 0.5, 1.0])
REC = np.array([0.25, 2.0, 1e-9, 0.0])


def test_full_gain_restores_variance_with_the_bn_epsilon():
    g = full_gain(REF, REC, 1e-5)
    assert np.allclose(g**2 * (REC + 1e-5), REF + 1e-5)
    assert np.isfinite(g).all()


def test_bn_and_naive_are_the_same_gain():
    assert np.array_equal(gain("bn", REF, REC, 1e-5), gain("naive", REF, REC, 1e-5))


def test_layerwise_gain_is_one_number():
    g = gain("lw", REF, REC, 1e-5)
    assert np.allclose(g, np.sqrt((REF + 1e-5).sum() / (REC + 1e-5).sum()))
    assert np.unique(g).size == 1


def test_asr_shrinks_collapsed_channels_to_identity():
    lam = shrink_lambda("median", REC, 1e-5)
    g = asr_gain(REF, REC, 1e-5, lam)
    assert abs(g[3] - 1.0) < 1e-6 and abs(g[2] - 1.0) < 1e-3  # collapsed: near identity
    shrink = REC[0] / (REC[0] + lam)
    assert np.isclose(g[0], shrink * 2.0 + (1 - shrink), rtol=1e-4)
    assert np.isclose(g[1], 1.0, rtol=1e-5)  # undamaged: nothing to restore


def test_lambda_rules():
    assert shrink_lambda("median", REC, 1e-5) == pytest.approx(np.median(REC))
    assert shrink_lambda("mean", REC, 1e-5) == pytest.approx(np.mean(REC))
    assert shrink_lambda("0.3", REC, 1e-5) == 0.3
    assert shrink_lambda("median", np.zeros(4), 1e-5) == 1e-5  # floored
    with pytest.raises(AsrError, match="lambda"):
        shrink_lambda("mode", REC, 1e-5)


def test_unknown_method():
    with pytest.raises(AsrError, match="unknown method"):
        gain("magic", REF, REC, 1e-5)


@pytest.mark.parametrize("method", ["bn", "naive", "lw", "asr"])
def test_an_epsilon_0_bn_with_a_dead_channel_gets_a_finite_gain(method):
    """ONNX allows epsilon 0: a channel whose pruned variance is 0 (and one dead in both) must not divide by 0."""
    ref, rec = np.array([1.0, 2.0, 0.5, 0.0]), np.array([0.5, 2.0, 0.0, 0.0])
    lam = shrink_lambda("median", rec, 0.0) if method == "asr" else None
    g = gain(method, ref, rec, 0.0, lam)
    assert np.isfinite(g).all() and (g > 0).any()
    if method in ("bn", "naive"):  # healthy channels keep their exact restoration
        np.testing.assert_allclose(g[:2], np.sqrt(ref[:2] / rec[:2]), rtol=1e-9)
