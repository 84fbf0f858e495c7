"""What the block target (issue 28) costs: the refit alone (LAMP + OBS masks, 1,024 calibration images) with
``target="layer"`` and ``"block"``, alternated, its Gram passes and solves timed apart; the median of --repeats.

    OMP_NUM_THREADS=1 python benchmarks/block_target_cost.py --models resnet50s_bn,mobilenetv2_bn --cell 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20_bn,resnet50s_bn,mobilenetv2_bn")
    parser.add_argument("--cell", type=float, default=0.9)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file to write the medians to.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import Repair

    rows = []
    for name in args.models.split(","):
        proto = load_model(ROOT / "sample_models" / f"{name}.onnx")
        specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
        calib = load_calib(resolve_data("fashion-mnist:train"), specs, preprocess).take(args.calib_size, 0)
        times: dict[str, list] = {"layer": [], "block": []}
        for _ in range(args.repeats):
            for target in times:
                job = Repair(proto, device="cpu", batch_size=64, progress=False, threads=1)
                job.prune(args.cell, "global", allocation="lamp", score="obs", calib=calib)
                job.reconstruct(calib, target=target)
                times[target].append((job.timings["reconstruct_gram"], job.timings["reconstruct_solve"]))
        row = {"model": name, "cell": args.cell, "repeats": args.repeats}
        for target, runs in times.items():
            row[target] = {"gram_s": round(statistics.median(g for g, _ in runs), 2),
                           "solve_s": round(statistics.median(s for _, s in runs), 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
