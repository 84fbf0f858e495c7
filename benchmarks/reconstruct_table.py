"""Allocation x reconstruction on the sample models, produced by the tool itself.

Every cell prunes (global 0.8/0.9/0.95 or 2:4) with an allocation (global, lamp, uniform, error), refits or not
(--reconstruct none|ls), then repairs with the default method (exact BN recalibration and the head
correction) and reports top-1 and agreement with the dense model. Calibration: --calib-size training images.
Evaluation: the test set, or with --eval heldout a slice of the training set disjoint from the calibration
samples (for choosing defaults without the test set). --score rownorm and --rounds 2 run the variants of
issue 13 (benchmarks/results/reconstruct_tries.json); --markdown then also lists every row, variants included.

    python benchmarks/reconstruct_table.py --models resnet20_bn --cells 0.9 --eval heldout
    python benchmarks/reconstruct_table.py            # every model and cell, full test set
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet20_bn", "resnet20", "resnet50s_bn", "resnet50s", "vgg_bn_bn", "vgg_bn", "mobilenetv2_bn",
          "mobilenetv2")


def data_sets(proto, args):
    """(calibration set, evaluation set): the evaluation set never overlaps the calibration samples."""
    import numpy as np

    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data

    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    train = load_calib(resolve_data("fashion-mnist:train"), specs, preprocess)
    calib = train.take(args.calib_size, args.seed)
    if args.eval == "heldout":
        wider = train.take(args.calib_size + args.eval_size, args.seed)
        held = np.setdiff1d(wider._indices, calib._indices)  # noqa: SLF001 - a benchmark's slice
        return calib, wider._subset(held)  # noqa: SLF001
    test = load_calib(resolve_data("fashion-mnist:test"), specs, preprocess)
    return calib, test.take(args.eval_size, args.seed) if args.eval_size else test


def run_cell(proto, calib, eval_data, cell, allocation, reconstruct, args):
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.verify.evaluation import evaluate

    pattern, sparsity = ("2:4", 0.0) if cell == "2:4" else ("global", float(cell))
    start = time.perf_counter()
    job = Repair(proto, device="cpu", batch_size=64, progress=False, threads=args.threads)
    job.prune(sparsity, pattern, allocation=allocation, score=args.score, calib=calib)
    target = {} if args.refit_target == "default" else {"refit_target": args.refit_target}
    job.run(calib, "bn", reconstruct=reconstruct, refit_passes=args.passes, refit_samples=args.refit_size,
            seed=args.seed, **target)
    rounds = args.rounds if job.refits else 1
    passes = args.passes if args.round_passes is None else args.round_passes
    for _ in range(rounds - 1):  # later rounds: refit from the corrected output, with their own passes
        job.refit_corrected(calib, passes=passes).measure(calib).correct("bn").fold()
    seconds = time.perf_counter() - start
    result = evaluate(job.output, eval_data, reference=proto, device="cpu", progress=False)
    refits = [r for r in job.refits if "err_after" in r]
    return {"cell": cell, "allocation": allocation,
            "reconstruct": reconstruct, "score": args.score,
            "refit_target": job.recipe.refit_target if job.recipe.reconstruct == "ls" else "layer",
            "passes": args.passes, "refit_size": args.refit_size if job.refits else 0,
            "rounds": rounds, "round_passes": args.round_passes if rounds > 1 else None, "top1": result.get("top1"),
            "agreement": result["agreement"], "seconds": round(seconds, 1),
            "timings": {k: round(v, 2) for k, v in job.timings.items()},
            "refit_err_before": [round(r["err_before"], 4) for r in refits],
            "refit_err_after": [round(r["err_after"], 4) for r in refits],
            "skipped": sorted({r["skipped"] for r in job.refits if "skipped" in r})} \
        | ({"reconstruct_auto": job.settings["reconstruct_auto"]} if reconstruct == "auto" else {})


def _plain(row: dict) -> bool:
    """Whether a row is of the main table: one sequential refit round on magnitude scores, on every sample."""
    return (row.get("passes", 0) == 0 and row.get("score", "magnitude") == "magnitude" and row.get("rounds", 1) == 1
            and not row.get("refit_size"))


def markdown(rows: list[dict]) -> str:
    """The table: one line per model and cell, top-1 (%) per allocation x reconstruct, and the refit's cost."""
    allocations = ("global", "lamp", "uniform") + (("error",) if any(r["allocation"] == "error" for r in rows) else ())
    columns = [(a, r) for r in ("none", "ls") for a in allocations]
    names = {"global": "global", "lamp": "LAMP", "uniform": "uniform", "error": "error"}
    header = [names[a] + (" + LS" if r == "ls" else "") for a, r in columns]
    lines = ["| model | dense | cell | " + " | ".join(header) + " | LS Gram / solve (s) |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    default = [r for r in rows if _plain(r)]
    order = {"0.8": 0, "0.9": 1, "0.95": 2, "2:4": 3}
    seen = sorted({(r["model"], r["cell"]) for r in default},
                  key=lambda k: ([r["model"] for r in default].index(k[0]), order.get(k[1], 9)))
    for model, cell in seen:
        cells = {(r["allocation"], r["reconstruct"]): r for r in default if (r["model"], r["cell"]) == (model, cell)}
        dense = next(iter(cells.values()))["dense"]
        tops = [f"{100 * cells[c]['top1']:.1f}" if c in cells else ("n/a" if cell == "2:4" and c[0] != "global" else "–")
                for c in columns]
        lamp_ls = cells.get(("lamp", "ls")) or cells.get(("global", "ls"))
        cost = (f"{lamp_ls['timings'].get('reconstruct_gram', 0):.0f} / {lamp_ls['timings'].get('reconstruct_solve', 0):.1f}"
                if lamp_ls else "–")
        lines.append(f"| {model} | {100 * dense:.1f} | {cell} | " + " | ".join(tops) + f" | {cost} |")
    return "\n".join(lines)


def every_row(rows: list[dict]) -> str:
    """Every row, variants included: top-1 (%) and the repair's seconds, per model in the file's order."""
    lines = ["| model | dense | cell | allocation | score | reconstruct | rounds | top-1 | s |", "|---" * 9 + "|"]
    rounds = {None: "", 0: " (sequential)", 1: " (one pass)"}
    for r in sorted(rows, key=lambda r: [x["model"] for x in rows].index(r["model"])):
        lines.append(f"| {r['model']} | {100 * r['dense']:.1f} | {r['cell']} | {r['allocation']} | "
                     f"{r.get('score', 'magnitude')} | {r['reconstruct']} | {r.get('rounds', 1)}"
                     f"{rounds.get(r.get('round_passes'), ' (' + str(r.get('round_passes')) + ' passes)')} | "
                     f"{100 * r['top1']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def data_arguments(parser, heldout_size: int) -> None:
    """The data options every sample-model table shares (this one and layernorm_sites.py)."""
    parser.add_argument("--eval", choices=("test", "heldout"), default="test")
    parser.add_argument("--eval-size", type=int, default=0, help=f"0: the whole test set (heldout: {heldout_size}).")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file to add rows to.")
    parser.add_argument("--markdown", action="store_true", help="print the table of --out (or --eval's file); run nothing")


def sample_model(name: str, args) -> tuple:
    """(the sample model, its calibration set, its evaluation set, its dense top-1), the dense figure printed."""
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    proto = load_model(ROOT / "sample_models" / f"{name}.onnx")
    calib, eval_data = data_sets(proto, args)
    dense = evaluate(proto, eval_data, device="cpu", progress=False)["top1"]
    print(f"{name}: dense {dense:.4f} on {len(eval_data)} {args.eval} samples", flush=True)
    return proto, calib, eval_data, dense


def stored_rows(args, stem: str, heldout_size: int) -> tuple[Path, list]:
    """Sets the threads and the held-out size from ``args``; returns the results file and the rows it holds."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.eval == "heldout" and not args.eval_size:
        args.eval_size = heldout_size
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{stem}_{args.eval}.json")
    return out, json.loads(out.read_text())["rows"] if out.exists() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cells", default="0.9,0.8,0.95,2:4")
    parser.add_argument("--allocations", default="global,lamp")
    parser.add_argument("--reconstructs", default="none,ls")
    data_arguments(parser, 2000)
    parser.add_argument("--score", default="magnitude", choices=("magnitude", "wanda", "rownorm", "obs"))
    parser.add_argument("--refit-target", default="layer", choices=("layer", "block", "default"),
                        help="what each layer is refitted towards (issue 28's block-wise targets); default: the "
                             "recipe's rule (block from 0.95 on).")
    parser.add_argument("--passes", type=int, default=0, help="Gram passes (0: one per depth level).")
    parser.add_argument("--refit-size", type=int, default=0,
                        help="refit on this many of the calibration samples (0: all of them).")
    parser.add_argument("--rounds", type=int, default=1, help="refit + correction rounds (ls only; see Repair.run).")
    parser.add_argument("--round-passes", type=int, default=None,
                        help="Gram passes of the rounds after the first (default: those of --passes).")
    args = parser.parse_args()
    out, rows = stored_rows(args, "reconstruct", 2000)
    if args.markdown:
        print(markdown(rows))
        if not all(_plain(r) for r in rows):
            print("\n" + every_row(rows))
        return 0
    for name in args.models.split(","):
        proto, calib, eval_data, dense = sample_model(name, args)
        for cell in args.cells.split(","):
            for allocation in args.allocations.split(",") if cell != "2:4" else ["global"]:
                for reconstruct in args.reconstructs.split(","):
                    row = dict(model=name, dense=dense, eval=args.eval, samples=len(eval_data),
                               **run_cell(proto, calib, eval_data, cell, allocation, reconstruct, args))
                    print(f"  {cell} {allocation} {reconstruct}: top-1 {row['top1']:.4f} agreement "
                          f"{row['agreement']:.4f} ({row['seconds']} s; {row['timings']})", flush=True)
                    key = (name, cell, allocation, reconstruct, args.score, args.passes, row["refit_size"],
                           row["rounds"], row["round_passes"], row["refit_target"])
                    rows = [r for r in rows if (r["model"], r["cell"], r["allocation"], r["reconstruct"],
                                                r.get("score", "magnitude"), r.get("passes", 0), r.get("refit_size", 0),
                                                r.get("rounds", 1), r.get("round_passes"),
                                                r.get("refit_target", "layer")) != key] + [row]
                    out.parent.mkdir(exist_ok=True)
                    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
