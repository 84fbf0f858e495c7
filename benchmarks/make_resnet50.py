"""A 224x224 ImageNet-shaped ResNet-50 (torchvision layout, random weights) for the performance benchmark.

Written out in plain PyTorch (torchvision is not a dependency): 7x7 stem + max-pool, bottleneck stages of
3/4/6/3 blocks with widths 64/128/256/512 and expansion 4 (stride on the 3x3, "v1.5"), 1x1 conv + BN
projections, global average pool and a 1000-way FC: 25.6M parameters, about 4.1 GMAC per image.

The weights are random (they do not matter for speed); BN scales and shifts are random too, and the BN
running statistics are set by a few train-mode passes over random data so that activations stay finite.

Examples:
    python benchmarks/make_resnet50.py --out /tmp/asr-bench            # resnet50_224_bn.onnx + resnet50_224.onnx
    python benchmarks/make_resnet50.py --out /tmp/asr-bench --check    # and compare onnxruntime with torch
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

OPSET = 17
SIZE = 224


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for width, depth, stride in zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(seed: int = 0) -> ResNet50:
    """A ResNet-50 with seeded random weights and BN running statistics set on random data, in eval mode."""
    torch.manual_seed(seed)
    model = ResNet50()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # distinct affine parameters, as in a trained model: the exporter would otherwise merge the
            # identical all-ones/all-zeros initializers into Identity nodes
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def paths(folder) -> dict[str, str]:
    """Output files: the BN-preserving model, the BN-folded one and the torch state dict."""
    return {"resnet50_224_bn": os.path.join(folder, "resnet50_224_bn.onnx"),
            "resnet50_224": os.path.join(folder, "resnet50_224.onnx"),
            "state": os.path.join(folder, "resnet50_224.pt")}


def export(model: nn.Module, path: str, keep_bn: bool):
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(model.eval(), (torch.zeros(2, 3, SIZE, SIZE),), path, dynamo=False, opset_version=OPSET,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, training=mode,
                      do_constant_folding=not keep_bn, export_params=True, keep_initializers_as_inputs=False)


def make(folder, check: bool = False) -> dict[str, str]:
    """Writes both ONNX flavours and the state dict into ``folder`` (skipped when all exist)."""
    os.makedirs(folder, exist_ok=True)
    out = paths(folder)
    if all(os.path.exists(p) for p in out.values()):
        return out
    model = resnet50()
    torch.save(model.state_dict(), out["state"])
    export(model, out["resnet50_224_bn"], keep_bn=True)
    export(model, out["resnet50_224"], keep_bn=False)
    if check:
        import numpy as np
        import onnxruntime as ort

        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.no_grad():
            ref = model(x).numpy()
        for key in ("resnet50_224_bn", "resnet50_224"):
            sess = ort.InferenceSession(out[key], providers=["CPUExecutionProvider"])
            got = sess.run(None, {"input": x.numpy()})[0]
            print(f"{key}: max |onnx - torch| = {np.abs(got - ref).max():.2e} (logit scale {np.abs(ref).max():.2f})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with torch on two random images")
    args = p.parse_args()
    for key, path in make(args.out, args.check).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
