"""Variants of the allocation "error" (issue 28), on held-out training images only (never the test set).

Each run measures the per-layer error table with one variant, prunes each layer to its chosen count, then runs
the default repair (OBS masks chosen again in the refit with those counts, BN recalibration, head correction;
``obs_tries.repaired``) and scores top-1 on 2,000 training images disjoint from the 1,024 calibration images.

* ``levels``: the per-layer sparsities measured (0 and the global sparsity are always added): ``coarse``, six
  levels (the first default), or ``fine``, twelve (the default now);
* ``samples``: the calibration samples the errors are measured on;
* ``refit``: 1 to measure each layer OBS-pruned and refitted on the dense input (what ``--score obs`` does), 0 for
  its magnitude mask alone.

    python benchmarks/alloc_error_tries.py resnet50s_bn:0.95 --variants coarse,norefit,fine,s128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from obs_tries import repaired  # noqa: E402
from reconstruct_table import data_sets  # noqa: E402

VARIANTS = {
    "default": {},
    "norefit": {"refit": False},
    "coarse": {"levels": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)},  # the first default, before "fine" won
    "fine": {"levels": (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)},
    "s128": {"samples": 128},
    "s512": {"samples": 512},
}


def run(proto, calib, held, sparsity: float, variant: dict) -> dict:
    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.prune.error_budget import LEVELS, SAMPLES, error_masks

    layers = find_layers(to_graph(proto))
    chosen = list(range(len(layers)))
    start, cpu = time.perf_counter(), time.process_time()
    keeps, table, pruned = error_masks(proto, layers, chosen, [layer.weight.values for layer in layers], sparsity,
                                       calib, refit=variant.get("refit", True), levels=variant.get("levels"),
                                       samples=variant.get("samples"), batch_size=64, device="cpu", threads=1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sizes = [layer.weight.values.size for layer in layers]
    return {"levels": list(variant.get("levels", LEVELS)), "samples": variant.get("samples", SAMPLES),
            "refit": variant.get("refit", True), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "per_layer": [round(int(k) / n, 4) for k, n in zip(pruned, sizes)],
            "top1": repaired(proto, calib, held, sparsity, keeps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", help="MODEL:SPARSITY, comma-separated")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--out", default=str(HERE / "results" / "alloc_error_tries.json"))
    args = parser.parse_args()
    from asr_onnx.model.files import load_model

    out = Path(args.out)
    split = argparse.Namespace(calib_size=1024, seed=0, eval="heldout", eval_size=2000)
    for cell in args.cells.split(","):
        name, sparsity = cell.split(":")
        proto = load_model(HERE.parent / "sample_models" / f"{name}.onnx")
        calib, held = data_sets(proto, split)
        for variant in args.variants.split(","):
            row = {"model": name, "cell": sparsity, "variant": variant,
                   **run(proto, calib, held, float(sparsity), VARIANTS[variant])}
            rows = json.loads(out.read_text())["rows"] if out.exists() else []
            rows = [r for r in rows if (r["model"], r["cell"], r["variant"]) != (name, sparsity, variant)] + [row]
            out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)


if __name__ == "__main__":
    main()
