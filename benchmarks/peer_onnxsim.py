"""The peer rows: onnxsim 0.8.1's own pruning and recovery on the sample models, beside asr-onnx's.

onnxsim is a benchmark-only requirement (``pip install onnxsim==0.8.1``), never a dependency of asr-onnx.
How a user prunes and recovers a CNN with it, from its code (onnxsim/pruning.py, bn_recovery.py,
bias_correction.py, onnx_simplifier.py):

* unstructured: ``prune_magnitude_cpp(model, sparsity, global_sparsity=True)`` (Han et al.),
  ``apply_wanda_pruning_cpp(model, calib, sparsity, global_sparsity=True)`` and
  ``apply_sparsegpt_pruning_cpp(model, calib, sparsity)`` (per layer: it has no global mode);
* structured: ``apply_structured_pruning_cpp(model, sparsity)`` (L2 of the filters) and
  ``apply_structured_wanda_pruning_cpp(model, calib, sparsity)`` (calibrated), both removing whole
  output channels;
* recovery: ``bn_recovery.recover_batch_norm(pruned, calib, target_model=dense)`` inserts a
  BatchNormalization after every Conv that has none and sets it so each channel's mean and variance on
  the calibration set match the dense model's (all sites measured at once in the pruned network); a
  Conv already followed by a BatchNormalization is skipped, so a BN-kept model is first folded by
  ``onnxsim.simplify`` (dense and pruned alike); ``bias_correction.correct_bias(dense, pruned, calib)``
  corrects each layer's per-channel output mean.

Every cell uses the same calibration set as asr-onnx's tables (1,024 seeded ``fashion-mnist:train``
images, batches of 64) and the full test set, and asr-onnx's own evaluation (top-1, agreement with the
dense model). The asr-onnx cells run the library's default repair on the same models in the same
process. Structured cells also time the dense and the pruned model with ``asr_onnx.bench``.

With ``--methods asr-channels`` a structured run prunes with asr-onnx instead (``--pattern channels``,
L1 score, default repair). ``markdown`` prints the tables of benchmarks/RESULTS.md from the JSON.

    python benchmarks/peer_onnxsim.py unstructured --models resnet20_bn --cells 0.9
    python benchmarks/peer_onnxsim.py structured --models resnet20 --cells 0.25,0.5,0.75
    python benchmarks/peer_onnxsim.py structured --models resnet20_bn --cells 0.25,0.5 --methods asr-channels
    python benchmarks/peer_onnxsim.py markdown
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20_bn", "resnet20", "resnet50s_bn", "resnet50s", "vgg_bn_bn", "vgg_bn", "mobilenetv2_bn",
          "mobilenetv2")
OUT = ROOT / "benchmarks" / "results" / "peer_onnxsim.json"


def data_sets(proto, calib_size: int, seed: int):
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data

    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    calib = load_calib(resolve_data("fashion-mnist:train"), specs, preprocess).take(calib_size, seed)
    test = load_calib(resolve_data("fashion-mnist:test"), specs, preprocess)
    return calib, test


def score(model, dense, test) -> dict:
    from asr_onnx.verify.evaluation import evaluate

    result = evaluate(model, test, reference=dense, device="cpu", progress=False)
    return {"top1": result.get("top1"), "agreement": result["agreement"], "logit_rel_l2": result["logit_rel_l2"]}


def params_of(model) -> int:
    import numpy as np

    return int(sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type == 1))


def onnxsim_prune(dense, method: str, sparsity: float, batches):
    from onnxsim import onnx_simplifier as osx

    if method == "magnitude":
        return osx.prune_magnitude_cpp(dense, sparsity=sparsity, global_sparsity=True)
    if method == "wanda":
        return osx.apply_wanda_pruning_cpp(dense, calibration_data=batches, sparsity=sparsity, global_sparsity=True)
    if method == "sparsegpt":
        return osx.apply_sparsegpt_pruning_cpp(dense, calibration_data=batches, sparsity=sparsity)
    if method == "structured":
        return osx.apply_structured_pruning_cpp(dense, sparsity=sparsity)
    if method == "structured-wanda":
        return osx.apply_structured_wanda_pruning_cpp(dense, calibration_data=batches, sparsity=sparsity)
    raise ValueError(method)


def onnxsim_recover(dense, pruned, recovery: str, batches):
    """onnxsim's recoveries; a BN-kept model is folded by onnxsim.simplify first for ``bn``."""
    import onnxsim
    from onnxsim.bias_correction import correct_bias
    from onnxsim.bn_recovery import recover_batch_norm

    if recovery == "none":
        return pruned
    if recovery == "bias":
        return correct_bias(dense, pruned, calibration_data=batches)
    if recovery == "bn":
        if any(n.op_type == "BatchNormalization" for n in dense.graph.node):
            dense, _ = onnxsim.simplify(dense)
            pruned, _ = onnxsim.simplify(pruned)
        return recover_batch_norm(pruned, calibration_data=batches, target_model=dense)
    raise ValueError(recovery)


def asr_repair(dense, calib, sparsity: float, threads: int):
    from asr_onnx.pipeline.driver import Repair

    job = Repair(dense, device="cpu", batch_size=64, progress=False, threads=threads)
    return job.prune(sparsity, "global").run(calib, "bn").output


def asr_channels(dense, calib, fraction: float, threads: int):
    """asr-onnx's structured pruning: L1 of the filters, then the default repair, then the shrink."""
    from asr_onnx.pipeline.driver import Repair

    job = Repair(dense, device="cpu", batch_size=64, progress=False, threads=threads)
    return job.prune(fraction, "channels", score="magnitude").run(calib, "bn").output


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - start, 2)


def unstructured(name, dense, calib, test, args, rows):
    batches = list(calib.batches(64))
    for cell in args.cells:
        for method in args.methods:
            try:
                pruned, prune_s = timed(onnxsim_prune, dense, method, cell, batches)
            except Exception as e:  # noqa: BLE001 - a peer's refusal is a result
                rows.append({"model": name, "tool": "onnxsim", "cell": cell, "prune": method,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            for recovery in args.recoveries:
                row = {"model": name, "tool": "onnxsim", "kind": "unstructured", "cell": cell, "prune": method,
                       "recovery": recovery, "prune_s": prune_s}
                try:
                    model, row["recover_s"] = timed(onnxsim_recover, dense, pruned, recovery, batches)
                    row.update(score(model, dense, test))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.asr:
            row = {"model": name, "tool": "asr-onnx", "kind": "unstructured", "cell": cell, "prune": "magnitude",
                   "recovery": "bn (default)"}
            model, row["recover_s"] = timed(asr_repair, dense, calib, cell, args.threads)
            row.update(score(model, dense, test))
            print(json.dumps(row), flush=True)
            rows.append(row)


def structured(name, dense, calib, test, args, rows):
    from asr_onnx.verify.timing import bench

    batches = list(calib.batches(64))
    for cell in args.cells:
        for method in args.methods:
            tool = "asr-onnx" if method == "asr-channels" else "onnxsim"
            base = {"model": name, "tool": tool, "kind": "structured", "cell": cell, "prune": method}
            try:
                if tool == "asr-onnx":  # pruned and repaired in one go: its "recovery" is the default bn
                    pruned, prune_s = timed(asr_channels, dense, calib, cell, args.threads)
                else:
                    pruned, prune_s = timed(onnxsim_prune, dense, method, cell, batches)
            except Exception as e:  # noqa: BLE001
                rows.append({**base, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            speed = {bs: bench(pruned, dense, batch_size=bs, threads=args.threads, runs=args.runs, warmup=5)
                     for bs in args.bench_batches}
            timing = {str(bs): {"dense_ms": r["models"]["reference"]["latency_ms"]["median"],
                                "pruned_ms": r["models"]["model"]["latency_ms"]["median"],
                                "pruned_iqr_ms": r["models"]["model"]["latency_ms"]["iqr"],
                                "speedup": r["speedup"]} for bs, r in speed.items()}
            for recovery in (["bn"] if tool == "asr-onnx" else args.recoveries):
                row = {**base, "recovery": recovery, "prune_s": prune_s, "params": [params_of(dense), params_of(pruned)],
                       "latency": timing}
                try:
                    model, row["recover_s"] = ((pruned, 0.0) if tool == "asr-onnx" else
                                               timed(onnxsim_recover, dense, pruned, recovery, batches))
                    row.update(score(model, dense, test))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)


def pct(row) -> str:
    if row is None:
        return "–"
    if "error" in row:
        return "error"
    return f"{100 * row['top1']:.1f}"


def best(rows, name, cell, method):
    """onnxsim's best recovery after ``method`` in a cell (picked on the test set: generous to the peer)."""
    found = [r for r in rows if r.get("prune") == method and r.get("tool") == "onnxsim" and r["model"] == name
             and r.get("cell") == cell and "top1" in r]
    return max(found, key=lambda r: r["top1"]) if found else None


def markdown(rows) -> str:
    """The two tables of RESULTS.md from the JSON rows: top-1 % on the full test set."""
    def find(**keys):
        return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)

    dense = {r["model"]: r for r in rows if r["tool"] == "dense"}
    lines = ["| model | dense | sparsity | onnxsim magnitude | + bn_recovery | + correct_bias | onnxsim Wanda "
             "(best recovery) | onnxsim SparseGPT (best recovery) | asr-onnx default (`bn`) |", "|---" * 9 + "|"]
    cells = sorted({(r["model"], r["cell"]) for r in rows if r.get("kind") == "unstructured"},
                   key=lambda mc: (MODELS.index(mc[0]), mc[1]))
    for name, cell in cells:
        base = {"model": name, "cell": cell, "kind": "unstructured"}

        extra = [best(rows, name, cell, m) for m in ("wanda", "sparsegpt")]
        lines.append(f"| {name} | {pct(dense[name])} | {cell} | "
                     f"{pct(find(**base, tool='onnxsim', prune='magnitude', recovery='none'))} | "
                     f"{pct(find(**base, tool='onnxsim', prune='magnitude', recovery='bn'))} | "
                     f"{pct(find(**base, tool='onnxsim', prune='magnitude', recovery='bias'))} | "
                     + " | ".join(f"{pct(r)} ({r['recovery']})" if r else "–" for r in extra)
                     + f" | {pct(find(**base, tool='asr-onnx'))} |")
    lines += ["", "| model | tool, selection | channels removed | params kept | CPU latency batch 1 (ms): dense → "
              "pruned | speed-up b1 / b32 | top-1, no recovery | + correct_bias | + bn_recovery | asr-onnx (`bn`) |",
              "|---" * 10 + "|"]
    cells = sorted({(r["model"], r["prune"], r["cell"]) for r in rows if r.get("kind") == "structured"},
                   key=lambda c: (MODELS.index(c[0]), c[1], c[2]))
    for name, prune, cell in cells:
        base = {"model": name, "cell": cell, "kind": "structured", "prune": prune}
        first = find(**base)
        if first is None or "latency" not in first:
            continue
        b1, b32 = first["latency"]["1"], first["latency"].get("32", {})
        tool = "asr-onnx, L1" if prune == "asr-channels" else f"onnxsim, {'L2' if prune == 'structured' else 'Wanda'}"
        ours = prune == "asr-channels"
        lines.append(f"| {name} | {tool} | {cell:.0%} | {first['params'][1] / first['params'][0]:.2f} | "
                     f"{b1['dense_ms']:.2f} → {b1['pruned_ms']:.2f} | {b1['speedup']:.2f} / "
                     f"{b32.get('speedup', float('nan')):.2f} | "
                     + ("– | – | – | " + pct(first) if ours else
                        " | ".join(pct(find(**base, recovery=r)) for r in ("none", "bias", "bn")) + " | –") + " |")
    return "\n".join(lines)


class Rows:
    """The result rows, saved to the JSON file each time one is added."""

    def __init__(self, rows: list, save):
        self.rows, self.save = rows, save

    def append(self, row) -> None:
        self.rows.append(row)
        self.save()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["unstructured", "structured", "markdown"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cells", default=None, help="Sparsities (unstructured) or channel fractions (structured).")
    parser.add_argument("--methods", default=None, help="onnxsim pruning methods.")
    parser.add_argument("--recoveries", default="none,bn,bias")
    parser.add_argument("--no-asr", dest="asr", action="store_false", help="Skip the asr-onnx cells.")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30, help="Timed runs per model (structured).")
    parser.add_argument("--bench-batches", default="1,32")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.kind == "markdown":
        print(markdown(json.loads(args.out.read_text())["rows"]))
        return
    structured_kind = args.kind == "structured"
    args.cells = [float(c) for c in (args.cells or ("0.25,0.5,0.75" if structured_kind else "0.5,0.8,0.9")).split(",")]
    args.methods = (args.methods or ("structured,structured-wanda" if structured_kind else "magnitude")).split(",")
    args.recoveries = args.recoveries.split(",")
    args.bench_batches = [int(b) for b in args.bench_batches.split(",")]

    import onnx
    import onnxsim

    from asr_onnx.model.files import load_model

    previous = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = previous["rows"]
    meta = {"onnxsim": onnxsim.__version__, "onnx": onnx.__version__, "calib": args.calib_size,
            "seed": args.seed, "eval": "fashion-mnist:test (10,000)", "threads": args.threads}

    def save():  # after every row, so that a stopped run keeps what it measured
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
        tmp.rename(args.out)
    for name in args.models.split(","):
        dense = load_model(ROOT / "sample_models" / f"{name}.onnx")
        calib, test = data_sets(dense, args.calib_size, args.seed)
        dense_row = {"model": name, "tool": "dense", **score(dense, dense, test)}
        if not any(r.get("tool") == "dense" and r["model"] == name for r in rows):
            rows.append(dense_row)
        (structured if structured_kind else unstructured)(name, dense, calib, test, args, Rows(rows, save))


if __name__ == "__main__":
    main()
