"""PyTorch as an independent oracle for recalibration (skipped when torch is absent)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from paths import FIXTURES
from zoo import ArraySet

from asr_onnx.pipeline.driver import repair

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def trained_like_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for bn in (net.b1, net.b2):  # running statistics that are not the calibration data's
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def export_bn(net, path):
    torch.onnx.export(net, (torch.zeros(2, 3, 8, 8),), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    model = onnx.load(path)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 2
    return model


def load_pruned_weights(net, model):
    """Copies the repaired model's conv weights (pruned, and pre-gained if any) into the torch net."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for conv, bn in ((net.c1, "b1"), (net.c2, "b2")):
        name = next(n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.output[0] in
                    {m.input[0] for m in model.graph.node if m.op_type == "BatchNormalization" and bn in m.name})
        conv.weight.data = torch.from_numpy(weights[name].copy())
    net.fc.weight.data = torch.from_numpy(weights[next(n.input[1] for n in model.graph.node if n.op_type == "Gemm")].copy()
                                          .reshape(net.fc.weight.shape))


def run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def torch_recalibrate(net, x, batch, momentum):
    """PyTorch's BN recalibration: train-mode forward passes, then eval."""
    for bn in (net.b1, net.b2):
        bn.momentum = momentum
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            net(torch.from_numpy(x[i : i + batch]))
    return net.eval()


def bn_params(model, name):
    node = next(n for n in model.graph.node if n.op_type == "BatchNormalization" and name in n.name)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [weights[i] for i in node.input[1:5]]


@pytest.mark.parametrize("momentum,batch", [(None, 64), (0.1, 8)])
def test_bn_recalibration_matches_pytorch(tmp_path, momentum, batch):
    """Exact on one batch (PyTorch's cumulative average = population), and momentum 0.1 over 8 batches."""
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    net = trained_like_net()
    model = export_bn(net, tmp_path / "net.onnx")
    recal = "exact" if momentum is None else "momentum"
    job = repair(model, ArraySet(x), sparsity=0.7, method="bn", recal=recal, momentum=momentum or 0.1,
                 batch_size=batch, device="cpu", progress=False, correct_head=False, reference="running")
    load_pruned_weights(net, job.pruned)
    net = torch_recalibrate(net, x, batch, momentum)
    for name, bn in (("b1", net.b1), ("b2", net.b2)):
        scale, bias, mean, var = bn_params(job.output, name)
        np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=2e-3)
    with torch.no_grad():  # REFLOW leaves the head alone, and so does correct_head=False
        np.testing.assert_allclose(run(job.output, x), net(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-3)


def test_literal_order_with_momentum_matches_pytorch(tmp_path):
    """pre-bn: the gain multiplied into the conv, then PyTorch's momentum recalibration."""
    x = np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32)
    net = trained_like_net(seed=1)
    model = export_bn(net, tmp_path / "net.onnx")
    job = repair(model, ArraySet(x), sparsity=0.7, method="asr", placement="pre-bn", recal="momentum",
                 batch_size=8, device="cpu", progress=False, reference="running")
    load_pruned_weights(net, job.output)  # the output's conv weights carry the gain
    net = torch_recalibrate(net, x, 8, 0.1)
    for name, bn in (("b1", net.b1), ("b2", net.b2)):
        _, _, mean, var = bn_params(job.output, name)
        np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=3e-3, atol=3e-4)
        np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=3e-3)


def test_the_mobilenetv3_fixture_computes_what_its_pytorch_net_does():
    """tests/fixtures/se_mobilenetv3.onnx (SE, HardSwish, HardSigmoid, depthwise, BN) against the PyTorch
    module it was trained as, with the graph's weights and running statistics loaded into it."""
    import importlib.util

    import onnxruntime as ort
    import zoo

    path = FIXTURES / "make_se_mobilenetv3.py"
    spec = importlib.util.spec_from_file_location("make_se_mobilenetv3", path)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    model, feeds = zoo.se_mobilenetv3()
    stats = {name for n in model.graph.node if n.op_type == "BatchNormalization" for name in n.input[3:5]}
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name not in stats]
    net = maker.Net().eval()
    with torch.no_grad():
        for param, value in zip(net.parameters(), weights, strict=True):
            param.copy_(torch.tensor(value))
        maker.load_running_statistics(net, model)
        expected = net(torch.from_numpy(feeds["input"])).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, rtol=1e-4, atol=1e-4)
