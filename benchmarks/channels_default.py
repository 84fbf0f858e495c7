"""The default amount of ``--pattern channels`` (issue 27), chosen on held-out Fashion-MNIST *training* images.

For each model (resnet20_bn and vgg_bn_bn from sample_models/) the training set is split once: 1,024 images
calibrate (``load_calib("fashion-mnist:train", model).take(1024, 0)``) and 2,000 others, disjoint from them,
score (the test set is never read). Each ``--sparsity`` of the grid is repaired as the CLI's default repair
does: the greedy (ThiNet) channel score, the least-squares refit, exact BN recalibration, the guard in fallback
mode, then the graph shrunk. Recorded per cell: held-out top-1 of the dense and of the repaired model, the
parameters and multiply-accumulates kept, and the measured speed-up of the shrunk model over dense at batch
32 in onnxruntime on the CPU (:func:`asr_onnx.verify.timing.bench`: alternating runs, one intra-op thread,
median over median). The machine's load average is recorded beside the timings (the host is shared, so only
the ratio of alternating runs is read, never a latency on its own).

The rule: the default is the largest sparsity of the grid at which, on both models, the held-out top-1 of the
repaired model is within 2 points of dense and the measured speed-up is at least 1.0.

    python benchmarks/channels_default.py            # writes benchmarks/results/channels_default.json
    python benchmarks/channels_default.py --markdown benchmarks/results/channels_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20_bn", "vgg_bn_bn")
GRID = (0.2, 0.25, 0.3, 0.4, 0.5)
CALIB, HELD_OUT = 1024, 2000
MAX_DROP_POINTS, MIN_SPEEDUP = 2.0, 1.0


def data_sets(proto, seed: int = 0):
    """(calibration set, held-out set): 1,024 training images and 2,000 others, disjoint."""
    from asr_onnx.calib import load_calib

    train = load_calib("fashion-mnist:train", proto)
    calib = train.take(CALIB, seed)
    _, rest = train.split(CALIB / len(train), seed)  # the same seeded permutation: its first CALIB are calib's
    held_out = rest.take(HELD_OUT, seed + 1)
    if len(held_out.within(calib)) or len(calib) != CALIB:
        raise SystemExit("the held-out images overlap the calibration images")
    return calib, held_out


def run_model(name: str, args) -> list[dict]:
    import onnx

    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe
    from asr_onnx.prune import channels
    from asr_onnx.verify.evaluation import score
    from asr_onnx.verify.timing import bench

    proto = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
    calib, held_out = data_sets(proto)
    start = time.perf_counter()
    base = channels.plan(proto, sparsity=0.5, score="greedy", calib=calib, device="cpu")  # the greedy order, once
    plan_s = time.perf_counter() - start
    rows = []
    for sparsity in args.grid:
        start = time.perf_counter()
        job = Repair(proto, device="cpu", progress=False)
        job.prune(sparsity, "channels", score="greedy", calib=calib, channel_plan=base)
        job.run(calib, recipe=Recipe(method="bn", reconstruct="ls", guard="fallback")).shrink()
        repair_s = time.perf_counter() - start
        scored = score(job.result, proto, held_out, device="cpu", progress=False)
        load_before = os.getloadavg()
        timed = bench(job.result, proto, batch_size=32, threads=args.threads, runs=args.runs, warmup=3)
        entry, models = job.channel_report, timed["models"]
        row = {"model": name, "sparsity": sparsity, "dense_top1": scored["dense_top1"], "top1": scored["top1"],
               "agreement": scored["agreement"], "guard": job.settings.get("guard", {}).get("verdict"),
               "params": entry["params"], "macs": entry["macs"],
               "params_kept": entry["params"][1] / entry["params"][0], "macs_kept": entry["macs"][1] / entry["macs"][0],
               "speedup_b32": timed["speedup"], "dense_ms": models["reference"]["latency_ms"]["median"],
               "output_ms": models["model"]["latency_ms"]["median"], "runs": args.runs, "threads": args.threads,
               "load_avg": [round(v, 2) for v in (*load_before, *os.getloadavg())], "repair_s": round(repair_s, 1),
               "plan_s": round(plan_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def chosen(rows: list[dict]) -> float | None:
    """The largest sparsity that passes on every model: top-1 within 2 points of dense, speed-up >= 1.0."""
    models = {r["model"] for r in rows}
    passing = [s for s in sorted({r["sparsity"] for r in rows})
               if all(any(r["model"] == m and r["sparsity"] == s and passes(r) for r in rows) for m in models)]
    return max(passing, default=None)


def passes(row: dict) -> bool:
    return 100 * (row["dense_top1"] - row["top1"]) <= MAX_DROP_POINTS and row["speedup_b32"] >= MIN_SPEEDUP


def markdown(rows: list[dict]) -> str:
    lines = ["| model | --sparsity | dense top-1 | repaired top-1 | drop (pts) | params kept | MACs kept | "
             "speed-up b32 | passes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sparsity']:g} | {100 * r['dense_top1']:.2f} | {100 * r['top1']:.2f} | "
                     f"{100 * (r['dense_top1'] - r['top1']):.2f} | {r['params_kept']:.2f} | {r['macs_kept']:.2f} | "
                     f"{r['speedup_b32']:.2f}x | {'yes' if passes(r) else 'no'} |")
    pick = chosen(rows)
    lines.append(f"\nchosen default: --sparsity {pick:g}" if pick is not None else "\nno sparsity of the grid passes")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    parser.add_argument("--runs", type=int, default=30, help="Alternating timed runs per model (batch 32).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "channels_default.json"))
    parser.add_argument("--markdown", help="Print the Markdown table of a saved JSON file and exit.")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return
    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args)
        settings = {**vars(args), "calib": CALIB, "held_out": HELD_OUT, "cpu_count": os.cpu_count(),
                    "rule": f"largest sparsity with top-1 within {MAX_DROP_POINTS:g} points of dense and speed-up "
                            f">= {MIN_SPEEDUP:g} on every model"}
        Path(args.output).write_text(json.dumps({"settings": settings, "rows": rows, "chosen": chosen(rows)},
                                                indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
