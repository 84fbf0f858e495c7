"""LayerNorm sites (issue 30): what recalibrating each LayerNorm's γ and β buys on the sample transformers.

Per model and cell (LAMP, or global for 2:4): pruning alone, the statistics-only repair (exact BN
recalibration of every site and the head correction) without LayerNorm sites (the behaviour before they were
sites) and with them, then the refit (OBS masks and least squares, the CLI's default without its guard)
without and with them. Calibration: --calib-size training images; evaluation: a held-out slice of the
training set disjoint from them (--eval heldout, for choosing the default) or the test set (--eval test).

    python benchmarks/layernorm_sites.py --eval heldout --out benchmarks/results/layernorm_sites_heldout.json
    python benchmarks/layernorm_sites.py --eval test --out benchmarks/results/layernorm_sites_test.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (correction method, refit, score, LayerNorm sites)
    "pruned": ("none", "none", "magnitude", False),
    "stats": ("bn", "none", "magnitude", False),
    "stats+ln": ("bn", "none", "magnitude", True),
    "refit": ("bn", "ls", "obs", False),
    "refit+ln": ("bn", "ls", "obs", True),
}


def run_variant(proto, calib, eval_data, cell: str, variant: str, args) -> dict:
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    method, reconstruct, score, layernorm = VARIANTS[variant]
    pattern, sparsity, allocation = ("2:4", 0.0, "global") if cell == "2:4" else ("global", float(cell), "lamp")
    start = time.perf_counter()
    job = Repair(proto, device="cpu", batch_size=64, progress=False, threads=args.threads)
    job.prune(sparsity, pattern, allocation=allocation, score=score, calib=calib)
    job.run(calib, method, reconstruct=reconstruct, layernorm=layernorm, seed=args.seed)
    seconds = time.perf_counter() - start
    result = evaluate(job.output, eval_data, reference=proto, device="cpu", progress=False)
    sites = job.measurement.sites if job.measurement is not None else []
    return {"cell": cell, "allocation": allocation, "variant": variant, "method": method, "reconstruct": reconstruct,
            "score": score, "layernorm": layernorm, "layernorm_sites": sum(s.ln is not None for s in sites),
            "top1": result.get("top1"), "agreement": result["agreement"], "seconds": round(seconds, 1)}


def markdown(rows: list[dict]) -> str:
    """One line per model and cell: top-1 (%) and agreement (%) of every variant."""
    names = list(VARIANTS)
    lines = ["| model | dense | cell | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for model, cell in dict.fromkeys((r["model"], r["cell"]) for r in rows):
        cells = {r["variant"]: r for r in rows if (r["model"], r["cell"]) == (model, cell)}
        dense = next(iter(cells.values()))["dense"]
        tops = [f"{100 * cells[v]['top1']:.2f} ({100 * cells[v]['agreement']:.1f})" if v in cells else "–"
                for v in names]
        lines.append(f"| {model} | {100 * dense:.2f} | {cell} | " + " | ".join(tops) + " |")
    return "\n".join(lines)


def main() -> int:
    from reconstruct_table import data_sets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,convnext")
    parser.add_argument("--cells", default="0.5,0.9,2:4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval", choices=("test", "heldout"), default="heldout")
    parser.add_argument("--eval-size", type=int, default=0, help="0: the whole test set (heldout: 5000).")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file to add rows to.")
    parser.add_argument("--markdown", action="store_true", help="print the table of --out; run nothing")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.eval == "heldout" and not args.eval_size:
        args.eval_size = 5000
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"layernorm_sites_{args.eval}.json")
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    if args.markdown:
        print(markdown(rows))
        return 0
    for name in args.models.split(","):
        proto = load_model(ROOT / "sample_models" / f"{name}.onnx")
        calib, eval_data = data_sets(proto, args)
        dense = evaluate(proto, eval_data, device="cpu", progress=False)["top1"]
        print(f"{name}: dense {dense:.4f} on {len(eval_data)} {args.eval} samples", flush=True)
        for cell in args.cells.split(","):
            for variant in args.variants.split(","):
                row = dict(model=name, dense=dense, eval=args.eval, samples=len(eval_data), seed=args.seed,
                           calib_size=args.calib_size, **run_variant(proto, calib, eval_data, cell, variant, args))
                print(f"  {cell} {variant}: top-1 {row['top1']:.4f} agreement {row['agreement']:.4f} "
                      f"({row['seconds']} s)", flush=True)
                key = (name, cell, variant, args.seed, args.calib_size, len(eval_data))
                rows = [r for r in rows if (r["model"], r["cell"], r["variant"], r["seed"], r["calib_size"],
                                            r["samples"]) != key] + [row]
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
