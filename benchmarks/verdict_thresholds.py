"""Where the verdict's standardised-error thresholds come from (issue 29).

A model that is neither a classifier nor a detector is judged by its standardised error (each output channel's
RMS error in units of the dense model's spread of that channel). Its thresholds are read off classifiers, where
the truth is known: for each sample model, sparsity and repair, the standardised error of the logits beside the
top-1 agreement with the dense model, both on held-out Fashion-MNIST TRAINING images (disjoint from the
calibration samples; the test set is never used). The table prints the pairs sorted by error, and the error
ranges where agreement crosses 95% (usable) and 55% (broken for 10 classes: half-way from chance).

    OMP_NUM_THREADS=1 python benchmarks/verdict_thresholds.py            # writes results/verdict_thresholds.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20_bn", "vgg_bn_bn", "mobilenetv2_bn", "resnet50s_bn")
CELLS = ("0.5", "0.7", "0.8", "0.9", "0.95", "2:4")
METHODS = ("none", "bn")


def held_out(proto, calib_size: int, eval_size: int, seed: int):
    """(calibration set, held-out set), both from fashion-mnist:train, disjoint."""
    import numpy as np

    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data

    train = load_calib(resolve_data("fashion-mnist:train"), input_specs(proto), Preprocess.from_metadata(metadata(proto)))
    calib = train.take(calib_size, seed)
    wider = train.take(calib_size + eval_size, seed)
    held = np.setdiff1d(wider._indices, calib._indices)  # noqa: SLF001 - a benchmark's slice
    return calib, wider._subset(held)  # noqa: SLF001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verdict_thresholds.json"))
    args = parser.parse_args()

    from asr_onnx import Repair, evaluate, load_model

    rows = []
    for name in args.models:
        proto = load_model(ROOT / "sample_models" / f"{name}.onnx")
        calib, held = held_out(proto, args.calib_size, args.eval_size, args.seed)
        for cell in CELLS:
            pattern, sparsity = ("2:4", 0.0) if cell == "2:4" else ("global", float(cell))
            for method in METHODS:
                start = time.perf_counter()
                job = Repair(proto, device="cpu", progress=False, threads=args.threads).prune(sparsity, pattern)
                job.run(calib, method)
                result = evaluate(job.output, held, reference=proto, device="cpu", progress=False)
                rows.append({"model": name, "cell": cell, "method": method, "agreement": round(result["agreement"], 4),
                             "standardised_error": round(result["standardised_error"], 4),
                             "logit_rel_l2": round(result["logit_rel_l2"], 4),
                             "seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r["standardised_error"])
    usable_fail = [r["standardised_error"] for r in rows if r["agreement"] < 0.95]
    usable_pass = [r["standardised_error"] for r in rows if r["agreement"] >= 0.95]
    broken = [r["standardised_error"] for r in rows if r["agreement"] < 0.55]
    not_broken = [r["standardised_error"] for r in rows if r["agreement"] >= 0.55]
    summary = {"calib": args.calib_size, "held_out": len(held), "data": "fashion-mnist:train (held out)",
               "agreement_below_95_from_error": min(usable_fail, default=None),
               "agreement_95_up_to_error": max(usable_pass, default=None),
               "agreement_below_55_from_error": min(broken, default=None),
               "agreement_55_up_to_error": max(not_broken, default=None)}
    print(f"{'model':<16} {'cell':>5} {'method':>6} {'std err':>8} {'rel L2':>8} {'agreement':>9}")
    for r in rows:
        print(f"{r['model']:<16} {r['cell']:>5} {r['method']:>6} {r['standardised_error']:>8.3f} "
              f"{r['logit_rel_l2']:>8.3f} {100 * r['agreement']:>8.1f}%")
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
