"""--fold-bn: every BatchNormalization that follows a Conv is folded into it after recalibration; each folded
value is the float64 product rounded once, and the outputs stay those of the same repair without folding
to float32 rounding (within 1e-5 of the output's largest magnitude on the zoo's graphs)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from onnx import TensorProto, helper, numpy_helper
from zoo import ArraySet, conv_net, make_model, random_inputs

from asr_onnx.cli.main import main
from asr_onnx.pipeline.driver import repair
from asr_onnx.prune.sparsecore import layer_rows


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def bn_after_conv(model):
    producers = {out: node for node in model.graph.node for out in node.output}
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"
            and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Conv"]


def assert_close_relative(a, b, rtol=1e-5):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-1 * scale)


@pytest.mark.parametrize("pattern, method, eps", [("2:4", "bn", 1e-5), ("global", "asr", 1e-5),
                                                  ("uniform", "lw", 1e-3)])
def test_folding_keeps_the_outputs_and_leaves_no_bn_after_a_conv(pattern, method, eps):
    model = conv_net(channels=(4, 8, 16), eps=eps)
    x = random_inputs(48, (4, 8, 8))
    common = dict(sparsity=0.7, pattern=pattern, method=method, batch_size=16, device="cpu", progress=False)
    kept = repair(model, ArraySet(x[:32]), **common)
    folded = repair(model, ArraySet(x[:32]), fold_bn_nodes=True, **common)
    assert len(bn_after_conv(kept.output)) == 3  # the repair wrote its statistics into the BN nodes
    assert bn_after_conv(folded.output) == []
    assert not any(n.op_type == "BatchNormalization" for n in folded.output.graph.node)
    onnx.checker.check_model(folded.output, full_check=True)
    held_out = x[32:]  # data the recalibration never saw
    assert_close_relative(run(folded.output, held_out), run(kept.output, held_out))
    rows = layer_rows(folded.output)
    assert all(r["norm"]["kind"] == "none" for r in rows)
    if pattern == "2:4":  # folding scales output rows, so the 2:4 pattern survives
        assert [r["nm_24"] for r in rows] == ["yes"] * 4
    assert folded.report()["settings"]["fold_bn"] is True


def shared_output_model():
    """Conv -> BN, where the conv's output also feeds a Relu: the BN cannot be folded into the conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w")]
    for name, values in [("s", rng.uniform(0.5, 1.5, 8)), ("b", rng.normal(0, 0.1, 8)),
                         ("m", rng.normal(0, 0.1, 8)), ("v", rng.uniform(0.5, 2, 8))]:
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["n", "r"], ["y"])]
    return make_model(nodes, inits, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])])


def test_a_bn_whose_conv_output_is_shared_is_left_in_place():
    x = random_inputs(32, (4, 8, 8))
    common = dict(sparsity=0.5, method="bn", batch_size=16, device="cpu", progress=False)
    kept = repair(shared_output_model(), ArraySet(x), **common)
    folded = repair(shared_output_model(), ArraySet(x), fold_bn_nodes=True, **common)
    assert len(bn_after_conv(folded.output)) == 1  # folding it would change what the Relu sees
    assert_close_relative(run(folded.output, x), run(kept.output, x))


def test_cli_fold_bn_then_inspect(bn_model, calib_dir, tmp_path, capsys):
    out = tmp_path / "folded.onnx"
    assert main(["repair", str(bn_model), "--calib", str(calib_dir), "-o", str(out), "--fold-bn", "--batch-size", "16",
                 "--sparsity", "0.5", "-q", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["batchnorm_nodes"] == 0 and info["totals"]["layers"] == 4
    assert main(["inspect", str(bn_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["batchnorm_after_layer"] == 3


def identity_fed_bn_model():
    """conv_net whose bn2 takes its bias through an Identity, as the PyTorch exporter writes deduplicated
    initializers (the bundled resnet20_bn.onnx has two such BNs, on the shortcut convs)."""
    model = conv_net(channels=(4, 8, 16))
    bn2 = next(n for n in model.graph.node if n.name == "bn2")
    bn2.input[2] = "bn2.bias_shared"
    model.graph.node.insert(0, helper.make_node("Identity", ["bn2.bias"], ["bn2.bias_shared"]))
    onnx.checker.check_model(model)
    return model


def test_a_bn_with_an_identity_fed_parameter_is_folded_too():
    x = random_inputs(32, (4, 8, 8))
    folded = repair(identity_fed_bn_model(), ArraySet(x), sparsity=0.5, method="bn", batch_size=16, device="cpu",
                    progress=False, fold_bn_nodes=True)
    assert bn_after_conv(folded.output) == []


def test_inspect_sees_through_an_identity_fed_bn_parameter():
    rows = {r["name"]: r for r in layer_rows(identity_fed_bn_model())}
    assert rows["conv2"]["norm"]["kind"] == "BatchNormalization"
    assert rows["conv2"]["norm"]["constant_params"] is True and rows["conv1"]["norm"]["constant_params"] is True


def test_a_folded_weight_is_the_float64_product_rounded_once():
    """What --fold-bn guarantees exactly: each folded weight and bias is the product of the repaired BN's
    float32 parameters and the conv's, computed in float64 and rounded to float32 once."""
    model, x = conv_net(channels=(4, 8, 16)), random_inputs(32, (4, 8, 8))
    common = dict(sparsity=0.5, method="asr", batch_size=16, device="cpu", progress=False)
    kept = {i.name: numpy_helper.to_array(i) for i in repair(model, ArraySet(x), **common).output.graph.initializer}
    folded = {i.name: numpy_helper.to_array(i) for i in
              repair(model, ArraySet(x), fold_bn_nodes=True, **common).output.graph.initializer}
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("proj", "bn3")):
        scale, bias, mean, var = (kept[f"{bn}.{p}"].astype(np.float64) for p in ("scale", "bias", "mean", "var"))
        inv_std = scale / np.sqrt(var + 1e-5)
        weight = kept[f"{conv}.weight"].astype(np.float64) * inv_std[:, None, None, None]
        assert np.array_equal(folded[f"{conv}.weight"], weight.astype(np.float32)), conv
        assert np.array_equal(folded[f"{conv}.asr_bias"], (bias - inv_std * mean).astype(np.float32)), conv


FOLD_BOUND = 1e-5  # docs/deploy.md: the zoo's folded outputs are within this fraction of the output's largest magnitude


@pytest.mark.parametrize("name", ["bn_kept", "bn_kept_opset9", "fixed_batch_1_bn", "inits_as_inputs",
                                  "huge_activations_bn"])  # every zoo graph with a BN right after its conv
@pytest.mark.parametrize("sparsity", [0.9, pytest.param(0.5, marks=pytest.mark.slow)])
def test_folded_outputs_stay_within_the_stated_bound_on_the_zoo(name, sparsity):
    """The outputs differ only by float32 rounding in another order (measured: at most 4e-7 of the scale)."""
    model, feeds = zoo.CLASSES[name]()
    calib = zoo.DictSet(feeds)
    common = dict(sparsity=sparsity, method="bn", device="cpu", progress=False, batch_size=len(calib))
    kept, folded = (repair(model, calib, fold_bn_nodes=fold, **common).output for fold in (False, True))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node if n.input[0] != "input")
    run_kept, run_folded = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                            for m in (kept, folded))
    def outputs(session):  # one sample at a time: fixed_batch_1_bn takes no other batch
        return np.concatenate([session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0]
                               for i in range(len(calib))]).astype(np.float64)

    ref, got = outputs(run_kept), outputs(run_folded)
    assert np.abs(got - ref).max() <= FOLD_BOUND * np.abs(ref).max()
