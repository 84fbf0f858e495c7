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

    from asr_onnx.model.session import make_session

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

    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.prune import channels
    from asr_onnx.verify.evaluation import evaluate

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
                job.prune(fraction or 0.0, "channels", score=score, channel_plan=base, flops_target=target)
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


def matched(rows: list[dict], peer_rows: list[dict]) -> str:
    """onnxsim's structured cells beside asr-onnx's best ls+bn cell of the same model that is at least as fast
    at both batch sizes (speed-ups from each tool's own alternating runs against the same dense model)."""
    lines = ["| model | onnxsim cell | onnxsim speed-up b1 / b32 | onnxsim best top-1 | asr-onnx cell at least as fast "
             "| its speed-up b1 / b32 | asr-onnx top-1 (ls+bn) |", "|---|---|---|---|---|---|---|"]
    cells: dict = {}
    for r in peer_rows:
        if r.get("tool") == "onnxsim" and r.get("kind") == "structured":
            best = cells.setdefault((r["model"], r["prune"], r["cell"]), r)
            cells[(r["model"], r["prune"], r["cell"])] = r if r["top1"] > best["top1"] else best
    for (model, prune, cell), peer in cells.items():
        speed = [peer["latency"][b]["speedup"] for b in ("1", "32")]
        faster = [r for r in rows if r["model"] == model and r["repair"] == "ls+bn"
                  and all(r["latency"][b]["speedup"] >= s for b, s in zip(("1", "32"), speed))]
        ours = max(faster, key=lambda r: r["top1"], default=None)
        name = "" if ours is None else (f"{ours['fraction']:.0%}" if ours["fraction"] is not None
                                        else f"FLOPs {ours['flops_target']:g}") + f", {ours['score']}"
        lines.append(f"| {model} | {prune} {cell:.0%} | {speed[0]:.2f}x / {speed[1]:.2f}x | {100 * peer['top1']:.1f} "
                     f"({peer['recovery']}) | " + ("none | – | –" if ours is None else
                     f"{name} | {ours['latency']['1']['speedup']:.2f}x / {ours['latency']['32']['speedup']:.2f}x | "
                     f"{100 * ours['top1']:.1f}") + " |")
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
    parser.add_argument("--peer", help="With --markdown: onnxsim's structured rows (peer_onnxsim.py's JSON) beside "
                                       "asr-onnx's at equal or higher measured speed.")
    args = parser.parse_args()
    if args.markdown:
        rows = json.loads(Path(args.markdown).read_text())["rows"]
        print(matched(rows, json.loads(Path(args.peer).read_text())["rows"]) if args.peer else markdown(rows))
        return
    rows = []
    for name in args.models:
        rows += run_model(name, args)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
