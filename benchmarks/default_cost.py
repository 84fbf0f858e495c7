"""`asr-onnx repair`'s default, as a user runs it: its accuracy and its cost against one plain pass (issue 27).

For each model, in fresh processes and in this order (each figure a median over ``--runs``):

* start-up: a process that imports the CLI and onnxruntime and opens one session on the model, CPU seconds;
* plain: one onnxruntime pass of the dense model over the calibration arrays (read once, before the clock),
  batch 64, the CPU provider, CPU and wall seconds of the pass alone, and the process's peak RSS;
* repair: ``asr-onnx repair MODEL --calib fashion-mnist:train --calib-size N --sparsity S [--eval
  fashion-mnist:test] --report R.json -q -o OUT`` with nothing else: the whole process's CPU seconds (children
  included), wall seconds, peak RSS, the stage split from the report, and, with --eval, top-1 and agreement.

Ratios are repair / plain from the same run. ``--eval`` adds the evaluation to the repair's cost; leave it out
for the cost table.

    python benchmarks/default_cost.py sample_models/resnet50s_bn.onnx --calib-size 4096 --json out.json
    python benchmarks/default_cost.py sample_models/resnet20_bn.onnx --eval --json out.json
    python benchmarks/default_cost.py sample_models/resnet50s_bn.onnx --args "--reconstruct none" --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = """
import json, resource, sys, time
import onnxruntime as ort
from asr_onnx.calib import load_calib
from asr_onnx.model.files import load_model
path, size, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calib = load_calib(source, load_model(path)).take(size, 0)
batches = list(calib.batches(64))
options = ort.SessionOptions()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
cpu, wall = time.process_time(), time.perf_counter()
for feed in batches:
    session.run(None, feed)
print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

STARTUP = """
import sys
import onnxruntime as ort
import asr_onnx.cli.main
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
"""


def child(args: list[str]) -> tuple[float, float, float, str]:
    """(CPU seconds, wall seconds, peak RSS MB, stdout) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, after.ru_maxrss / 1024, done.stdout


def run_model(path: str, size: int, sparsity: float, runs: int, with_eval: bool, folder: Path,
              extra: list[str], source: str = "fashion-mnist:train") -> dict:
    startup, plain, repair = [], [], []
    report: dict = {}
    for _ in range(runs):
        startup.append(child([sys.executable, "-c", STARTUP, path])[0])
        plain.append(json.loads(child([sys.executable, "-c", PLAIN, path, str(size), source])[3]))
        out, report_path = folder / "out.onnx", folder / "report.json"
        args = ["asr-onnx", "repair", path, "--calib", source, "--calib-size", str(size), "--seed", "0",
                "--sparsity", str(sparsity), "--report", str(report_path), "-q", "-o", str(out), "--overwrite",
                *extra]
        cpu, wall, peak, _ = child(args + (["--eval", "fashion-mnist:test"] if with_eval else []))
        report = json.loads(report_path.read_text())
        repair.append({"cpu_s": cpu, "wall_s": wall, "peak_mb": peak})
    med = statistics.median
    plain_cpu, repair_cpu = med(p["cpu_s"] for p in plain), med(r["cpu_s"] for r in repair)
    settings, evaluation = report["settings"], report.get("eval") or {}
    row = {"model": Path(path).stem, "calib": size, "sparsity": sparsity, "args": extra, "runs": runs, "eval": with_eval,
           "startup_cpu_s": round(med(startup), 2), "plain_cpu_s": round(plain_cpu, 3),
           "plain_wall_s": round(med(p["wall_s"] for p in plain), 3),
           "plain_peak_mb": round(med(p["peak_mb"] for p in plain)), "repair_cpu_s": round(repair_cpu, 2),
           "repair_wall_s": round(med(r["wall_s"] for r in repair), 2),
           "repair_peak_mb": round(med(r["peak_mb"] for r in repair)),
           "cpu_ratio": round(repair_cpu / plain_cpu, 1),
           "cpu_ratio_less_startup": round((repair_cpu - med(startup)) / plain_cpu, 1),
           "peak_ratio": round(med(r["peak_mb"] for r in repair) / med(p["peak_mb"] for p in plain), 2),
           "stages_wall_s": {k: round(v, 2) for k, v in report["timings_s"].items()},
           "allocation": settings.get("allocation"), "reconstruct": settings.get("reconstruct"),
           "method": settings.get("method"), "guard_kept": (settings.get("guard") or {}).get("kept"),
           "verdict": (report.get("verdict") or {}).get("label")}
    if with_eval:
        row.update(top1=evaluation.get("top1"), dense_top1=evaluation.get("dense_top1"),
                   agreement=evaluation.get("agreement"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--calib", default="fashion-mnist:train", help="the calibration data, as repair's --calib")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--eval", action="store_true", help="score on the full Fashion-MNIST test set")
    parser.add_argument("--json", default="default_cost.json")
    parser.add_argument("--args", default="", help="more repair options, e.g. '--method none' (one string)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            rows.append(run_model(path, args.calib_size, args.sparsity, args.runs, args.eval, Path(tmp),
                                  args.args.split(), args.calib))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | calib | top-1 (dense) | guard kept | plain CPU s | repair CPU s | ratio | less start-up | "
          "peak RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        top1 = f"{100 * r['top1']:.1f} ({100 * r['dense_top1']:.1f})" if r.get("top1") is not None else "-"
        print(f"| {r['model']} | {r['calib']} | {top1} | {r['guard_kept']} | {r['plain_cpu_s']} | {r['repair_cpu_s']} | "
              f"{r['cpu_ratio']}x | {r['cpu_ratio_less_startup']}x | {r['peak_ratio']}x |")


if __name__ == "__main__":
    main()
