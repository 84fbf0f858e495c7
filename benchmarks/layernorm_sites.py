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
    from reconstruct_table import data_arguments, sample_model, stored_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit,convnext")
    parser.add_argument("--cells", default="0.5,0.9,2:4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    data_arguments(parser, 5000)
    parser.set_defaults(eval="heldout")
    args = parser.parse_args()
    out, rows = stored_rows(args, "layernorm_sites", 5000)
    if args.markdown:
        print(markdown(rows))
        return 0
    for name in args.models.split(","):
        proto, calib, eval_data, dense = sample_model(name, args)
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
