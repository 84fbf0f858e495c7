"""The guard's fold refits from the repair's own passes, against refitting each fit half from scratch (issue 27).

With the refit on, the guard scores the repair and pruning alone on held-out halves of the calibration set,
each time with the repair refitted on the other half. It used to run two more refits for that (one per fit
half, each sequential from the model as pruned). Now the repair's own passes keep each half's Gram sums, and
each fold's layers are solved from the other half's sums: no pass more. The difference: a layer's input in
those passes comes from the network refitted on both halves, so the upstream layers of a fold's model have
seen its held-out half. This script runs both on the same repair and prints both verdicts, both held-out
scores and both costs, so that the difference is measured, not assumed.

    python benchmarks/guard_shared.py resnet20_bn=sample_models/resnet20_bn.onnx --json out.json
    python benchmarks/guard_shared.py cls=.../ch_ppocr_mobile_v2.0_cls_infer.onnx@64 --json out.json

NAME=PATH is a Fashion-MNIST model (calibration: ``--calib-size`` training images); KIND=PATH[@CALIB] a real graph
of benchmarks/real_graphs.py (its synthetic calibration images). Cells: ``--cells`` (pattern:sparsity).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # real_graphs, beside this file


def calibration(label: str, path: str, count: str, calib_size: int, folder: Path):
    """The calibration set of a model: real-graph kinds get their synthetic images, the rest Fashion-MNIST."""
    from real_graphs import KINDS, images

    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.model.files import load_model

    kind = label.partition(".")[0]
    model = load_model(path)
    if kind not in KINDS:
        return load_calib("fashion-mnist:train", model).take(calib_size, 0)
    array = folder / f"{label}_calib.npy"
    np.save(array, images(kind, int(count) if count else KINDS[kind][4], 1))
    return load_calib(array, input_specs(model))


def entry(guard: dict) -> dict:
    def held(scores: dict) -> dict:
        return {k: (None if scores.get(k) is None else round(scores[k], 4))
                for k in ("agreement", "logit_rel_l2", "detection_f1", "standardised_error")}

    return {"verdict": guard["verdict"], "repair_loses": guard["repair_loses"], "cost_s": guard["cost_s"],
            "repair": held(guard["repair"]), "pruned": held(guard["pruned"]),
            "shared": guard.get("refit_in_repair_passes", False)}


def run_cell(path: str, calib, pattern: str, sparsity: float) -> dict:
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe

    job = Repair(path, device="cpu", progress=False)
    job.prune(sparsity, pattern, allocation="lamp" if pattern == "global" else "global")
    start = time.perf_counter()
    job.run(calib, recipe=Recipe(method="bn", reconstruct="ls", guard="warn"))
    repair_s = time.perf_counter() - start
    shared = entry(job.settings["guard"])
    job.held_out_refits = None  # the guard refits each fit half from the model as pruned, as before
    halves = entry(job.guard(calib, "warn").settings["guard"])
    return {"repair_s": round(repair_s, 2), "refit_s": round(job.timings.get("reconstruct", 0.0), 2),
            "shared": shared, "halves": halves,
            "same_choice": shared["repair_loses"] == halves["repair_loses"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH or KIND=PATH[@CALIB]")
    parser.add_argument("--cells", default="global:0.9,global:0.5,2:4:0", help="pattern:sparsity, comma-separated")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--json", default="guard_shared.json")
    args = parser.parse_args()
    from real_graphs import parse_cells, parse_spec

    cells = parse_cells(args.cells)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            label, path, count = parse_spec(spec)
            calib = calibration(label, path, count, args.calib_size, Path(tmp))
            for pattern, sparsity in cells:
                row = {"model": label, "cell": pattern if pattern != "global" else f"{sparsity:g}",
                       "calib": len(calib), **run_cell(path, calib, pattern, sparsity)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | cell | refit s | shared: verdict, repair / pruned held-out agreement, err | cost s | "
          "halves: verdict, repair / pruned | cost s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(e):
            agree = "" if e["repair"]["agreement"] is None else \
                f"{e['repair']['agreement']:.4f} / {e['pruned']['agreement']:.4f}, "
            return f"{e['verdict']}, {agree}{e['repair']['logit_rel_l2']:.4f} / {e['pruned']['logit_rel_l2']:.4f}"
        print(f"| {r['model']} | {r['cell']} | {r['refit_s']} | {cell(r['shared'])} | {r['shared']['cost_s']:.1f} | "
              f"{cell(r['halves'])} | {r['halves']['cost_s']:.1f} |")
    print(f"same choice in {sum(r['same_choice'] for r in rows)} of {len(rows)} cells; wrote {args.json}")


if __name__ == "__main__":
    main()
