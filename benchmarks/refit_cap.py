"""The refit on all of a large calibration set against a cap (issue 27): held-out top-1 and cost.

For each model, 4,096 training images calibrate and 2,000 other training images score (the test set is never
read). The default repair (LAMP, refit, BN, guard) runs twice: refitting on all 4,096, and on 1,024 of them
drawn across the guard's halves (``--refit-samples 1024``; the recalibration still uses all 4,096).

    python benchmarks/refit_cap.py resnet50s_bn resnet20_bn    # writes benchmarks/results/refit_cap_4096.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIB, HELD_OUT, CAP = 4096, 2000, 1024


def main() -> None:
    import onnx

    from asr_onnx.calib import load_calib
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe
    from asr_onnx.verify.evaluation import score

    rows = []
    for name in sys.argv[1:]:
        proto = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
        train = load_calib("fashion-mnist:train", proto)
        calib = train.take(CALIB, 0)
        _, rest = train.split(CALIB / len(train), 0)  # the same permutation: its first CALIB are calib's
        held_out = rest.take(HELD_OUT, 1)
        if len(held_out.within(calib)):
            raise SystemExit("the held-out images overlap the calibration images")
        for samples in (0, CAP):
            start, cpu = time.perf_counter(), time.process_time()
            job = Repair(proto, device="cpu", progress=False).prune(0.9, allocation="lamp")
            job.run(calib, recipe=Recipe(method="bn", reconstruct="ls", refit_samples=samples, guard="fallback"))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            scored = score(job.result, proto, held_out, device="cpu", progress=False)
            row = {"model": name, "calib": CALIB, "refit_samples": samples or CALIB, "top1": scored["top1"],
                   "dense_top1": scored["dense_top1"], "agreement": scored["agreement"], "wall_s": round(wall, 1),
                   "cpu_s": round(cpu, 1), "guard": job.settings.get("guard", {}).get("verdict")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (ROOT / "benchmarks" / "results" / "refit_cap_4096.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
