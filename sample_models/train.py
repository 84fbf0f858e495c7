"""Train, export and bundle the Fashion-MNIST sample models for asr-onnx.

Dev tool only: needs PyTorch, which the asr_onnx library itself does not use.

Examples:
    python sample_models/train.py --make-data
    python sample_models/train.py --model resnet20 --epochs 6
    python sample_models/train.py --model vit --epochs 12 --threads 1
    python sample_models/train.py --model all --export-only
    python sample_models/train.py --report
"""

import argparse
import gzip
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
METRICS_PATH = os.path.join(HERE, "metrics.json")
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"

MEAN, STD = 0.2860, 0.3530
PREPROCESS_KEY = "asr_onnx.preprocess"
PREPROCESS_JSON = json.dumps({"mean": [0.286], "std": [0.353], "scale": 1.0 / 255.0})
OPSET = 17
SEED = 0
NUM_CALIB, NUM_EVAL = 512, 2000
MODEL_NAMES = ["resnet20", "vgg_bn", "resnet50s", "mobilenetv2"]
TRANSFORMER_NAMES = ["vit", "convnext"]  # no BN: one ONNX file each, AdamW


# --------------------------------------------------------------------------- data


def read_idx(path):
    """Read a gzipped IDX file into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(fmnist_dir, split):
    """Return (uint8 images (N,28,28), int64 labels (N,)) for 'train' or 't10k'."""
    images = read_idx(os.path.join(fmnist_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(fmnist_dir, f"{split}-labels-idx1-ubyte.gz"))
    return images, labels.astype(np.int64)


def normalize(images_u8):
    """uint8 (N,28,28) -> model-ready float32 (N,1,28,28)."""
    x = images_u8.astype(np.float32)[:, None] / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


# ------------------------------------------------------------------------- models


def conv_bn(cin, cout, k, stride=1, groups=1):
    """Conv (no bias) followed by BatchNorm."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


def projection(cin, cout, stride):
    """1x1 conv+BN shortcut when the shape changes, identity otherwise."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return conv_bn(cin, cout, 1, stride)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN with a residual add."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.branch = nn.Sequential(
            conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout, 3)
        )
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3, 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.branch = nn.Sequential(
            conv_bn(cin, width, 1), nn.ReLU(),
            conv_bn(width, width, 3, stride), nn.ReLU(),
            conv_bn(width, cout, 1),
        )
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Generic ResNet with a 3x3 stem, for 1x28x28 inputs."""

    def __init__(self, block, stem_width, widths, depths, strides, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, stem_width, 3), nn.ReLU())
        layers, cin = [], stem_width
        for width, depth, stride in zip(widths, depths, strides):
            for i in range(depth):
                blk = block(cin, width, stride if i == 0 else 1)
                cout = width * getattr(block, "expansion", 1)
                layers.append(blk)
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet20():
    """CIFAR-style ResNet-20: 3 stages x 3 basic blocks, widths 16/32/64."""
    return ResNet(BasicBlock, 16, [16, 32, 64], [3, 3, 3], [1, 2, 2])


def resnet50s():
    """ResNet-50 layout (3/4/6/3 bottlenecks) with base width 8."""
    return ResNet(Bottleneck, 16, [8, 16, 32, 64], [3, 4, 6, 3], [1, 2, 2, 2])


class VGGBN(nn.Module):
    """VGG-style plain CNN with BN, global pool and a small MLP head."""

    cfg = [32, 32, "M", 64, 64, "M", 128, 128, "M"]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [], 1
        for item in self.cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [conv_bn(cin, item, 3), nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_bn():
    """VGG-style net [32,32,M,64,64,M,128,128,M] with BN."""
    return VGGBN()


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            conv_bn(hidden, cout, 1),
        ]
        self.branch = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.branch(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Small MobileNetV2 for 1x28x28 inputs."""

    # (expand t, channels c, repeats n, first stride s)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)]

    def __init__(self, stem_width=16, head_width=256, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, stem_width, 3), nn.ReLU6())
        blocks, cin = [], stem_width
        for t, c, n, s in self.cfg:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(conv_bn(cin, head_width, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_width, num_classes)

    def forward(self, x):
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


def mobilenetv2():
    """MobileNetV2-style net, stem 16, blocks up to 96 channels."""
    return MobileNetV2()


# ------------------------------------------------------------ transformer-style


def init_transformer_weights(module):
    """Truncated-normal (std 0.02) weights and zero biases for Linear/Conv2d."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention written out: q/k/v Linear, per-head MatMuls."""

    def __init__(self, dim, heads, tokens):
        super().__init__()
        self.dim, self.heads, self.tokens = dim, heads, tokens
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x):
        """(N, T, C) -> (N, heads, T, head_dim) with constant reshape sizes."""
        x = x.reshape(-1, self.tokens, self.heads, self.head_dim)
        return x.transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, heads, tokens, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT for 1x28x28: 4x4 conv patches (49 tokens), mean-pooled head."""

    def __init__(self, dim=64, depth=6, heads=4, mlp_ratio=2, patch=4, num_classes=10):
        super().__init__()
        self.dim, self.tokens = dim, (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, self.tokens, mlp_ratio)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x):
        x = self.patch_embed(x).reshape(-1, self.dim, self.tokens).transpose(1, 2)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x.mean(1))


def vit():
    """ViT: patch 4, dim 64, 6 pre-norm blocks, 4 heads, MLP ratio 2."""
    return ViT()


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (permute to NHWC and back)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dw 7x7, channel-last LN, Linear x4 + GELU + Linear, residual."""

    def __init__(self, dim, expand=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * expand), nn.GELU(),
                                 nn.Linear(dim * expand, dim))

    def forward(self, x):
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Small ConvNeXt for 1x28x28: 2x2 patchify stem, LN+2x2/s2 downsampling."""

    def __init__(self, widths=(32, 64, 128), depths=(2, 2, 2), stem=2, num_classes=10):
        super().__init__()
        layers = [nn.Conv2d(1, widths[0], stem, stem), LayerNorm2d(widths[0])]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            if i > 0:
                layers += [LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], width, 2, 2)]
            layers += [ConvNeXtBlock(width) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        self.apply(init_transformer_weights)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean((2, 3))))


def convnext():
    """ConvNeXt-style net: widths 32/64/128 at 14/7/3 px, depths 2/2/2."""
    return ConvNeXt()


BUILDERS = {
    "resnet20": resnet20,
    "vgg_bn": vgg_bn,
    "resnet50s": resnet50s,
    "mobilenetv2": mobilenetv2,
    "vit": vit,
    "convnext": convnext,
}


def build_model(name):
    """Build an untrained architecture by name."""
    return BUILDERS[name]()


def count_params(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


def count_batchnorms(model):
    """Number of BatchNorm2d modules."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def load_trained(name, models_dir=HERE):
    """Build `name` and load its saved state_dict, in eval mode."""
    model = build_model(name)
    state = torch.load(os.path.join(models_dir, f"{name}.pt"), map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------- training


NO_CROP = ["vit"]  # the ViT underfits in a short schedule with random crops


def augment(x, gen, crop=True):
    """Random horizontal flip and (if `crop`) random crop with padding 2."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if not crop:
        return x
    padded = F.pad(x, (2, 2, 2, 2), value=float((0.0 - MEAN) / STD))
    oy = torch.randint(0, 5, (n,), generator=gen)
    ox = torch.randint(0, 5, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def evaluate_torch(model, x, y, batch=1000):
    """Top-1 accuracy of a torch model on float arrays."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i : i + batch]).contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1).numpy() == y[i : i + batch]).sum()
    return correct / len(x)


def default_lr(name):
    """OneCycle max learning rate: 0.1 for the SGD CNNs, 2e-3 for AdamW models."""
    return 2e-3 if name in TRANSFORMER_NAMES else 0.1


def make_optimizer(name, model, lr):
    """SGD-nesterov (wd 5e-4) for the CNNs; AdamW (wd 0.05, none on 1-D params)
    for the transformer-style models."""
    if name not in TRANSFORMER_NAMES:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                               nesterov=True, weight_decay=5e-4)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def train_model(name, epochs, fmnist_dir, batch=256, max_lr=0.1, max_batches=None):
    """Train one model with OneCycleLR (optimiser per `make_optimizer`; label
    smoothing 0.1 for the transformer-style models); return (model, stats)."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    train_u8, train_y = load_split(fmnist_dir, "train")
    x_all = torch.from_numpy(normalize(train_u8))
    y_all = torch.from_numpy(train_y)
    model = build_model(name).to(memory_format=torch.channels_last)
    opt = make_optimizer(name, model, max_lr)
    smoothing = 0.1 if name in TRANSFORMER_NAMES else 0.0
    steps = len(x_all) // batch
    if max_batches:
        steps = min(steps, max_batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=epochs * steps)
    epoch_times = []
    for epoch in range(epochs):
        model.train()
        t0, loss_sum = time.time(), 0.0
        order = torch.randperm(len(x_all), generator=gen)
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            xb = augment(x_all[idx], gen, crop=name not in NO_CROP)
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        epoch_times.append(time.time() - t0)
        print(f"[{name}] epoch {epoch + 1}/{epochs} loss {loss_sum / steps:.4f} "
              f"time {epoch_times[-1]:.1f}s", flush=True)
    model = model.eval().to(memory_format=torch.contiguous_format)
    stats = {"epochs": epochs, "train_seconds": round(sum(epoch_times), 1),
             "first_epoch_seconds": round(epoch_times[0], 1)}
    return model, stats


# ------------------------------------------------------------------------- export


def tidy_graph(graph):
    """Turn Constant nodes and Identity-of-initializer nodes into initializers.

    The TorchScript exporter emits Constant nodes (e.g. Clip bounds) and, when
    two parameters hold equal values, one initializer plus an Identity node.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            tensor = onnx_tensor_copy(node.attribute[0].t, node.output[0])
        elif node.op_type == "Identity" and node.input[0] in inits:
            tensor = numpy_helper.from_array(
                numpy_helper.to_array(inits[node.input[0]]), node.output[0])
        else:
            kept.append(node)
            continue
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(kept)


def onnx_tensor_copy(tensor, name):
    """Copy of a TensorProto under a new name."""
    from onnx import TensorProto

    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def export_onnx(model, path, keep_bn):
    """Export an eval-mode model; keep BN nodes or let the exporter fold them."""
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    dummy = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model.eval(), (dummy,), path, dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        training=mode, do_constant_folding=not keep_bn, export_params=True,
        keep_initializers_as_inputs=False,
    )
    import onnx

    proto = onnx.load(path)
    tidy_graph(proto.graph)
    onnx.helper.set_model_props(proto, {PREPROCESS_KEY: PREPROCESS_JSON})
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def check_bn_nodes(path, expected_bn):
    """Assert BN node count (inference-mode, single output) in an ONNX file."""
    import onnx

    proto = onnx.load(path)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == expected_bn, f"{path}: {len(bns)} BN nodes, want {expected_bn}"
    for node in bns:
        assert len(node.output) == 1, f"{path}: BN {node.name} has training outputs"
        for attr in node.attribute:
            assert not (attr.name == "training_mode" and attr.i), f"{path}: training_mode"


def onnx_logits(path, x, batch=1000):
    """Run an ONNX file on float inputs with onnxruntime CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = [sess.run(["logits"], {"input": x[i : i + batch]})[0]
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def onnx_paths(name, models_dir=HERE):
    """(bn-preserving path, bn-folded path) for a model name."""
    return (os.path.join(models_dir, f"{name}_bn.onnx"),
            os.path.join(models_dir, f"{name}.onnx"))


def export_both(name, model, check_x, tol=1e-4):
    """Write both ONNX flavours and check them against torch; return max diffs."""
    bn_path, folded_path = onnx_paths(name)
    export_onnx(model, bn_path, keep_bn=True)
    export_onnx(model, folded_path, keep_bn=False)
    check_bn_nodes(bn_path, count_batchnorms(model))
    check_bn_nodes(folded_path, 0)
    with torch.no_grad():
        ref = model(torch.from_numpy(check_x)).numpy()
    diffs = {}
    for path in (bn_path, folded_path):
        diff = float(np.abs(onnx_logits(path, check_x) - ref).max())
        assert diff <= tol, f"{path}: max abs diff {diff} > {tol}"
        diffs[os.path.basename(path)] = diff
    print(f"[{name}] exported, max abs diff vs torch: {diffs}", flush=True)
    return diffs


def export_single(name, model, check_x, tol=1e-4):
    """Write the one ONNX file of a BN-free model, check it; return max diffs."""
    path = os.path.join(HERE, f"{name}.onnx")
    export_onnx(model, path, keep_bn=False)
    check_bn_nodes(path, 0)
    with torch.no_grad():
        ref = model(torch.from_numpy(check_x)).numpy()
    diff = float(np.abs(onnx_logits(path, check_x) - ref).max())
    assert diff <= tol, f"{path}: max abs diff {diff} > {tol}"
    print(f"[{name}] exported, max abs diff vs torch: {diff}", flush=True)
    return {os.path.basename(path): diff}


# ---------------------------------------------------------------------- metrics


def load_metrics():
    """Read metrics.json (empty dict when absent)."""
    if not os.path.exists(METRICS_PATH):
        return {}
    with open(METRICS_PATH) as f:
        return json.load(f)


def save_metrics(metrics):
    """Write metrics.json with sorted keys."""
    with open(METRICS_PATH, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")


def onnx_accuracy(path, x, y):
    """Top-1 accuracy of an ONNX model."""
    return float((onnx_logits(path, x).argmax(1) == y).mean())


def evaluate_onnx_models(name, test_x, test_y):
    """Full test-set accuracy for both ONNX flavours (or the single file)."""
    if name in TRANSFORMER_NAMES:
        return {"onnx_top1": onnx_accuracy(os.path.join(HERE, f"{name}.onnx"),
                                           test_x, test_y)}
    bn_path, folded_path = onnx_paths(name)
    return {"onnx_bn_top1": onnx_accuracy(bn_path, test_x, test_y),
            "onnx_folded_top1": onnx_accuracy(folded_path, test_x, test_y)}


def run_model(name, args, test_x, test_y):
    """Train (or load) one model, save .pt, export, evaluate, record metrics."""
    metrics = load_metrics()
    entry = metrics.get(name, {})
    if args.export_only:
        model = load_trained(name)
    else:
        lr = args.lr if args.lr is not None else default_lr(name)
        model, stats = train_model(name, args.epochs, args.fmnist_dir,
                                   max_lr=lr, max_batches=args.max_batches)
        torch.save(model.state_dict(), os.path.join(HERE, f"{name}.pt"))
        entry = dict(stats, lr=lr)
    entry["params"] = count_params(model)
    entry["torch_top1"] = float(evaluate_torch(model, test_x, test_y))
    export = export_single if name in TRANSFORMER_NAMES else export_both
    entry["max_abs_diff"] = export(name, model, test_x[:256])
    entry.update(evaluate_onnx_models(name, test_x, test_y))
    print(f"[{name}] {json.dumps(entry)}", flush=True)
    metrics = load_metrics()
    metrics[name] = entry
    save_metrics(metrics)


# -------------------------------------------------------------------- bundled data


def sha256_file(path):
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_calib_pngs(train_u8, train_y):
    """Save the first 512 images of a seeded permutation as class-folder PNGs."""
    from PIL import Image

    order = np.random.default_rng(SEED).permutation(len(train_u8))[:NUM_CALIB]
    rel_paths = []
    for idx in order:
        rel = os.path.join("calib", str(int(train_y[idx])), f"{int(idx):05d}.png")
        full = os.path.join(DATA_DIR, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.fromarray(train_u8[idx], mode="L").save(full, optimize=True)
        rel_paths.append(rel)
    return sorted(rel_paths)


def savez_compressed_reproducible(path, **arrays):
    """Like np.savez_compressed, but with fixed zip timestamps (same bytes each run)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def write_eval_npz(test_u8, test_y):
    """Save the first 2000 test images, normalized, as eval.npz."""
    path = os.path.join(DATA_DIR, "eval.npz")
    savez_compressed_reproducible(path, x=normalize(test_u8[:NUM_EVAL]),
                                  y=test_y[:NUM_EVAL].astype(np.int64))
    return "eval.npz"


LICENSE_TEXT = """\
The images in this folder (calib/*.png and eval.npz) are derived from
Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist):
calib/ holds 512 images of the training set (first 512 of a numpy
default_rng(0) permutation), eval.npz holds the first 2000 images of the test
set, normalized with mean 0.2860 and std 0.3530. Generated by
`python sample_models/train.py --make-data` from the original IDX files.

The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def make_data(fmnist_dir):
    """Write calib PNGs, eval.npz, the licence and SHA256SUMS into data/."""
    import shutil

    shutil.rmtree(os.path.join(DATA_DIR, "calib"), ignore_errors=True)
    os.makedirs(DATA_DIR, exist_ok=True)
    train_u8, train_y = load_split(fmnist_dir, "train")
    test_u8, test_y = load_split(fmnist_dir, "t10k")
    rel_paths = [write_eval_npz(test_u8, test_y)] + write_calib_pngs(train_u8, train_y)
    with open(os.path.join(DATA_DIR, "LICENSE-fashion-mnist.txt"), "w") as f:
        f.write(LICENSE_TEXT)
    lines = [f"{sha256_file(os.path.join(DATA_DIR, rel))}  {rel}\n" for rel in rel_paths]
    with open(os.path.join(DATA_DIR, "SHA256SUMS"), "w") as f:
        f.writelines(lines)
    print(f"wrote {len(rel_paths)} files + licence + SHA256SUMS to {DATA_DIR}")


# --------------------------------------------------------------------------- main


def report():
    """Print the metrics as a markdown table."""
    metrics = load_metrics()
    print("| model | params | BN | torch top-1 | ONNX `_bn` top-1 | ONNX folded top-1 "
          "| epochs | train time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODEL_NAMES:
        if name not in metrics:
            continue
        m = metrics[name]
        bns = count_batchnorms(build_model(name))
        print(f"| {name} | {m['params']:,} | {bns} | {m['torch_top1']:.2%} "
              f"| {m['onnx_bn_top1']:.2%} | {m['onnx_folded_top1']:.2%} "
              f"| {m['epochs']} | {m['train_seconds'] / 60:.1f} min |")
    report_transformers(metrics)


def report_transformers(metrics):
    """Print the BN-free models (one ONNX file each) as a second table."""
    names = [n for n in TRANSFORMER_NAMES if n in metrics]
    if not names:
        return
    print("\n| model | params | torch top-1 | ONNX top-1 | epochs | train time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        m = metrics[name]
        print(f"| {name} | {m['params']:,} | {m['torch_top1']:.2%} | {m['onnx_top1']:.2%} "
              f"| {m['epochs']} | {m['train_seconds'] / 60:.1f} min |")


def parse_args():
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all",
                   help="|".join(MODEL_NAMES + TRANSFORMER_NAMES)
                   + "|all (all = the four CNNs); comma-separated list allowed")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=None,
                   help="OneCycle max learning rate (default 0.1 CNNs, 2e-3 vit/convnext)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="cap batches per epoch (timing/smoke tests only)")
    p.add_argument("--export-only", action="store_true",
                   help="re-export ONNX from the saved .pt without retraining")
    p.add_argument("--make-data", action="store_true", help="write data/ and exit")
    p.add_argument("--report", action="store_true", help="print the metrics table")
    p.add_argument("--fmnist-dir", default=DEFAULT_FMNIST_DIR)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.make_data:
        return make_data(args.fmnist_dir)
    if args.report:
        return report()
    names = MODEL_NAMES if args.model == "all" else args.model.split(",")
    test_u8, test_y = load_split(args.fmnist_dir, "t10k")
    test_x = normalize(test_u8)
    for name in names:
        run_model(name, args, test_x, test_y)


if __name__ == "__main__":
    main()
