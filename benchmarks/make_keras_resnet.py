"""Trains a small Keras ResNet (channels last: NHWC, BatchNormalization, residual Adds) on fashion-mnist:train
and exports it to ONNX with tf2onnx, and with Keras 3 on the torch backend, for benchmarks/real_graphs.py.

    pip install tensorflow-cpu tf2onnx     # a training tool only, never a dependency of asr-onnx
    python benchmarks/make_keras_resnet.py OUT_DIR [--epochs 3]

Writes OUT_DIR/keras_resnet.weights.h5, OUT_DIR/keras_resnet_tf2onnx.onnx and, when the torch backend can
export it, OUT_DIR/keras_resnet_torch.onnx (keep them outside the repository). Inputs are (N, 28, 28, 1) float32
in [0, 1]; outputs are (N, 10) logits. Training uses the first 55,000 training images; the last 5,000 are held
out and their top-1 is printed for each export.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

WIDTHS = (16, 32, 64)  # one basic block per stage; stride 2 from the second stage on
HELD = 5000


def fashion_train():
    import numpy as np

    from asr_onnx.calib.idx import read_idx
    from asr_onnx.calib.named import FASHION_MNIST

    x = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz").astype(np.float32)[..., None] / 255
    y = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def build(keras):
    layers = keras.layers

    def conv_bn(h, width, stride=1, relu=True):
        h = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        return layers.ReLU()(h) if relu else h

    x = keras.Input((28, 28, 1), name="input")
    h = conv_bn(x, WIDTHS[0])
    for i, width in enumerate(WIDTHS):
        stride = 1 if i == 0 else 2
        skip = h if stride == 1 and h.shape[-1] == width else layers.BatchNormalization()(
            layers.Conv2D(width, 1, strides=stride, use_bias=False)(h))
        h = layers.ReLU()(layers.Add()([conv_bn(conv_bn(h, width, stride), width, relu=False), skip]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, layers.Dense(10, name="logits")(h))


def top1(path, x, y):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return float((logits.argmax(1) == y).mean())


def train_and_export_tf(out: Path, epochs: int) -> None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf
    import tf2onnx

    tf.config.threading.set_intra_op_parallelism_threads(2)
    keras.utils.set_random_seed(0)
    x, y = fashion_train()
    model = build(keras)
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x[:-HELD], y[:-HELD], batch_size=128, epochs=epochs, verbose=2)
    model.save_weights(out / "keras_resnet.weights.h5")
    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input"),)
    model.output_names = ["logits"]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17,
                               output_path=str(out / "keras_resnet_tf2onnx.onnx"))
    print(f"tf2onnx: held-out top-1 {top1(out / 'keras_resnet_tf2onnx.onnx', x[-HELD:], y[-HELD:]):.4f}")


def export_torch(out: Path) -> None:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import numpy as np

    x, y = fashion_train()
    model = build(keras)
    model.load_weights(out / "keras_resnet.weights.h5")
    model.export(str(out / "keras_resnet_torch.onnx"), format="onnx", verbose=False,
                 input_signature=[keras.InputSpec(shape=(None, 28, 28, 1), dtype="float32")])
    print(f"torch backend: held-out top-1 {top1(out / 'keras_resnet_torch.onnx', x[-HELD:], y[-HELD:]):.4f}")
    del np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backend", choices=("tensorflow", "torch"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.backend == "tensorflow":
        train_and_export_tf(args.out, args.epochs)
    elif args.backend == "torch":
        export_torch(args.out)
    else:  # each backend in its own process: Keras reads KERAS_BACKEND once, at import
        for backend in ("tensorflow", "torch"):
            cmd = [sys.executable, __file__, str(args.out), "--epochs", str(args.epochs), "--backend", backend]
            if subprocess.run(cmd).returncode and backend == "tensorflow":
                sys.exit(1)


if __name__ == "__main__":
    main()
