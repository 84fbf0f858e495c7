"""The new default repair against the statistics-only repair on the real graphs, scored against dense (issue 27).

Issue 27 makes LAMP allocation + the least-squares refit + exact BN recalibration + head correction + the
guard the default. Its target on the real Paddle MobileNetV3 classifier (cls) at 0.8: a lower output error
against dense than the statistics-only repair. For each model and cell this prints, on evaluation images
never used to fit anything, the relative L2 error against dense (and top-1 agreement where it means
something, detection F1 for a detector) of:

- pruning alone, with global allocation (what the statistics-only repair starts from) and with LAMP;
- the statistics-only repair: global allocation, ``Recipe(method="bn", reconstruct="none")``;
- the new default: LAMP allocation, ``Recipe(method="bn", reconstruct="ls")``.

Each repair runs with ``guard="warn"`` so that the repair itself can be scored; ``guard="fallback"`` ships what
the warn entry calls ``best`` (pipeline/guard.py): the repair, the refit alone, or pruning alone, so the shipped
model ("kept") is that one, scored here.

    python benchmarks/default_real.py cls=.../ch_ppocr_mobile_v2.0_cls_infer.onnx@64,64 --cells global:0.8

KIND[.NAME]=PATH[@CALIB,EVAL] as in benchmarks/real_graphs.py (its synthetic images: calibration seed 1,
evaluation seed 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_graphs import KINDS, images, parse_cells, parse_spec  # noqa: E402


def scores(model, dense, data, reference_logits: list) -> dict:
    """Relative L2 error, top-1 agreement and detection F1 of ``model`` against ``dense`` on ``data``."""
    from asr_onnx.verify.evaluation import evaluate

    result = evaluate(model, data, reference=dense, device="cpu", progress=False, reference_logits=reference_logits)
    agree, detection = result.get("agreement"), result.get("detection")
    return {"err": round(result["logit_rel_l2"], 4), "agree": None if agree is None else round(agree, 4),
            "f1": None if not detection else round(detection["f1"], 4)}


def repaired(dense, calib, data, ref: list, pattern: str, sparsity: float, allocation: str, reconstruct: str,
             score: str = "magnitude") -> dict:
    """One repair's pruned model, repair and shipped model scored, with the guard's verdict and the time."""
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.recipe import Recipe

    job = Repair(dense, device="cpu", progress=False).prune(sparsity, pattern, allocation=allocation, score=score)
    start = time.perf_counter()
    job.run(calib, recipe=Recipe(method="bn", reconstruct=reconstruct, guard="warn"))
    seconds = time.perf_counter() - start
    guard = job.settings["guard"]
    pruned, repair = scores(job.pruned_alone, dense, data, ref), scores(job.output, dense, data, ref)
    kept = guard.get("best", "pruned" if guard.get("repair_loses") else "repair")  # what guard="fallback" ships
    refit = scores(job.pruned, dense, data, ref) if kept == "refit" else None  # the refit alone, uncorrected
    return {"pruned": pruned, "repair": repair, "kept": kept,
            "shipped": {"pruned": pruned, "repair": repair, "refit": refit}[kept],
            "verdict": guard.get("verdict"), "seconds": round(seconds, 1)}


def run_model(kind: str, path: str, sizes: tuple[int, int], cells, folder: Path,
              mask_scores: tuple = ("obs",), label: str = "") -> list[dict]:
    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.model.files import load_model

    dense = load_model(path)
    sets = {}
    for name, n, seed in (("calib", sizes[0], 1), ("eval", sizes[1], 2)):
        np.save(folder / f"{kind}_{name}.npy", images(kind, n, seed))
        sets[name] = load_calib(folder / f"{kind}_{name}.npy", input_specs(dense))
    ref: list = []  # the dense model's evaluation outputs, run once
    rows = []
    for pattern, sparsity in cells:
        lamp = "lamp" if pattern == "global" else "global"  # LAMP allocates across layers; N:M has no allocation
        stats = repaired(dense, sets["calib"], sets["eval"], ref, pattern, sparsity, "global", "none")
        by_score = {score: repaired(dense, sets["calib"], sets["eval"], ref, pattern, sparsity, lamp, "ls", score)
                    for score in mask_scores}
        row = {"model": label or kind, "path": Path(path).name,
               "cell": f"{sparsity:g}" if pattern == "global" else pattern, "calib": sizes[0],
               "eval": sizes[1], "statistics_only": stats, "default": by_score[mask_scores[0]], "score": mask_scores[0],
               "by_score": by_score}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def show(s: dict) -> str:
    extra = [f"{100 * s['agree']:.1f}%"] if s["agree"] is not None else []
    extra += [f"F1 {s['f1']:.3f}"] if s["f1"] is not None else []
    return f"{s['err']:.3f}" + (f" ({', '.join(extra)})" if extra else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| graph | cell | pruned (global) | stats-only repair | kept, shipped | pruned (LAMP) | default repair "
             "| kept, shipped | default beats stats-only (shipped) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, d = r["statistics_only"], r["default"]
        better = "yes" if d["shipped"]["err"] < s["shipped"]["err"] else "no"
        lines.append(f"| {r['model']} | {r['cell']} | {show(s['pruned'])} | {show(s['repair'])} | {s['kept']}, "
                     f"{show(s['shipped'])} | {show(d['pruned'])} | {show(d['repair'])} | {d['kept']}, "
                     f"{show(d['shipped'])} | {better} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help=f"KIND[.NAME]=PATH[@CALIB,EVAL], KIND one of {', '.join(KINDS)} "
                        "(.NAME tells two models of one kind apart)")
    parser.add_argument("--cells", default="global:0.8", help="pattern:sparsity, comma-separated")
    parser.add_argument("--json", default=str(HERE / "results" / "default_real.json"))
    parser.add_argument("--scores", default="obs", help="the default repair's masks, one run per score; the first "
                        "is the row's default")
    args = parser.parse_args()
    cells = parse_cells(args.cells)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            label, path, counts = parse_spec(spec)
            kind = label.partition(".")[0]
            if kind not in KINDS or not path:
                parser.error(f"not KIND[.NAME]=PATH[@CALIB,EVAL]: {spec}")
            sizes = tuple(int(v) for v in counts.split(",")) if counts else KINDS[kind][4:]
            rows += run_model(kind, path, sizes, cells, Path(tmp), tuple(args.scores.split(",")), label)
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
