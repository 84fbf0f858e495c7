"""Issue 33: the default repair on one process and on a local Ray cluster of 1, 2 and 4 worker processes.

Each configuration runs in a fresh process (the driver), which prints its wall time (Ray's start-up apart), its
peak RSS and where it wrote the model; the parent compares every weight with the local repair's (largest gap
over the tensor's largest magnitude). The driver's memory is measured at two calibration sizes.

    PYTHONPATH=. python benchmarks/ray_scaling.py --out benchmarks/results/ray_scaling.json

On a 2-core machine the speed-up is bounded by the cores: 4 workers share 2 of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).resolve().parents[1] / "sample_models" / "resnet20_bn.onnx"


def child(engine: str, workers: int, samples: int, pattern: str, out: str) -> None:
    """One repair in this process; prints a JSON line."""
    import resource

    from asr_onnx.calib import load_calib
    from asr_onnx.model.engine import make_engine
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe

    model = load_model(MODEL)
    calib = load_calib("fashion-mnist:train", model).take(samples, 0)
    start = time.perf_counter()
    made = make_engine(engine, device="cpu", workers=workers or None, num_cpus=max(workers, 2) or None)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    job = Repair(model, device="cpu", progress=False, engine=made)
    job.prune(0.9 if pattern == "global" else 0.5, pattern).run(calib, recipe=Recipe(guard="fallback"))
    wall = time.perf_counter() - start
    job.save(out)
    report = job.report()
    made.close()
    print(json.dumps({"engine": engine, "workers": workers, "samples": samples, "pattern": pattern,
                      "startup_s": round(startup, 2), "repair_s": round(wall, 2),
                      "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "worker_samples": [w["samples"] for w in report["workers"]],
                      "timings_s": report["timings_s"], "engine_passes": report["engine_passes"],
                      "kept": report["settings"]["guard"]["kept"]}))


def run(engine: str, workers: int, samples: int, pattern: str, folder: Path) -> dict:
    out = folder / f"{engine}{workers}_{samples}_{pattern.replace(':', '-')}.onnx"
    done = subprocess.run([sys.executable, __file__, "--child", engine, str(workers), str(samples), pattern, str(out)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["output"] = str(out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("timings_s", "engine_passes")}), flush=True)
    return result


def max_gap(a: str, b: str) -> float:
    import onnx
    from onnx import numpy_helper

    worst = 0.0
    for x, y in zip(onnx.load(a).graph.initializer, onnx.load(b).graph.initializer):
        u, v = numpy_helper.to_array(x), numpy_helper.to_array(y)
        if u.dtype.kind == "f":
            worst = max(worst, float(np.abs(u - v).max() / max(np.abs(u).max(), 1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--large", type=int, default=8192, help="the calibration size of the memory check; 0: none")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        engine, workers, samples, pattern, out = args.child
        return child(engine, int(workers), int(samples), pattern, out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for pattern in ("global", "2:4"):
            local = run("local", 0, args.samples, pattern, folder)
            rows.append(local)
            counts = [int(w) for w in args.workers.split(",")] if pattern == "global" else [2]
            for workers in counts:
                row = run("ray", workers, args.samples, pattern, folder)
                row["max_gap_vs_local"] = max_gap(local["output"], row["output"])
                print(f"  max weight gap vs local: {row['max_gap_vs_local']:.3g}", flush=True)
                rows.append(row)
        if args.large:
            for engine, workers in (("ray", 2), ("local", 0)):
                rows.append(run(engine, workers, args.large, "global", folder))
    for row in rows:
        row.pop("output")
    result = {"machine": f"{os.cpu_count()} cores", "model": MODEL.name, "data": "fashion-mnist:train",
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
