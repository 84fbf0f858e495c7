"""Issue 28's allocation from measured errors (``--allocation error``) against LAMP, under the default repair.

Every cell prunes a sample model with one allocation, chooses the masks by OBS in the least-squares refit,
recalibrates BN exactly with the head correction (the CLI's default without the guard), on 1,024 training
images. Each repair is scored twice: on 2,000 training images disjoint from the calibration images (held out:
the only figures a choice is made on) and on the full test set (for the record). One repair serves both, so
the two files hold the same models.

    python benchmarks/alloc_error.py --models resnet50s_bn,mobilenetv2_bn,resnet20_bn --cells 0.9,0.95
    python benchmarks/alloc_error.py --markdown        # the table of both files; runs nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reconstruct_table import data_sets  # noqa: E402

RESULTS = HERE / "results"
FILES = {"heldout": RESULTS / "alloc_error_heldout.json", "test": RESULTS / "alloc_error_test.json"}


def run_cell(proto, calib, evals: dict, cell: str, allocation: str, threads: int) -> dict:
    """One repair; {eval name: row}."""
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    start = time.perf_counter()
    cpu = time.process_time()
    job = Repair(proto, device="cpu", batch_size=64, progress=False, threads=threads)
    job.prune(float(cell), "global", allocation=allocation, score="obs", calib=calib)
    prune_s, prune_cpu = time.perf_counter() - start, time.process_time() - cpu
    job.run(calib, "bn", reconstruct="ls")
    seconds = time.perf_counter() - start
    per_layer = [round(layer.sparsity, 4) for layer in job.layers if layer.pruned]
    rows = {}
    for name, (data, dense) in evals.items():
        result = evaluate(job.output, data, reference=proto, device="cpu", progress=False)
        rows[name] = {"cell": cell, "allocation": allocation, "reconstruct": "ls", "score": "obs", "eval": name,
                      "samples": len(data), "dense": dense, "top1": result.get("top1"),
                      "agreement": result["agreement"], "seconds": round(seconds, 1),
                      "prune_seconds": round(prune_s, 1), "prune_cpu_seconds": round(prune_cpu, 1),
                      "timings": {k: round(v, 2) for k, v in job.timings.items()}, "per_layer": per_layer}
    return rows


def markdown() -> str:
    """Top-1 (%) per model and cell: LAMP and error (and error with the six coarse levels it started with,
    results/alloc_error_coarse_*.json), held out and test."""
    tables = {name: json.loads(path.read_text())["rows"] for name, path in FILES.items() if path.exists()}
    for name in FILES:
        coarse = RESULTS / f"alloc_error_coarse_{name}.json"
        if coarse.exists():
            tables[name] = tables.get(name, []) + [dict(r, allocation="coarse")
                                                   for r in json.loads(coarse.read_text())["rows"]]
    lines = ["| model | dense (test) | cell | held-out LAMP | held-out error | held-out error, coarse levels | "
             "test LAMP | test error | test error, coarse levels | error / dense (test) | allocation s (CPU s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["model"], r["cell"]) for rows in tables.values() for r in rows))
    for model, cell in keys:
        got = {(name, r["allocation"]): r for name, rows in tables.items() for r in rows
               if (r["model"], r["cell"]) == (model, cell)}
        test = got.get(("test", "error"))
        dense = 100 * test["dense"] if test else float("nan")
        share = f"{100 * test['top1'] / test['dense']:.1f}%" if test else "–"
        cost = f"{test['prune_seconds']:.0f} ({test['prune_cpu_seconds']:.0f})" if test else "–"
        tops = " | ".join(_top(got, name, allocation) for name in ("heldout", "test")
                          for allocation in ("lamp", "error", "coarse"))
        lines.append(f"| {model} | {dense:.2f} | {cell} | {tops} | {share} | {cost} |")
    return "\n".join(lines)


def _top(got: dict, name: str, allocation: str) -> str:
    row = got.get((name, allocation))
    return "–" if row is None else f"{100 * row['top1']:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50s_bn,mobilenetv2_bn,resnet20_bn")
    parser.add_argument("--cells", default="0.9,0.95")
    parser.add_argument("--allocations", default="lamp,error")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print the table of both files; run nothing")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.markdown:
        print(markdown())
        return 0
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    for model in args.models.split(","):
        proto = load_model(HERE.parent / "sample_models" / f"{model}.onnx")
        calib, held = data_sets(proto, argparse.Namespace(calib_size=1024, seed=0, eval="heldout", eval_size=2000))
        _, test = data_sets(proto, argparse.Namespace(calib_size=1024, seed=0, eval="test", eval_size=0))
        evals = {name: (data, evaluate(proto, data, device="cpu", progress=False)["top1"])
                 for name, data in (("heldout", held), ("test", test))}
        for cell in args.cells.split(","):
            for allocation in args.allocations.split(","):
                rows = run_cell(proto, calib, evals, cell, allocation, args.threads)
                for name, row in rows.items():
                    path = FILES[name]
                    kept = json.loads(path.read_text())["rows"] if path.exists() else []
                    kept = [r for r in kept if (r["model"], r["cell"], r["allocation"]) != (model, cell, allocation)]
                    path.parent.mkdir(exist_ok=True)
                    path.write_text(json.dumps({"rows": kept + [dict(model=model, **row)]}, indent=1) + "\n")
                print(f"{model} {cell} {allocation}: held-out {rows['heldout']['top1']:.4f} test "
                      f"{rows['test']['top1']:.4f} ({rows['test']['seconds']} s, prune "
                      f"{rows['test']['prune_seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
