"""Structured channel pruning on the sample models: top-1 on the Fashion-MNIST test set against measured
onnxruntime CPU latency (issue 16).

Every cell removes a fraction of each prunable group's channels (``--pattern channels --sparsity F``), or
keeps a fraction of the multiply-accumulates (``--flops-target T``, with ``--flops-targets``), chosen
by a score (magnitude: L1 of the filters; greedy: ThiNet on the calibration Gram matrices), then repairs
with none, bn (exact BN recalibration and the head correction) or ls+bn (least-squares refit of each layer,
then bn), with the guard off so that each cell shows its own method. Latency: the dense and the shrunk
model in onnxruntime (CPU, one intra-op thread), alternating run by run, median of each; the speed-up is
the ratio of the two medians from the same run.

    python benchmarks/channels_table.py --models resnet20_bn vgg_bn_bn
    python benchmarks/channels_table.py --markdown benchmarks/results/channels_table.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20_bn", "vgg_bn_bn", "resnet20", "vgg_bn", "resnet50s_bn", "resnet50s", "mobilenetv2_bn",
          "mobilenetv2")
REPAIRS = {"none": ("none", "none"), "bn": ("bn", "none"), "ls+bn": ("bn", "ls")}


def data_sets(proto, calib_size: int, seed: int):
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data

    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    calib = load_calib(resolve_data("fashion-mnist:train"), specs, preprocess).take(calib_size, seed)
    return calib, load_calib(resolve_data("fashion-mnist:test"), specs, preprocess)


def latency(dense, pruned, x, repeats: int, threads: int = 1) -> dict:
    """Median seconds per run of each model on ``x``, dense and pruned alternating, and their ratio."""
    import numpy as np

    from asr_onnx.runtime import make_session

    sessions = [make_session(m, "cpu", threads) for m in (dense, pruned)]
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[], []]
    for s in sessions:  # warm-up
        s.run(None, {name: x})
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, {name: x})
            times[i].append(time.perf_counter() - start)
    dense_s, pruned_s = (float(np.median(t)) for t in times)
    return {"dense_ms": round(dense_s * 1e3, 3), "pruned_ms": round(pruned_s * 1e3, 3),
            "speedup": round(dense_s / pruned_s, 3)}


def run_model(name: str, args) -> list[dict]:
    import onnx

    from asr_onnx import channels
    from asr_onnx.api import Repair
    from asr_onnx.evaluation import evaluate

    proto = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
    calib, test = data_sets(proto, args.calib_size, args.seed)
    dense_top1 = evaluate(proto, test, device="cpu", progress=False)["top1"]
    rows = []
    for score in args.scores:
        start = time.perf_counter()
        base = channels.plan(proto, sparsity=0.5, score=score, calib=calib)  # the orders; cells choose their own
        plan_s = time.perf_counter() - start
        cells = [(f, None) for f in args.fractions] + [(None, t) for t in args.flops_targets]
        for fraction, target in cells:
            speed = None
            for repair in args.repairs:
                method, reconstruct = REPAIRS[repair]
                start = time.perf_counter()
                job = Repair(proto, device="cpu", progress=False)
                job.prune_channels(fraction or 0.0, score=score, channel_plan=base, flops_target=target)
                job.run(calib, method, reconstruct=reconstruct, guard="off")
                seconds = time.perf_counter() - start
                result = evaluate(job.output, test, reference=proto, device="cpu", progress=False)
                if speed is None:
                    batches = {}
                    for batch in args.batches:
                        x = next(iter(next(iter(test.batches(batch))).values()))
                        batches[str(batch)] = latency(proto, job.output, x, args.repeats)
                    speed = batches
                entry = job.channel_report
                row = {"model": name, "score": score, "fraction": fraction, "flops_target": target, "repair": repair,
                       "top1": round(result["top1"], 4), "dense_top1": round(dense_top1, 4),
                       "agreement": round(result["agreement"], 4), "params": entry["params"], "macs": entry["macs"],
                       "latency": speed, "repair_s": round(seconds, 1), "plan_s": round(plan_s, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | channels removed | MACs kept | speed-up b1 / b32 | dense | score | none | bn | ls+bn |",
             "|---|---|---|---|---|---|---|---|---|"]
    cells: dict = {}
    for r in rows:
        key = (r["model"], r["fraction"], r.get("flops_target"), r["score"], r.get("note"))
        cells.setdefault(key, {})[r["repair"]] = r
    for (model, fraction, target, score, note), by in cells.items():
        first = next(iter(by.values()))
        lat = first["latency"]
        speed = " / ".join(f"{lat[b]['speedup']:.2f}x" for b in sorted(lat, key=int))
        top1 = [f"{by[k]['top1'] * 100:.1f}" if k in by else "-" for k in REPAIRS]
        removed = (f"{fraction:.0%}" if fraction is not None else f"FLOPs {target:g}") + (" (*)" if note else "")
        lines.append(f"| {model} | {removed} | {first['macs'][1] / first['macs'][0]:.2f} | {speed} | "
                     f"{first['dense_top1'] * 100:.1f} | {score} | " + " | ".join(top1) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--flops-targets", nargs="*", type=float, default=[],
                        help="Also cells with --flops-target T instead of a fraction of channels.")
    parser.add_argument("--scores", nargs="+", default=["magnitude", "greedy"])
    parser.add_argument("--repairs", nargs="+", default=list(REPAIRS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "channels_table.json"))
    parser.add_argument("--markdown", help="Print the Markdown table of a saved JSON file and exit.")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return
    rows = []
    for name in args.models:
        rows += run_model(name, args)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
