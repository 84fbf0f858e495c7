"""Measured CPU speed of the 224x224 ResNet-50 after onnxsim 0.8.1's structured pruning (issue 16, peer row).

The model is the BN-folded export of benchmarks/make_resnet50.py (random weights: speed only).
onnxsim's ``apply_structured_pruning_cpp`` takes a fraction of channels, not of multiply-accumulates, so
the fraction is searched on a grid until the pruned model keeps about ``--flops-target`` of the dense
MACs (counted here from the inferred shapes: Conv and Gemm/MatMul only). Dense and pruned are then
timed with ``asr_onnx.bench`` at each batch size.

    python benchmarks/make_resnet50.py --out /tmp/asr-bench
    python benchmarks/peer_resnet50.py --model /tmp/asr-bench/resnet50_224.onnx --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the Conv, Gemm and MatMul nodes for one sample."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            w = weights[node.input[1]]  # (cout, cin / group, kh, kw): each output element costs cin/group*kh*kw
            total += int(np.prod(shapes[node.output[0]][1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights:
            total += int(np.prod(weights[node.input[1]]))
    return total


def main():
    from onnxsim import onnx_simplifier as osx

    from asr_onnx.model.files import load_model
    from asr_onnx.verify.timing import bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer_resnet50.json")
    args = parser.parse_args()

    dense = load_model(args.model)
    dense_macs = macs(dense)
    tried = []
    for fraction in (0.2, 0.25, 0.3, 0.35, 0.4):
        pruned = osx.apply_structured_pruning_cpp(dense, sparsity=fraction)
        tried.append((macs(pruned) / dense_macs, fraction, pruned))
    _, fraction, pruned = min(tried, key=lambda t: abs(t[0] - args.flops_target))
    rows = {"model": str(args.model.name), "onnxsim_channel_fraction": fraction,
            "macs": [dense_macs, macs(pruned)], "macs_kept": macs(pruned) / dense_macs,
            "macs_kept_by_fraction": {f: round(kept, 4) for kept, f, _ in tried},
            "params": [int(sum(np.prod(t.dims) for t in m.graph.initializer)) for m in (dense, pruned)]}
    print(json.dumps(rows), flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        result = bench(pruned, dense, batch_size=batch, threads=args.threads, runs=args.runs, warmup=3)
        for stats in result["models"].values():
            stats.pop("runs_ms")
        rows[f"batch_{batch}"] = {k: result[k] for k in ("settings", "models", "speedup")}
        print(f"batch {batch}: speed-up {result['speedup']:.2f}x", json.dumps(result["models"]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
