"""Repair time of a model that fixes a batch of 1, against the same graph with a dynamic batch.

The dynamic twin is the model with its batch made symbolic (``asr_onnx.model.batch``), so both run the same
nodes. Each repair (prune 50% global, ``bn``, in-process, CPU) is timed ``--runs`` times, alternating
fixed and dynamic; figures are medians and the ratio is median(fixed) / median(dynamic). ``--levels``
also times, once, the fixed model measured level by level (the path used where the batch cannot be
freed, and before it could). "plain" is one onnxruntime pass of the fixed model over the set.

Examples:
    python benchmarks/fixed_batch.py                                   # the opset-9 AlexNet-like graph
    python benchmarks/fixed_batch.py --model yolox.onnx --samples 8 --levels
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper


def alexnet(size: int = 64) -> onnx.ModelProto:
    """An opset-9 AlexNet-like export with a fixed batch of 1 and ``Reshape(x, [1, -1])`` before the head."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv(x, cin, cout, k, stride, name):
        w = init(f"{name}.w", rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32))
        b = init(f"{name}.b", rng.normal(0, 0.05, cout).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w, b], [name], strides=[stride] * 2, pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
        return f"{name}.relu"

    def pool(x, name):
        nodes.append(helper.make_node("MaxPool", [x], [name], kernel_shape=[2, 2], strides=[2, 2]))
        return name

    h = pool(conv("input", 3, 32, 5, 2, "conv1"), "pool1")
    nodes.append(helper.make_node("LRN", [h], ["lrn1"], size=5))
    h = pool(conv("lrn1", 32, 64, 3, 1, "conv2"), "pool2")
    h = conv(conv(conv(h, 64, 96, 3, 1, "conv3"), 96, 96, 3, 1, "conv4"), 96, 64, 3, 1, "conv5")
    h = pool(h, "pool5")
    side = size // 16
    nodes.append(helper.make_node("Reshape", [h, init("flat", np.array([1, -1], np.int64))], ["flat.out"]))
    h = "flat.out"
    for i, (fan_in, fan_out) in enumerate(((64 * side * side, 256), (256, 256), (256, 10))):
        w = init(f"fc{i}.w", rng.normal(0, (2 / fan_in) ** 0.5, (fan_in, fan_out)).astype(np.float32))
        nodes.append(helper.make_node("Gemm", [h, w, init(f"fc{i}.b", np.zeros(fan_out, np.float32))], [f"fc{i}"]))
        h = f"fc{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"{h}.relu"]))
            h = f"{h}.relu"
    graph = helper.make_graph(nodes, "alexnet", [helper.make_tensor_value_info("input", 1, [1, 3, size, size])],
                              [helper.make_tensor_value_info(h, 1, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="fixed_batch.py")
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


class Arrays:
    """A calibration set over one in-memory array."""

    def __init__(self, name, x):
        self.name, self.x = name, x

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size):
        for i in range(0, len(self.x), batch_size):
            yield {self.name: self.x[i:i + batch_size]}


def repair_time(model, calib, levels: bool = False) -> float:
    from asr_onnx.pipeline.driver import Repair

    start = time.perf_counter()
    job = Repair(model, device="cpu", progress=False, batch_size=min(64, len(calib)))
    if levels:
        job.batch.plan = None  # the level-by-level path
    job.prune(0.5, "global").run(calib, "bn")
    return time.perf_counter() - start


def plain_time(model, calib) -> float:
    from asr_onnx.model.session import make_session

    start = time.perf_counter()
    session = make_session(model, "cpu")
    for feed in calib.batches(1):
        session.run(None, feed)
    return time.perf_counter() - start


def main() -> None:
    from asr_onnx.calib import input_specs
    from asr_onnx.model.batch import free_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an ONNX file with a fixed batch of 1 (default: the AlexNet-like graph)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--levels", action="store_true", help="also time the level-by-level path once")
    args = parser.parse_args()

    fixed = onnx.load(args.model) if args.model else alexnet()
    spec = input_specs(fixed)[0]
    plan = free_batch(fixed, spec.shape[0])
    if plan is None:
        raise SystemExit("shape inference cannot free this model's batch")
    dynamic = plan.apply(fixed)
    x = np.random.default_rng(0).uniform(0, 1, (args.samples, *spec.shape[1:])).astype(np.float32)
    calib = Arrays(spec.name, x)
    times = {"fixed": [], "dynamic": []}
    for _ in range(args.runs):
        times["fixed"].append(repair_time(fixed, calib))
        times["dynamic"].append(repair_time(dynamic, calib))
    result = {"model": args.model or "alexnet-like opset 9", "samples": args.samples, "runs": args.runs,
              "sites": None, "plain_s": round(plain_time(fixed, calib), 3)}
    result.update({f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()})
    result["fixed_over_dynamic"] = round(result["fixed_s"] / result["dynamic_s"], 2)
    if args.levels:
        result["levels_s"] = round(repair_time(fixed, calib, levels=True), 3)
    from asr_onnx.model.graph import find_layers, find_sites, to_graph

    graph = to_graph(fixed)
    result["sites"] = len(find_sites(graph, find_layers(graph)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
