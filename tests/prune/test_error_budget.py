"""The allocation "error" (issue 28): per-layer levels from measured network-output errors, chosen under the
global budget exactly; real onnxruntime sessions on real graphs, and a brute-force oracle for the choice."""

import itertools

import numpy as np
import pytest
import zoo
from onnx import TensorProto, helper
from zoo import ArraySet, conv_net, random_inputs

from asr_onnx.errors import AsrError
from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.prune.error_budget import ErrorTable, cheapest_levels, error_counts, exact_counts
from asr_onnx.prune.stage import needs_data, prune_weights


class CountingSet(ArraySet):
    """An ArraySet that counts the batches read from it."""

    def __init__(self, x, name="input"):
        super().__init__(x, name)
        self.read = 0

    def batches(self, batch_size):
        for feed in super().batches(batch_size):
            self.read += 1
            yield feed


def zeros_per_layer(model) -> list[int]:
    return [int((layer.weight.values == 0).sum()) for layer in find_layers(to_graph(model))]


def sizes(model) -> list[int]:
    return [layer.weight.values.size for layer in find_layers(to_graph(model))]


OPTIONS = dict(batch_size=16, device="cpu", threads=1)


@pytest.mark.parametrize("sparsity", [0.3, 0.77, 0.9, 0.95])
def test_the_allocation_meets_the_global_budget_exactly(sparsity):
    """Depthwise, grouped, strided and ConvTranspose layers of odd sizes (72 to 864 weights): the zeros are
    round(sparsity · weights), the count LAMP prunes, and the layers do not all get the same fraction."""
    model, feeds = zoo.odd_convs()
    calib = ArraySet(feeds["input"])
    pruned = prune_weights(model, sparsity, allocation="error", calib=calib, **OPTIONS)
    lamp = prune_weights(model, sparsity, allocation="lamp")
    total = sum(sizes(model))
    assert sum(zeros_per_layer(pruned.model)) == round(sparsity * total) == sum(zeros_per_layer(lamp.model))
    assert {layer.allocation for layer in pruned.layers} == {"error"}
    assert len({round(layer.sparsity, 2) for layer in pruned.layers}) > 1


def test_the_budget_is_exact_with_obs_refits_on_the_conv_net():
    """With the score obs each layer is measured OBS-pruned and refitted; the zeros still match LAMP's count."""
    model, calib = conv_net(bn=True), ArraySet(random_inputs(32))
    for sparsity in (0.5, 0.83):
        pruned = prune_weights(model, sparsity, allocation="error", score="obs", calib=calib, **OPTIONS)
        lamp = prune_weights(model, sparsity, allocation="lamp", score="obs")
        assert sum(zeros_per_layer(pruned.model)) == sum(zeros_per_layer(lamp.model))
        assert sum(zeros_per_layer(pruned.model)) == round(sparsity * sum(sizes(model)))
        assert pruned.mask_rules is not None and pruned.settings["allocation"] == "error"


def test_sparsity_zero_is_the_identity_and_reads_no_data():
    model, calib = conv_net(bn=True), CountingSet(random_inputs(32))
    pruned = prune_weights(model, 0.0, allocation="error", calib=calib, **OPTIONS)
    dense = find_layers(to_graph(model))
    for before, after in zip(dense, find_layers(to_graph(pruned.model))):
        assert np.array_equal(before.weight.values, after.weight.values)
    assert calib.read == 0


def test_the_allocation_needs_calibration_data():
    model = conv_net(bn=True)
    with pytest.raises(AsrError, match="allocation error needs calibration data"):
        prune_weights(model, 0.5, allocation="error")
    with pytest.raises(AsrError, match="allocation error needs calibration data"):
        needs_data("global", "magnitude", allocation="error")
    assert needs_data("global", "magnitude", calib=ArraySet(random_inputs(4)), allocation="error")
    assert not needs_data("2:4", "magnitude", allocation="error")  # N:M fixes each layer's own


def two_branches(gain: float = 100.0):
    """y = gain · (x A) + x B: A and B hold the same weights, so LAMP gives them the same zeros, but an error in A
    costs the output ``gain``² times as much."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.25, (16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "A"], ["a"], name="A"),
             helper.make_node("Mul", ["a", "gain"], ["a.scaled"]),
             helper.make_node("MatMul", ["input", "B"], ["b"], name="B"),
             helper.make_node("Add", ["a.scaled", "b"], ["output"])]
    inits = [zoo._init("A", w), zoo._init("B", w.copy()), zoo._init("gain", np.float32(gain))]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16])]
    return zoo.make_model(nodes, inits, inputs, outputs)


def test_the_sensitive_layer_gets_fewer_zeros_than_lamp_gives_it():
    model = two_branches()
    calib = ArraySet(np.random.default_rng(8).normal(size=(64, 16)).astype(np.float32))
    lamp = zeros_per_layer(prune_weights(model, 0.6, allocation="lamp").model)
    error = zeros_per_layer(prune_weights(model, 0.6, allocation="error", calib=calib, **OPTIONS).model)
    assert abs(lamp[0] - lamp[1]) <= 1  # the same weights: LAMP cannot tell them apart
    assert error[0] < lamp[0] and error[1] > lamp[1] and sum(error) == sum(lamp)


def test_without_the_gain_neither_branch_is_favoured():
    """The control of the test above: with gain 1 the two layers cost the same, and split the zeros evenly."""
    model = two_branches(gain=1.0)
    calib = ArraySet(np.random.default_rng(8).normal(size=(64, 16)).astype(np.float32))
    error = zeros_per_layer(prune_weights(model, 0.6, allocation="error", calib=calib, **OPTIONS).model)
    assert abs(error[0] - error[1]) <= 0.1 * 256


def brute_force(counts, errors, budget):
    """The least summed error over every combination of levels that prunes at least ``budget``."""
    best = np.inf
    for combo in itertools.product(range(counts.shape[1]), repeat=counts.shape[0]):
        rows = np.arange(counts.shape[0])
        if counts[rows, combo].sum() >= budget:
            best = min(best, errors[rows, combo].sum())
    return best


def random_table(rng, layers=4, levels=4):
    sizes = rng.integers(5, 40, layers)
    fractions = np.r_[0.0, np.sort(rng.uniform(0.1, 0.99, levels - 1))]
    counts = np.rint(np.outer(sizes, fractions)).astype(np.int64)
    errors = np.c_[np.zeros(layers), np.cumsum(rng.exponential(1.0, (layers, levels - 1)), axis=1)]
    return sizes, counts, errors


@pytest.mark.parametrize("seed", range(12))
def test_the_levels_chosen_are_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    sizes, counts, errors = random_table(rng)
    if seed % 3 == 0:  # not monotone in the count: the programme must not assume it
        errors = errors + rng.uniform(0, 2, errors.shape) * (np.arange(errors.shape[1]) > 0)
    budget = int(rng.integers(1, counts[:, -1].sum() + 1))
    chosen = cheapest_levels(counts, errors, budget)
    rows = np.arange(len(chosen))
    assert counts[rows, chosen].sum() >= budget
    assert errors[rows, chosen].sum() == pytest.approx(brute_force(counts, errors, budget))


def test_a_hand_made_table_picks_the_cheap_layer():
    """Two layers of 10 weights, levels of 0, 5 and 9 zeros; layer 0 costs 1 and 10, layer 1 costs 2 and 3.
    At a budget of 12 the best is 5 + 9 (cost 4), not 9 + 5 (12) or 9 + 9 (13); at 9 it costs 3 (5 + 5 or
    0 + 9), not 10 (9 + 0)."""
    counts = np.array([[0, 5, 9], [0, 5, 9]])
    errors = np.array([[0.0, 1.0, 10.0], [0.0, 2.0, 3.0]])
    chosen = cheapest_levels(counts, errors, 9)
    assert errors[[0, 1], chosen].sum() == 3.0
    assert cheapest_levels(counts, errors, 12).tolist() == [1, 2]
    assert cheapest_levels(counts, errors, 0).tolist() == [0, 0]
    with pytest.raises(AsrError, match="fewer than 19"):
        cheapest_levels(counts, errors, 19)


@pytest.mark.parametrize("seed", range(8))
def test_the_counts_sum_to_the_budget_exactly_and_stay_on_the_curves(seed):
    rng = np.random.default_rng(100 + seed)
    sizes, counts, errors = random_table(rng, layers=6, levels=5)
    for budget in rng.integers(0, counts[:, -1].sum() + 1, 5):
        for units in (3, 10_000):  # a coarse programme (3 steps of the budget) and an exact one
            pruned = error_counts(ErrorTable(counts, errors), int(budget), sizes, max_units=units)
            assert pruned.sum() == budget
            assert (pruned >= 0).all() and (pruned <= np.maximum(counts[:, -1], sizes - 1)).all()


def test_the_remainder_moves_where_it_costs_least():
    """Levels at 0 and 10 of 10 weights; 4 more weights to prune: the layer whose next segment costs least per
    weight (layer 1: 1 per 10) takes them, not layer 0 (5 per 10)."""
    counts = np.array([[0, 10], [0, 10]])
    errors = np.array([[0.0, 5.0], [0.0, 1.0]])
    assert exact_counts(counts, errors, np.array([0, 0]), 4).tolist() == [0, 4]
    assert exact_counts(counts, errors, np.array([1, 1]), 14).tolist() == [4, 10]  # keeps 6 of the costly one
    with pytest.raises(AsrError, match="cannot prune 21"):
        exact_counts(counts, errors, np.array([1, 1]), 21)
