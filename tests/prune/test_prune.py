"""Masks: global, uniform and N:M, against independent numpy computations."""

import numpy as np
import pytest
import zoo
from zoo import conv_net

from asr_onnx.errors import AsrError
from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.prune.masks import Pattern, check_sparsity, global_masks, nm_mask, prune_layers, uniform_mask


def reference_smallest(scores, k):
    """The k smallest by (value, index) through a full sort: the definition, written differently."""
    order = np.lexsort((np.arange(scores.size), scores))
    drop = np.zeros(scores.size, bool)
    drop[order[:k]] = True
    return drop


def test_global_mask_is_exact_count_and_matches_sort():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(8, 3, 3, 3)), rng.normal(size=(16, 8)).round(1), rng.normal(size=(5,))]
    keeps = global_masks(weights, 0.7)
    scores = np.concatenate([np.abs(w).astype(np.float32).ravel() for w in weights])
    expected = ~reference_smallest(scores, round(0.7 * scores.size))
    assert np.array_equal(np.concatenate([k.ravel() for k in keeps]), expected)
    assert sum((~k).sum() for k in keeps) == round(0.7 * scores.size)


def test_global_mask_breaks_ties_by_index():
    weights = [np.ones((4,)), np.ones((4,))]
    keeps = global_masks(weights, 0.5)
    assert keeps[0].tolist() == [False] * 4 and keeps[1].tolist() == [True] * 4


def test_uniform_mask_prunes_each_layer_by_the_same_fraction():
    rng = np.random.default_rng(1)
    for shape in [(10, 4), (6, 2, 3, 3)]:
        w = rng.normal(size=shape)
        keep = uniform_mask(w, 0.6)
        expected = ~reference_smallest(np.abs(w).astype(np.float32).ravel(), round(0.6 * w.size))
        assert np.array_equal(keep.ravel(), expected)


def test_nm_mask_keeps_n_largest_of_m_consecutive_input_channels():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 8, 3, 3))
    keep = nm_mask(w, 2, 4, axis=1)
    for o in range(4):
        for i in range(3):
            for j in range(3):
                for g in range(0, 8, 4):
                    block = np.abs(w[o, g:g + 4, i, j])
                    expected = np.zeros(4, bool)
                    expected[np.argsort(-block)[:2]] = True
                    assert np.array_equal(keep[o, g:g + 4, i, j], expected)
    gemm = rng.normal(size=(8, 5))  # (K, N): the reduction axis is 0
    keep = nm_mask(gemm, 2, 4, axis=0)
    assert (keep.reshape(2, 4, 5).sum(axis=1) == 2).all()


def test_prune_layers_writes_masks_into_the_graph():
    graph = to_graph(conv_net(bn=True))
    layers = find_layers(graph)
    before = [layer.weight.values.copy() for layer in layers]
    result = prune_layers(layers, 0.5, Pattern.parse("global"))
    after = [layer.weight.values for layer in layers]
    total = sum(w.size for w in before)
    assert sum((w == 0).sum() for w in after) == round(0.5 * total)
    for b, a in zip(before, after):
        assert np.array_equal(a[a != 0], b[a != 0])
    assert [r.pruned for r in result] == [True] * 4


def test_nm_skips_layers_whose_input_channels_do_not_divide():
    graph = to_graph(conv_net(bn=True))  # conv1 has 3 input channels
    result = prune_layers(find_layers(graph), 0.0, Pattern.parse("2:4"))
    by_name = {r.name: r for r in result}
    assert not by_name["conv1"].pruned and "not a multiple of 4" in by_name["conv1"].reason
    assert by_name["conv2"].pruned and by_name["conv2"].sparsity == 0.5


def test_exclude_keep_first_and_keep_last():
    graph = to_graph(conv_net(bn=True))
    result = prune_layers(find_layers(graph), 0.5, Pattern.parse("uniform"), exclude=["proj"], keep_first=True,
                          keep_last=True)
    assert [r.pruned for r in result] == [False, True, False, False]
    assert [r.reason for r in result] == ["--keep-first", None, "--exclude proj", "--keep-last"]


@pytest.mark.parametrize("text", ["4:4", "0:4", "5:4", "2-4", "magic"])
def test_bad_patterns(text):
    with pytest.raises(AsrError, match="pattern"):
        Pattern.parse(text)


@pytest.mark.parametrize("value", [1.0, -0.1, "abc", None])
def test_bad_sparsity(value):
    with pytest.raises(AsrError, match="sparsity"):
        check_sparsity(value)


def lamp_oracle(weights, sparsity):
    """LAMP by its definition: each w_u^2 over the sum of every w_v^2 >= w_u^2 in its layer (O(n^2))."""
    scores = []
    for w in weights:
        square = w.ravel() ** 2
        scores.append(square / np.array([square[square >= s].sum() for s in square]))
    scores = np.concatenate(scores)
    drop = reference_smallest(scores, round(sparsity * scores.size))
    return ~drop


def test_lamp_masks_match_the_definition_and_keep_every_layer_alive():
    from asr_onnx.prune.masks import lamp_masks

    rng = np.random.default_rng(3)
    weights = [rng.normal(size=(6, 3, 3, 3)), 10 * rng.normal(size=(12, 6)), 0.01 * rng.normal(size=(40,))]
    keeps = lamp_masks(weights, 0.9)
    assert np.array_equal(np.concatenate([k.ravel() for k in keeps]), lamp_oracle(weights, 0.9))
    assert all(k.any() for k in keeps)  # the largest weight of each layer scores 1
    assert not global_masks(weights, 0.9)[2].any()  # where one |w| threshold removes the small layer


def test_allocation_reaches_the_layers_and_the_report():
    layers = find_layers(to_graph(conv_net()))
    result = prune_layers(layers, 0.8, Pattern.parse("global"), allocation="lamp")
    assert {r.allocation for r in result} == {"lamp"} and all(r.score == "magnitude" for r in result)
    zeros = sum(r.sparsity * np.prod(r.shape) for r in result)
    assert zeros == round(0.8 * sum(np.prod(r.shape) for r in result))


def test_bad_allocations():
    layers = find_layers(to_graph(conv_net()))
    with pytest.raises(AsrError, match="unknown allocation"):
        prune_layers(layers, 0.5, Pattern.parse("global"), allocation="random")
    with pytest.raises(AsrError, match="pattern uniform"):
        prune_layers(layers, 0.5, Pattern.parse("uniform"), allocation="lamp")


def test_wanda_scores_weigh_each_weight_by_its_input_channel_norm():
    from asr_onnx.prune.masks import wanda_scores

    dense, _ = zoo.one_layer("conv")  # Conv 4 -> 6 in 2 groups
    layer = find_layers(to_graph(dense))[0]
    norms = np.array([1.0, 2.0, 3.0, 4.0])
    scores = wanda_scores(layer, norms)
    w = np.abs(layer.weight.values)
    for o in range(6):
        for c in range(2):
            np.testing.assert_allclose(scores[o, c], w[o, c] * norms[(o // 3) * 2 + c])


def test_wanda_input_norms_are_the_dense_inputs_norms():
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.prune.wanda import input_norms

    dense, feeds = zoo.fc_heads()
    norms = input_norms(dense, zoo.DictSet(feeds), batch_size=8, device="cpu")
    np.testing.assert_allclose(norms[0], np.sqrt((feeds["input"].astype(np.float64) ** 2).sum(axis=(0, 2, 3))),
                               rtol=1e-5)
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5, score="wanda", calib=zoo.DictSet(feeds))
    assert {row.score for row in job.layers} == {"wanda"}
    with pytest.raises(AsrError, match="needs calibration data"):
        Repair(dense, device="cpu", progress=False).prune(0.5, score="wanda")


def test_rownorm_scores_divide_each_weight_by_its_output_channel_norm():
    from asr_onnx.prune.masks import rownorm_scores

    for kind in ("conv", "gemm", "gemm_t0", "matmul"):
        dense, _ = zoo.one_layer(kind)
        layer = find_layers(to_graph(dense))[0]
        rows = np.abs(np.moveaxis(layer.weight.values.astype(np.float64), layer.out_axis, 0))
        want = rows / np.sqrt((rows.reshape(len(rows), -1) ** 2).sum(axis=1)).reshape(-1, *[1] * (rows.ndim - 1))
        np.testing.assert_allclose(np.moveaxis(rownorm_scores(layer), layer.out_axis, 0), want, rtol=1e-12)


def folded_twin(model):
    """``model`` with every BN that follows its layer folded into it (each output row times gamma / sigma)."""
    from asr_onnx.correct.recal import fold_bn
    from asr_onnx.model.graph import find_sites, to_model

    graph = to_graph(model)
    for site in find_sites(graph, find_layers(graph)):
        if site.bn is not None and site.layer is not None:
            fold_bn(graph, site)
    graph.cleanup().toposort()
    return to_model(graph, model)


@pytest.mark.parametrize("allocation", ["global", "lamp"])
def test_rownorm_keeps_the_exact_count_and_prunes_a_folded_twin_as_its_bn_original(allocation):
    kept = conv_net(bn=True)
    folded = folded_twin(kept)
    results = []
    for model in (kept, folded):
        layers = find_layers(to_graph(model))
        result = prune_layers(layers, 0.7, Pattern.parse("global"), allocation=allocation, score="rownorm")
        assert {r.score for r in result} == {"rownorm"}
        zeros = sum(int((layer.weight.values == 0).sum()) for layer in layers)
        assert zeros == round(0.7 * sum(layer.weight.values.size for layer in layers))
        results.append([layer.weight.values == 0 for layer in layers])
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    magnitude = [find_layers(to_graph(m)) for m in (kept, folded)]
    for layers in magnitude:
        prune_layers(layers, 0.7, Pattern.parse("global"), allocation=allocation)
    assert not all(np.array_equal(a.weight.values == 0, b.weight.values == 0) for a, b in zip(*magnitude))


def test_rownorm_at_sparsity_0_leaves_every_weight_as_it_was():
    dense = conv_net(bn=False)
    layers = find_layers(to_graph(dense))
    before = [layer.weight.values.copy() for layer in layers]
    prune_layers(layers, 0.0, Pattern.parse("global"), allocation="lamp", score="rownorm")
    assert all(np.array_equal(layer.weight.values, b) for layer, b in zip(layers, before))
