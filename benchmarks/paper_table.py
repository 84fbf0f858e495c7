"""The paper's comparison on the sample models, produced by the tool itself.

Runs `asr_onnx.pipeline.sweep.run_sweep` for every sample model and export flavour over
{global 0.8, 0.9, 0.95, 2:4} x {none, bn, lw, naive, asr, auto} x {exact/recal, momentum/pre-bn},
and writes benchmarks/results/<model>.json plus a Markdown table (benchmarks/paper_table.md).

    python benchmarks/paper_table.py                       # full Fashion-MNIST test set
    python benchmarks/paper_table.py --eval-size 2000 --jobs 2

Calibration uses training images only (the bundled 512, or --calib-size from the IDX training file);
evaluation uses test images only, and nothing is tuned on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20", "resnet50s", "vgg_bn", "mobilenetv2")
# the tool's default (exact, gain as the variance part of recalibration, head corrected), and the paper's
# likely pipeline (gain on the conv, then PyTorch's momentum BN recalibration; the head left alone)
REGIMES = (("exact", "recal", True), ("momentum", "pre-bn", False))


def run_one(name: str, args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.sweep import Grid, run_sweep

    path = ROOT / "sample_models" / f"{name}.onnx"
    proto = load_model(path)
    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    calib = load_calib(resolve_data(args.calib), specs, preprocess).take(args.calib_size, args.seed)
    eval_data = load_calib(resolve_data(args.eval), specs, preprocess)
    if args.eval_size:
        eval_data = eval_data.take(args.eval_size, args.seed)
    grid = Grid(sparsities=(0.8, 0.9, 0.95), patterns=("global", "2:4"), methods=tuple(args.methods.split(",")),
                regimes=REGIMES)
    start = time.perf_counter()
    def show(row):
        print(f"{name} {row['pattern']} {row['sparsity']} {row['recal']}/{row['placement']} {row['method']}: "
              f"top-1 {row.get('top1')} agreement {row['agreement']:.4f}", flush=True)

    result = run_sweep(proto, calib, eval_data, grid, name=name, batch_size=64, device="cpu", progress=False,
                       watch=False, on_row=show)
    out = result.to_json()
    out["dense"].update(calib=len(calib), eval=len(eval_data), seconds=round(time.perf_counter() - start, 1))
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    if args.append and path.exists():  # more methods for the same cells: keep the earlier rows
        earlier = json.loads(path.read_text())
        new = {(r["pattern"], r["sparsity"], r["method"], r["recal"], r["placement"]) for r in out["rows"]}
        out["rows"] = [r for r in earlier["rows"] if (r["pattern"], r["sparsity"], r["method"], r["recal"],
                                                      r["placement"]) not in new] + out["rows"]
        out["dense"]["seconds"] = round(earlier["dense"]["seconds"] + out["dense"]["seconds"], 1)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{name}: done in {out['dense']['seconds']} s", flush=True)
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(f"{m}{s}" for m in MODELS for s in ("_bn", "")))
    parser.add_argument("--methods", default="none,reflow,bn,lw,naive,asr,auto")
    parser.add_argument("--append", action="store_true", help="merge these methods' rows into saved results")
    parser.add_argument("--calib", default="fashion-mnist:train")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--eval", default="fashion-mnist:test")
    parser.add_argument("--eval-size", type=int, default=0, help="0 = the whole evaluation set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="models evaluated in parallel processes")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    names = args.models.split(",")
    with ProcessPoolExecutor(args.jobs) as pool:
        list(pool.map(run_one, names, [args] * len(names)))
    command = "python benchmarks/paper_table.py " + " ".join(sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    from asr_onnx.pipeline.sweep import SweepResult, markdown

    saved = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))}
    order = [f"{m}{s}" for m in MODELS for s in ("_bn", "")]
    tables = [f"{markdown(SweepResult(r['dense'], r['rows']))}\n\n(calibration {r['dense']['calib']} training images, "
              f"evaluation {r['dense']['eval']} test images, {r['dense']['seconds']} s)"
              for name in order if (r := saved.get(name))]
    header = (f"Last produced by `{command}` at commit {commit.strip()} on {machine()}.\n"
              f"Cells: top-1 % on the evaluation set (top-1 agreement with the dense model, %).\n")
    (ROOT / "benchmarks" / "paper_table.md").write_text(header + "\n" + "\n\n".join(tables) + "\n")
    print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
