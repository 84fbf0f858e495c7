"""The least-squares refit: Gram sums against PyTorch's unfold, the refit against a numpy lstsq oracle."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo

from asr_onnx.errors import AsrError
from asr_onnx.measure.stats import GramStats
from asr_onnx.model.graph import find_layers, to_graph
from asr_onnx.model.session import make_session
from asr_onnx.pipeline.driver import Repair
from asr_onnx.refit.gram import accumulate, weight_rows
from asr_onnx.refit.reconstruct import DAMPING, refit_rows

REPO = str(Path(__file__).resolve().parents[1])


def im2col(x, weight_shape, attrs):
    """Numpy patches (rows, in channels * kernel) of a Conv input, rows in (sample, position) order."""
    kernel = weight_shape[2:]
    stride, dilation = attrs.get("strides", [1] * len(kernel)), attrs.get("dilations", [1] * len(kernel))
    pads = attrs.get("pads", [0] * 2 * len(kernel))
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + len(kernel)]) for i in range(len(kernel))])
    n, c, h, w = x.shape
    kh, kw = kernel
    out_h = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = np.empty((n, out_h, out_w, c, kh, kw))
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for b in range(kw):
                    rows[:, i, j, :, a, b] = x[:, :, i * stride[0] + a * dilation[0], j * stride[1] + b * dilation[1]]
    return rows.reshape(n * out_h * out_w, -1)


def patches(layer, x):
    """Numpy patches and the groups of a layer's input activation."""
    if layer.op == "Conv":
        return im2col(x.astype(np.float64), layer.weight.shape, layer.node.attrs), layer.groups
    return x.reshape(-1, x.shape[-1]).astype(np.float64), 1


def lstsq_refit(dense_rows, keep, x_pruned, x_dense, groups):
    """The ridge refit as an augmented least-squares problem, solved by numpy's lstsq (no normal equations)."""
    out = np.zeros_like(dense_rows, dtype=np.float64)
    per_group, length = dense_rows.shape[0] // groups, dense_rows.shape[1]
    for g in range(groups):
        xp, xd = x_pruned[:, g * length:(g + 1) * length], x_dense[:, g * length:(g + 1) * length]
        lam = DAMPING * np.mean(np.sum(xp**2, axis=0))
        for o in range(g * per_group, (g + 1) * per_group):
            kept = np.flatnonzero(keep[o])
            a = np.vstack([xp[:, kept], np.sqrt(lam) * np.eye(kept.size)])
            b = np.concatenate([xd @ dense_rows[o], np.sqrt(lam) * dense_rows[o, kept]])
            out[o, kept] = np.linalg.lstsq(a, b, rcond=None)[0]
    return out


def activations(model, names, feeds):
    """The named tensors of ``model`` on ``feeds``, from onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return make_session(probe, "cpu").run(names, feeds)


def layers_of(model):
    return find_layers(to_graph(model))


# 0.2: most rows lose fewer weights than they keep, so they are solved through the inverse (Lagrange) path
@pytest.mark.parametrize("kind, sparsity", [(kind, 0.5) for kind in zoo.ONE_LAYER] + [("conv", 0.2), ("gemm", 0.2)])
def test_refit_matches_a_numpy_least_squares_oracle_and_keeps_the_mask(kind, sparsity):
    dense, feeds = zoo.one_layer(kind)
    job = Repair(dense, device="cpu", batch_size=16, progress=False).prune(sparsity, "uniform")
    pruned_rows = weight_rows(layers_of(job.pruned)[0], layers_of(job.pruned)[0].weight.values)
    job.reconstruct(zoo.DictSet(feeds))
    layer, dense_layer = layers_of(job.pruned)[0], layers_of(dense)[0]
    x = np.maximum(feeds["input"], 0)  # the Relu before the layer
    x_patches, groups = patches(dense_layer, x)
    dense_rows = weight_rows(dense_layer, dense_layer.weight.values).astype(np.float64)
    expected = lstsq_refit(dense_rows, pruned_rows != 0, x_patches, x_patches, groups)
    got = weight_rows(layer, layer.weight.values)
    assert np.array_equal(got == 0, pruned_rows == 0)  # nothing revived, nothing newly lost
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    refit = job.refits[0]
    assert refit["err_after"] < refit["err_before"] and refit["gram_size"] == x_patches.shape[1] // groups


def test_2_4_on_a_token_matmul_runs_along_the_reduction_axis_and_refits_on_every_token():
    """Issue 30: a Linear layer on (N, T, C) tokens (MatMul with a constant (C, D) weight). 2:4 keeps 2 of each 4
    consecutive weights along C, the axis the MatMul sums over, for every output column; the refit solves on all
    N·T tokens (the numpy oracle flattens them) and keeps the pattern."""
    dense, feeds = zoo.one_layer("matmul")  # (N, 3, 12) tokens -> MatMul (12, 5)
    job = Repair(dense, device="cpu", batch_size=16, progress=False).prune(0.0, "2:4")
    pruned = layers_of(job.pruned)[0].weight.values
    assert pruned.shape == (12, 5) and np.all((pruned.reshape(3, 4, 5) != 0).sum(axis=1) == 2)
    job.reconstruct(zoo.DictSet(feeds))
    layer, dense_layer = layers_of(job.pruned)[0], layers_of(dense)[0]
    x_tokens, _ = patches(dense_layer, np.maximum(feeds["input"], 0))
    assert x_tokens.shape == (len(feeds["input"]) * 3, 12)
    dense_rows = weight_rows(dense_layer, dense_layer.weight.values).astype(np.float64)
    expected = lstsq_refit(dense_rows, weight_rows(layer, pruned) != 0, x_tokens, x_tokens, 1)
    got = weight_rows(layer, layer.weight.values)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(layer.weight.values != 0, pruned != 0)


def test_both_solve_paths_give_the_ridge_solution_on_the_kept_weights():
    """Rows keeping 1, a third, two thirds and all but one of 12 inputs: each against lstsq of its own
    augmented system (the direct path below half kept, the inverse path above)."""
    rng = np.random.default_rng(3)
    x, dense_rows = rng.normal(size=(200, 12)), rng.normal(size=(4, 12))
    keep = np.zeros((4, 12), bool)
    for o, count in enumerate((1, 4, 8, 11)):
        keep[o, rng.permutation(12)[:count]] = True
    xtx = x.T @ x
    gram = GramStats(200.0, xtx[None], (xtx @ dense_rows.T)[None], np.sum((x @ dense_rows.T) ** 2, axis=0))
    got, _ = refit_rows(dense_rows, keep, gram)
    np.testing.assert_allclose(got, lstsq_refit(dense_rows, keep, x, x, 1), rtol=1e-9, atol=1e-10)
    assert np.array_equal(got != 0, keep)


def test_each_layer_is_refitted_on_the_input_of_the_network_refitted_so_far():
    dense, feeds = zoo.fc_heads()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6, "global")
    pruned_layers = layers_of(job.pruned)
    keeps = [weight_rows(layer, layer.weight.values) != 0 for layer in pruned_layers]
    job.reconstruct(zoo.DictSet(feeds))
    refitted, dense_layers = layers_of(job.pruned), layers_of(dense)
    names = [layer.node.inputs[0].name for layer in dense_layers]
    x_refitted, x_dense = activations(job.pruned, names, feeds), activations(dense, names, feeds)
    for i, layer in enumerate(refitted):
        xp, groups = patches(layer, x_refitted[i])
        xd, _ = patches(layer, x_dense[i])
        dense_rows = weight_rows(dense_layers[i], dense_layers[i].weight.values).astype(np.float64)
        expected = lstsq_refit(dense_rows, keeps[i], xp, xd, groups)
        np.testing.assert_allclose(weight_rows(layer, layer.weight.values), expected, rtol=2e-4, atol=2e-5,
                                   err_msg=layer.name)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "conv_valid", "conv21"])
def test_in_graph_gram_matches_torch_unfold(kind):
    from asr_onnx.refit.gram import Im2colGram, gram_model

    torch = pytest.importorskip("torch")
    dense, feeds = zoo.one_layer(kind)
    layer = layers_of(dense)[0]
    model, (built,) = gram_model(dense, dense, [0])
    if kind == "conv21":  # stride 1, yet by im2col: summed by shifts it would take 29,261 segment products
        assert isinstance(built, Im2colGram) and len(model.graph.node) < 20
    (gram,), _ = accumulate(dense, dense, [0], zoo.DictSet(feeds), batch_size=16, device="cpu")
    attrs, weight = layer.node.attrs, torch.from_numpy(layer.weight.values.astype(np.float64))
    x = torch.from_numpy(np.maximum(feeds["input"], 0).astype(np.float64))
    pads = attrs.get("pads", [0, 0, 0, 0])[:2]
    options = dict(dilation=attrs.get("dilations", [1, 1]), padding=pads, stride=attrs.get("strides", [1, 1]))
    cols = torch.nn.functional.unfold(x, weight.shape[2:], **options)  # (N, C*k, L)
    rows = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
    y = torch.nn.functional.conv2d(x, weight, groups=layer.groups, **options)
    y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).numpy()
    expected = GramStats.of(rows, y, layer.groups)
    assert gram.count == expected.count
    for got, want in ((gram.xtx, expected.xtx), (gram.xty, expected.xty), (gram.yy, expected.yy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["depthwise", "conv_shifted", "conv5"])
def test_gram_summed_by_shifts_matches_numpy_im2col(kind):
    from asr_onnx.refit.gram import ShiftedGram, gram_model

    dense, feeds = zoo.one_layer(kind)
    layer = layers_of(dense)[0]
    assert isinstance(gram_model(dense, dense, [0])[1][0], ShiftedGram)  # stride 1: no im2col in the graph
    (gram,), _ = accumulate(dense, dense, [0], zoo.DictSet(feeds), batch_size=16, device="cpu")
    rows, groups = patches(layer, np.maximum(feeds["input"], 0))
    weights = weight_rows(layer, layer.weight.values).astype(np.float64)
    per_group, length = len(weights) // groups, weights.shape[1]
    y = np.concatenate([rows[:, g * length:(g + 1) * length] @ weights[g * per_group:(g + 1) * per_group].T
                        for g in range(groups)], axis=1)
    expected = GramStats.of(rows, y, groups)
    assert gram.count == expected.count
    for got, want in ((gram.xtx, expected.xtx), (gram.xty, expected.xty), (gram.yy, expected.yy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gram_sums_over_shards_merge_to_the_whole_set():
    dense, feeds = zoo.one_layer("conv")
    whole = zoo.DictSet(feeds)
    halves = [zoo.DictSet({"input": feeds["input"][:16]}), zoo.DictSet({"input": feeds["input"][16:]})]
    (total,), _ = accumulate(dense, dense, [0], whole, batch_size=8, device="cpu")
    parts = [accumulate(dense, dense, [0], half, batch_size=8, device="cpu")[0][0] for half in halves]
    merged = parts[0].merge(parts[1])
    assert merged.count == total.count
    np.testing.assert_allclose(merged.xtx, total.xtx, rtol=1e-12)
    np.testing.assert_allclose(merged.xty, total.xty, rtol=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 4))
    exact, split = GramStats.of(x, y, 2), GramStats.of(x[:11], y[:11], 2).merge(GramStats.of(x[11:], y[11:], 2))
    np.testing.assert_allclose(split.xtx, exact.xtx, rtol=1e-12)
    np.testing.assert_allclose(split.yy, exact.yy, rtol=1e-12)


def test_sparsity_0_leaves_the_model_as_it_was():
    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.0).run(zoo.DictSet(feeds), "none",
                                                                                 reconstruct="ls")
    for got, want in zip(layers_of(job.output), layers_of(dense)):
        assert np.array_equal(got.weight.values, want.weight.values)
    assert all(refit == {"skipped": "dense, and its input is unchanged"} for refit in job.refits)


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_a_refit_that_keeps_every_weight_on_an_unchanged_input_is_the_identity(kind):
    dense, feeds = zoo.one_layer(kind)
    layer = layers_of(dense)[0]
    (gram,), _ = accumulate(dense, dense, [0], zoo.DictSet(feeds), batch_size=16, device="cpu")
    rows = weight_rows(layer, layer.weight.values)
    refitted, info = refit_rows(rows, np.ones(rows.shape, bool), gram)
    np.testing.assert_allclose(refitted, rows, rtol=1e-5, atol=1e-5)
    assert info["err_before"] < 1e-3 and info["err_after"] < 1e-3


# by default: BN kept and folded, branches and shared weights, and the float16 classes that say why not
@pytest.mark.parametrize("name", zoo.slow_except(sorted(zoo.CLASSES), ("bn_kept", "bn_folded", "shared_branched",
                                                                      "fp16_bn", "fp16_folded", "fp16_inside")))
def test_every_graph_class_refits_or_says_why(name):
    dense, feeds = zoo.CLASSES[name]()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6, "global")
    before = [layer.weight.values == 0 for layer in layers_of(job.pruned)]
    job.run(zoo.DictSet(feeds), "none", reconstruct="ls")
    after = [layer.weight.values == 0 for layer in layers_of(job.pruned)]
    assert all(np.array_equal(a, b) or (a >= b).all() for a, b in zip(after, before))  # no zero revived
    for refit, layer in zip(job.refits, job.layers):
        assert "skipped" in refit or refit["err_after"] <= refit["err_before"] + 1e-6, (layer.name, refit)
    assert any("err_after" in refit for refit in job.refits) or name.startswith("fp16")
    report = job.report()
    assert [layer["refit"] for layer in report["layers"]] == job.refits


def test_two_four_pattern_holds_after_the_refit():
    from asr_onnx.prune.sparsecore import conforms_nm

    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.0, "2:4")
    job.reconstruct(zoo.DictSet(feeds))
    for layer, row in zip(layers_of(job.pruned), job.layers):
        if row.pruned:
            assert conforms_nm(layer.weight.values, 2, 4, layer.in_axis), layer.name


def test_a_gram_over_the_budget_is_skipped_with_its_size():
    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5)
    job.reconstruct(zoo.DictSet(feeds), max_gram_mb=1e-9)
    assert all("exceeds --max-gram-mb" in refit["skipped"] for refit in job.refits)


def test_a_fixed_batch_model_skips_the_last_partial_batch():
    dense, feeds = zoo.conv_net(bn=True, batch=8), {"input": zoo.random_inputs(20)}
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5)
    job.reconstruct(zoo.DictSet(feeds))
    assert all("err_after" in refit for refit in job.refits)


def test_the_summary_counts_the_refitted_layers_and_names_the_skipped():
    from asr_onnx.report.build import summary

    dense, feeds = zoo.odd_convs()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).run(zoo.DictSet(feeds), "none",
                                                                                 reconstruct="ls")
    text = summary(job.report())
    done = sum("err_after" in refit for refit in job.refits)
    assert f"refit: {done} layers, median output error" in text
    assert "not refitted: " in text and "(ConvTranspose is not refitted)" in text


def test_the_frontier_in_memory_on_disk_or_not_kept_gives_the_same_refit(tmp_path, monkeypatch):
    import tempfile

    from asr_onnx.refit.reconstruct import reconstruct

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the frontier's temporary folder goes here
    dense, feeds = zoo.bn_kept()
    pruned = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).pruned
    runs = [reconstruct(dense, pruned, zoo.DictSet(feeds), batch_size=8, device="cpu", **options)[0]
            for options in ({"frontier_mb": 0}, {"frontier_mb": 64}, {"max_frontier_mb": 0}, {"passes": 99})]
    assert list(tmp_path.iterdir()) == []  # the folder is removed
    on_disk, in_memory = layers_of(runs[0]), layers_of(runs[1])
    assert all(np.array_equal(a.weight.values, b.weight.values) for a, b in zip(on_disk, in_memory))
    expected = [layer.weight.values for layer in layers_of(runs[-1])]  # the whole network run for every level
    for model in runs[:-1]:  # the same sums, rounded in another order where onnxruntime fuses other nodes
        for got, want in zip(layers_of(model), expected):
            np.testing.assert_allclose(got.weight.values, want, rtol=1e-3, atol=1e-5)
    assert any((got.weight.values != want.weight.values).any() for got, want in zip(layers_of(runs[0]), layers_of(pruned)))


def test_a_batch_store_keeps_arrays_in_memory_then_on_disk_and_writes_a_kept_array_once(tmp_path, monkeypatch):
    import tempfile

    from asr_onnx.refit.frontier import BatchStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b, c = np.arange(6.0).reshape(2, 3), np.ones((4, 4), np.float32), np.int64([3, 1])
    store = BatchStore(memory_mb=a.nbytes / 2**20)
    store.put(0, {"a": a, "b": b})
    assert isinstance(store.batches[0]["a"], np.ndarray) and isinstance(store.batches[0]["b"], str)
    written = store.batches[0]["b"]
    store.put(0, {"b": b, "c": c})  # "b" is kept as it is, "a" is dropped
    assert store.batches[0]["b"] == written and store.used == 0
    got = store.get(0)
    assert sorted(got) == ["b", "c"] and np.array_equal(got["b"], b) and np.array_equal(got["c"], c)
    assert got["c"].dtype == np.int64 and len(store) == 1
    store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", zoo.slow_except(["bn_kept", "bn_folded"], ("bn_kept",)))
def test_a_second_round_refits_on_the_corrected_network_and_keeps_the_masks(name):
    dense, feeds = zoo.CLASSES[name]()
    calib = zoo.DictSet(feeds)
    one = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6, allocation="lamp")
    masks = [layer.weight.values == 0 for layer in layers_of(one.pruned)]
    one.run(calib, "bn", reconstruct="ls")
    two = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6, allocation="lamp")
    two.run(calib, "bn", reconstruct="ls").refit_corrected(calib).measure(calib).correct("bn").fold()
    second = layers_of(two.pruned)
    assert all(np.array_equal(layer.weight.values == 0, mask) for layer, mask in zip(second, masks))
    # the first layer reads the graph input in both rounds: its second refit is its first
    np.testing.assert_allclose(second[0].weight.values, layers_of(one.pruned)[0].weight.values, rtol=1e-4, atol=1e-6)
    # the second layer's input is the corrected network's, the first layer kept in its corrected frame
    dense_layers = layers_of(dense)
    name_in = dense_layers[1].node.inputs[0].name
    (x_corrected,), (x_dense,) = activations(one.output, [name_in], feeds), activations(dense, [name_in], feeds)
    xp, groups = patches(dense_layers[1], x_corrected)
    xd, _ = patches(dense_layers[1], x_dense)
    dense_rows = weight_rows(dense_layers[1], dense_layers[1].weight.values).astype(np.float64)
    expected = lstsq_refit(dense_rows, ~weight_rows(second[1], masks[1]), xp, xd, groups)
    np.testing.assert_allclose(weight_rows(second[1], second[1].weight.values), expected, rtol=2e-4, atol=2e-5)


def test_a_second_round_on_one_layer_changes_nothing_and_at_sparsity_0_is_the_identity():
    dense, feeds = zoo.one_layer("gemm")  # the head gets the correction folded into its weight
    calib = zoo.DictSet(feeds)
    one = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5).run(calib, "bn", reconstruct="ls")
    two = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5).run(calib, "bn", reconstruct="ls")
    two.refit_corrected(calib).measure(calib).correct("bn").fold()
    for a, b in zip(layers_of(one.output), layers_of(two.output)):
        np.testing.assert_allclose(b.weight.values, a.weight.values, rtol=1e-4, atol=1e-6)
    dense, feeds = zoo.bn_kept()
    same = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.0).run(zoo.DictSet(feeds), "bn",
                                                                                  reconstruct="ls")
    same.refit_corrected(zoo.DictSet(feeds)).measure(zoo.DictSet(feeds)).correct("bn").fold()
    (got,), (want,) = (make_session(m, "cpu").run(None, feeds) for m in (same.output, dense))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_second_round_needs_a_corrected_output():
    dense, feeds = zoo.bn_kept()
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5).reconstruct(zoo.DictSet(feeds))
    with pytest.raises(AsrError, match="needs a corrected output: run fold"):
        job.refit_corrected(zoo.DictSet(feeds))
    with pytest.raises(TypeError, match="refit_rounds"):  # a second round is refit_corrected() after run(), not a recipe
        job.run(zoo.DictSet(feeds), "bn", reconstruct="ls", refit_rounds=2)


# ---------------------------------------------------------------- failures of the refit's own passes (issue 25)

MEMORY_BOUND = '''
import re, resource, sys
import asr_onnx.pipeline.driver, asr_onnx.calib, asr_onnx.refit.gram, asr_onnx.refit.reconstruct  # loaded before the bound, as in a run
from asr_onnx.cli.main import main
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 300 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space bound is set through /proc")
def test_a_refit_out_of_memory_is_one_error_line_without_onnxruntime_log(tmp_path):
    """The refit's first Gram pass, 512 samples of 3x64x64 at once, cannot fit in 300 MB more than the process
    holds: onnxruntime fails to allocate, and only our error line shows, not its coloured log line."""
    onnx.save(zoo.conv_net(bn=True, size=64), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", zoo.random_inputs(512, shape=(3, 64, 64)))
    result = subprocess.run([sys.executable, "-c", MEMORY_BOUND, "repair", str(tmp_path / "m.onnx"), "--calib",
                             str(tmp_path / "x.npy"), "--reconstruct", "ls", "--method", "none", "--guard", "off",
                             "--batch-size", "512", "--device", "cpu", "-q", "-o", str(tmp_path / "out.onnx")],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: onnxruntime failed") and len(result.stderr.splitlines()) == 1, \
        result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("kind", ["conv", "gemm", "conv21"])
def test_xtx_cut_into_blocks_of_rows_gives_the_same_sums(kind, monkeypatch):
    """Where one product would exceed the per-node bound, XᵀX and XᵀY are computed in blocks of rows and
    concatenated: the same sums, in several nodes."""
    import asr_onnx.refit.gram
    from asr_onnx.refit.gram import gram_model

    dense, feeds = zoo.one_layer(kind)
    (whole,), _ = accumulate(dense, dense, [0], zoo.DictSet(feeds), batch_size=8, device="cpu")
    groups, length = whole.xtx.shape[:2]
    rows = 8 * whole.count / len(feeds["input"])  # the patch rows of a batch of 8
    monkeypatch.setattr(asr_onnx.refit.gram, "MAX_NODE_MACS", groups * length * rows * (length // 3))  # 3 or 4 blocks
    model, _ = gram_model(dense, dense, [0], batch=8)
    concats = [node for node in model.graph.node if node.op_type == "Concat"]
    assert len(concats) == 2 and all(len(node.input) in (3, 4) for node in concats)
    (cut,), _ = accumulate(dense, dense, [0], zoo.DictSet(feeds), batch_size=8, device="cpu")
    for got, want in ((cut.xtx, whole.xtx), (cut.xty, whole.xty), (cut.yy, whole.yy)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def work(node_macs=4.5e8, tensor_bytes=4.1e6, macs=2.3e9):
    """A GramWork per sample, by default about that of a 21x21 kernel on 4 channels of 24x24 by im2col."""
    from asr_onnx.refit.gram import GramWork

    return GramWork(1764, 576, macs, node_macs, tensor_bytes)


@pytest.mark.parametrize(("args", "message"), [
    ((work(), 8, 1), None),
    ((None, 10**9, 1), None),  # shapes not known: nothing to bound by
    ((work(), 10**4, 1), "needs 2.3e+13 multiply-adds (patch 1764 x 576 positions x 10000 samples), over the "
                         "bound of 1e+13: lower --refit-samples"),
    ((work(node_macs=4e10), 8, 1), "4e+10 multiply-adds in one node for one sample (patch 1764 x 576 positions)"),
    ((work(tensor_bytes=2**31), 8, 1), "a 2.0 GiB tensor for one sample"),
    ((work(tensor_bytes=2**27), 8, 16), "a 2.0 GiB tensor for a batch of 16"),  # a model that fixes its batch
])
def test_a_gram_pass_over_its_bounds_is_refused_with_its_sizes(args, message):
    from asr_onnx.refit.reconstruct import work_reason

    reason = work_reason(*args)
    assert reason == message if message is None else message in reason


@pytest.mark.parametrize(("works", "batch", "expected"), [
    ([work()], 64, 64),
    ([work(), None], 64, 64),
    ([work(node_macs=1e9)], 64, 32),  # 3.2e10 multiply-adds in one node
    ([work(tensor_bytes=1e8), work()], 64, 10),  # 1 GiB in one tensor
    ([work(node_macs=1e12)], 64, 1),
])
def test_the_refit_batch_shrinks_until_every_batch_fits_its_bounds(works, batch, expected):
    from asr_onnx.refit.reconstruct import refit_batch

    assert refit_batch(works, batch) == expected


def test_a_layer_over_the_work_bound_is_skipped_with_its_sizes(monkeypatch):
    import asr_onnx.refit.reconstruct

    dense, feeds = zoo.one_layer("conv21")
    monkeypatch.setattr(asr_onnx.refit.reconstruct, "MAX_GRAM_MACS", 1e9)
    job = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.5)
    job.reconstruct(zoo.DictSet(feeds))
    assert "(patch 1764 x 576 positions x 8 samples), over the bound of 1e+09" in job.refits[0]["skipped"]


def test_a_run_stops_between_nodes_when_a_signal_arrives():
    """A Loop of 10^12 MatMuls, which never ends: SIGINT half a second after it starts raises KeyboardInterrupt
    within a moment, and onnxruntime has stopped (the worker thread is gone) when it does. A short loop runs
    to its end and gives the oracle's output."""
    import signal
    import threading
    import time

    from asr_onnx.model.stoppable import run

    feed = {"input": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(make_session(zoo.endless_loop(3), "cpu"), ["output"], feed)[0], feed["input"])
    session = make_session(zoo.endless_loop(), "cpu")
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    start = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run(session, ["output"], feed)
    assert time.monotonic() - start < 0.5 + 2.0
    assert not any(t.name == "asr-onnx run" for t in threading.enumerate())


STOP_S = 10  # SIGTERM to exit, the interpreter's own shutdown included (about 3 s on a 2-core machine at load 15)


@pytest.mark.parametrize("stride", [1, 2])
def test_sigterm_during_a_refit_ends_it_at_once_and_leaves_nothing(stride, tmp_path):
    """A refit of a 21x21 kernel, SIGTERM a second after its first level kept its frontier on disk (in a
    TMPDIR of its own): the run ends with one error line within STOP_S, the frontier folder is gone, and no
    output is written. With a stride of 2 the kernel's Gram pass is by im2col, a product of 2.3e11
    multiply-adds for the batch of 32 were it one node."""
    import signal
    import time

    model, feeds = zoo.big_kernel_net(stride=stride)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["input"])
    temp, out = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    out.mkdir()
    argv = [sys.executable, "-m", "asr_onnx.cli.main", "repair", str(tmp_path / "m.onnx"), "--calib",
            str(tmp_path / "x.npy"), "--reconstruct", "ls", "--method", "none", "--guard", "off", "--device", "cpu",
            "--frontier-mb", "0", "-q", "-o", str(out / "o.onnx")]  # the frontier on disk
    run = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(temp)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(temp.glob("asr-onnx-frontier.*")):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the refit kept no frontier"
            time.sleep(0.02)
        time.sleep(1.0)
        assert run.poll() is None
        start = time.monotonic()
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1 and err.strip() == "error: aborted", err
    assert took < STOP_S
    assert not [p.name for p in temp.iterdir() if p.name.startswith("asr-onnx")]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["conv_shifted", "gemm"])
def test_held_out_refits_of_one_layer_are_the_refits_on_the_other_part(kind):
    """With ``held_out``, each part's model is refitted on the other parts' sums alone: for a layer whose
    input no refit changes, exactly the refit on the other part (the oracle: reconstruct on that part alone),
    while the model refitted on every part is the same as without parts."""
    from asr_onnx.refit.reconstruct import reconstruct

    dense, feeds = zoo.one_layer(kind)
    whole = zoo.DictSet(feeds)
    (_, first), (_, second) = whole.folds(2, seed=3)
    pruned = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).pruned
    options = {"batch_size": 8, "device": "cpu"}
    refitted, _, _, _, without = reconstruct(dense, pruned, whole, held_out=[first, second], **options)
    assert len(without) == 2
    expected = [reconstruct(dense, pruned, part, **options)[0] for part in (second, first)]
    for got, want in zip(without + [refitted], expected + [reconstruct(dense, pruned, whole, **options)[0]]):
        (layer,), (oracle,) = layers_of(got), layers_of(want)
        np.testing.assert_allclose(layer.weight.values, oracle.weight.values, rtol=1e-4, atol=1e-6)
        assert not layer.weight.values[layers_of(pruned)[0].weight.values == 0].any()  # the mask holds
    assert not np.array_equal(layers_of(without[0])[0].weight.values, layers_of(without[1])[0].weight.values)


def test_held_out_refits_of_a_deep_network_keep_the_masks_and_fit_the_first_level_on_the_other_part():
    from asr_onnx.refit.reconstruct import layer_levels, reconstruct

    dense, feeds = zoo.bn_kept()
    whole = zoo.DictSet(feeds)
    parts = [held for _, held in whole.folds(2)]
    pruned = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).pruned
    _, refits, _, _, without = reconstruct(dense, pruned, whole, held_out=parts, batch_size=8, device="cpu")
    graph = to_graph(pruned)
    levels = layer_levels(graph, find_layers(graph))
    for k, model in enumerate(without):
        alone = reconstruct(dense, pruned, parts[1 - k], batch_size=8, device="cpu")[0]
        for level, layer, mask, oracle in zip(levels, layers_of(model), layers_of(pruned), layers_of(alone)):
            assert not layer.weight.values[mask.weight.values == 0].any()
            if level == 0:  # the network's input: no upstream refit, so exactly the other part's refit
                np.testing.assert_allclose(layer.weight.values, oracle.weight.values, rtol=1e-4, atol=1e-6)
    assert sum("err_after" in r for r in refits) >= 2


def test_held_out_refits_refuse_parts_that_do_not_cover_the_set_and_shared_passes():
    from asr_onnx.refit.reconstruct import reconstruct

    dense, feeds = zoo.one_layer("gemm")
    whole = zoo.DictSet(feeds)
    pruned = Repair(dense, device="cpu", batch_size=8, progress=False).prune(0.6).pruned
    (_, first), _ = whole.folds(2)
    for options in ({"held_out": [first]}, {"held_out": [first, first], "passes": 1}):
        with pytest.raises(AsrError, match="held-out refits"):
            reconstruct(dense, pruned, whole, batch_size=8, device="cpu", **options)
