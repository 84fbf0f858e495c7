"""INT8 after pruning and repair (issue 31): dense FP32 / dense INT8 / sparse FP32 / sparse INT8 (plain PTQ) /
sparse INT8 corrected, top-1 on the full Fashion-MNIST test set and measured onnxruntime CPU latency.

Every cell prunes a sample model (2:4; unstructured 0.9 with the LAMP allocation, or ``0.9g`` with one global
threshold; or whole channels ranked by the greedy score, ``channels-F``) and repairs it in float (bn with a least-squares refit, ``--reconstruct ls``, guard off), then quantizes the
repair with :func:`asr_onnx.quantize.to_int8` (onnxruntime's static quantizer, QDQ, per-channel symmetric int8
weights; the calibration method, the weight range, the layers left in float and the correction chosen on held-out
calibration data).
Calibration: 1,024 ``fashion-mnist:train`` images (seed 0) for everything. The plain PTQ model and the
corrected one (the correction applied even where the held-out choice declined it) are both scored.
Latency: the five models of a cell in onnxruntime on the CPU, one intra-op thread, batch 32, timed run by
run in turn (warm-up first), medians; speed-ups are against dense FP32 from the same run.

``--ablation`` compares the correction's schedules on resnet20_bn at 0.9 (the same PTQ model): one pass with
the upstream sites renormalised by batch statistics, every layer at once from one pass (1 and 2 rounds),
and the sequential one :func:`asr_onnx.quantize.correct_quantization` uses; scored on 2,000 held-out
training images (seed 7), never on the test set.

``--kernels`` measures, on resnet20_bn 2:4, what onnxruntime's int8 kernels do on this CPU with full-range
weights, and what its WeightBiasQuantization does to a QDQ model whose weights are held in float.

``--paddle PATH`` runs 2:4 + INT8 on the PP-OCR text-direction classifier (a MobileNetV3; see RESULTS.md,
section 5, for the wheel it comes from), on rendered text lines (benchmarks/real_graphs.py): 1,024
calibration images, 256 evaluation images, errors against dense.

    python benchmarks/int8_table.py --cells resnet20_bn:2:4 resnet20_bn:0.9 --json benchmarks/results/int8_a.json
    python benchmarks/int8_table.py --ablation --json benchmarks/results/int8_ablation.json
    python benchmarks/int8_table.py --markdown benchmarks/results/int8_*.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CALIB, SEED, BATCH = 1024, 0, 32
VARIANTS = ("dense_fp32", "dense_int8", "sparse_fp32", "sparse_int8", "corrected")


def data_sets(proto):
    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata, resolve_data

    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    train = load_calib(resolve_data("fashion-mnist:train"), specs, preprocess)
    return train.take(CALIB, SEED), load_calib(resolve_data("fashion-mnist:test"), specs, preprocess), train


def latency(models: dict, x, repeats: int, threads: int = 1) -> dict:
    """Median ms per run of each model on ``x``, the models timed in turn, round after round."""
    from asr_onnx.model.session import make_session

    sessions = {k: make_session(m, "cpu", threads) for k, m in models.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    for s in sessions.values():
        s.run(None, {name: x})
        s.run(None, {name: x})
    times: dict = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {name: x})
            times[k].append(time.perf_counter() - start)
    return {k: round(1e3 * float(np.median(t)), 3) for k, t in times.items()}


def repair(proto, calib, cell: str, threads: int):
    """The float repair of one cell: (the Repair, seconds)."""
    from asr_onnx import Repair

    job = Repair(proto, device="cpu", progress=False, threads=threads)
    start = time.perf_counter()
    if cell.startswith("channels"):
        job.prune(float(cell.split("-")[1]), "channels", score="greedy", calib=calib)
    elif ":" in cell:
        job.prune(0.0, cell)
    elif cell.endswith("g"):  # one global |w| threshold
        job.prune(float(cell[:-1]), "global")
    else:  # LAMP: global + LS breaks resnet50s_bn, mobilenetv2_bn and the folded models at 0.9 (RESULTS.md)
        job.prune(float(cell), "global", allocation="lamp")
    job.run(calib, "bn", reconstruct="ls", seed=SEED)
    return job, time.perf_counter() - start


def int8_pair(float_model, calib, threads: int):
    """(the shipped INT8 model, plain PTQ, corrected, its quantization entry, seconds)."""
    from asr_onnx.quantize import correct_quantization, correction_sample, prepare, to_int8

    keep: list = []
    start = time.perf_counter()
    shipped, entry = to_int8(float_model, calib, seed=SEED, threads=threads, keep=keep)
    seconds = time.perf_counter() - start
    plain = keep[0]
    corrected = shipped
    if entry["correction"]["picked"] == "none":
        corrected, _ = correct_quantization(prepare(float_model), plain, correction_sample(calib, SEED), device="cpu",
                                            threads=threads)
    return shipped, plain, corrected, entry, seconds


def run_cell(name: str, cell: str, args, dense_cache: dict) -> dict:
    import onnx

    from asr_onnx import evaluate
    from asr_onnx.quantize import to_int8

    proto = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
    calib, test, _ = data_sets(proto)
    if name not in dense_cache:
        dense_int8, dense_entry = to_int8(proto, calib, correction="none", seed=SEED, threads=args.threads)
        dense_cache[name] = (dense_int8, dense_entry, evaluate(proto, test, device="cpu", progress=False)["top1"])
    dense_int8, dense_entry, dense_top1 = dense_cache[name]
    job, repair_s = repair(proto, calib, cell, args.threads)
    sparse = job.output
    _, plain, corrected, entry, int8_s = int8_pair(sparse, calib, args.threads)
    models = {"dense_fp32": proto, "dense_int8": dense_int8, "sparse_fp32": sparse, "sparse_int8": plain,
              "corrected": corrected}
    scores = {k: evaluate(m, test, reference=sparse, device="cpu", progress=False) for k, m in models.items()
              if k != "dense_fp32"}
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal((BATCH, *shape))
    ms = latency(models, x.astype(np.float32), args.repeats, args.threads)
    layers = entry["layers"]
    conv_24 = [r for r in layers if r["op"] == "Conv" and r["float_nm_24"] == "yes"]
    row = {
        "model": name, "cell": cell, "calib": CALIB, "test": len(test),
        "top1": {"dense_fp32": dense_top1, **{k: s["top1"] for k, s in scores.items()}},
        "err_vs_sparse_fp32": {k: round(s["logit_rel_l2"], 5) for k, s in scores.items() if k != "sparse_fp32"},
        "agree_vs_sparse_fp32": {k: s["agreement"] for k, s in scores.items() if k != "sparse_fp32"},
        "shipped": "corrected" if entry["correction"]["picked"] != "none" else "sparse_int8",
        "latency_ms_b32": ms, "speedup_vs_dense_fp32": {k: round(ms["dense_fp32"] / v, 3) for k, v in ms.items()},
        "int8": {k: entry[k] for k in ("weights", "activations", "calibration", "float_layers", "output")}
        | {"correction": {k: v for k, v in entry["correction"].items() if k != "sites"}},
        "dense_int8": {"calibration": dense_entry["calibration"]["picked"]},
        "conv_24": {"float": len(conv_24), "int8": sum(r["nm_24"] == "yes" for r in conv_24)},
        "layers": [{k: r.get(k) for k in ("name", "scale", "nm_24", "rel_l2_ptq", "rel_l2_corrected")} for r in layers],
        "channels": job.channel_report and {"params": job.channel_report["params"], "macs": job.channel_report["macs"]},
        "repair_s": round(repair_s, 1), "int8_s": round(int8_s, 1),
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "int8")}), flush=True)
    return row


# ---------------------------------------------------------------- the correction's schedules


def at_once(float_model, plain, calib, rounds: int):
    """Every layer corrected from one pass over the PTQ model, ``rounds`` times: the schedule that was dropped."""
    from asr_onnx.measure.norms import reference
    from asr_onnx.measure.passes import measure
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.model.graph import find_layers, find_sites, to_graph, to_model
    from asr_onnx.model.qdq import dequantize_weights, float_twin
    from asr_onnx.model.requantize import requantize
    from asr_onnx.quantize import write_correction

    fake, tensors = dequantize_weights(plain)
    twin, matched = float_twin(float_model, fake)
    graph = to_graph(fake)
    sites = [s for s in find_sites(graph, find_layers(graph)) if s.bn is None and s.key in matched]
    keys = sorted(s.key for s in sites)
    dense, _ = measure(twin, calib, keys=keys, batch_size=64, device="cpu", progress=False)
    refs = {s.key: reference(s, merge_all(dense[s.key]), "running") for s in sites}
    for _ in range(rounds):
        stats, _ = measure(fake, calib, keys=keys, batch_size=64, device="cpu", progress=False)
        graph = to_graph(fake)
        by_key = {s.key: s for s in find_sites(graph, find_layers(graph))}
        for key in keys:
            write_correction(graph, by_key[key], refs[key], stats[key])
        graph.cleanup().toposort()
        fake = to_model(graph, fake)
    return requantize(fake, tensors)


def ablation(args) -> list[dict]:
    import onnx

    from asr_onnx import evaluate
    from asr_onnx.quantize import correct_quantization, correction_sample, prepare, to_int8

    proto = onnx.load(str(ROOT / "sample_models" / "resnet20_bn.onnx"))
    calib, _, train = data_sets(proto)
    held = train.take(2000, 7)
    job, _ = repair(proto, calib, "0.9", args.threads)
    base = prepare(job.output)
    keep: list = []
    to_int8(job.output, calib, correction="none", seed=SEED, keep=keep)
    plain, part = keep[0], correction_sample(calib, SEED)
    variants = {"plain PTQ": lambda: plain,
                "one pass, batch renormalisation": lambda: correct_quantization(base, plain, part, device="cpu",
                                                                                sequential=False)[0],
                "all layers at once, 1 round": lambda: at_once(base, plain, part, 1),
                "all layers at once, 2 rounds": lambda: at_once(base, plain, part, 2),
                "sequential (the default)": lambda: correct_quantization(base, plain, part, device="cpu")[0]}
    rows = []
    for name, make in variants.items():
        start = time.perf_counter()
        model = make()
        seconds = time.perf_counter() - start
        score = evaluate(model, held, reference=base, device="cpu", progress=False)
        rows.append({"schedule": name, "agreement": score["agreement"], "logit_rel_l2": round(score["logit_rel_l2"], 5),
                     "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- onnxruntime's kernels on this CPU


def kernels(args) -> list[dict]:
    """resnet20_bn 2:4 (the float repair), quantized with MinMax and full or reduced weights: its error against
    float on 1,000 held-out training images (seed 7) as onnxruntime runs it (integer kernels), with graph
    optimisations off (the QDQ arithmetic in float), and its float-weight form (model.qdq) with onnxruntime's
    WeightBiasQuantization on and off: these sessions are onnxruntime's own, since asr-onnx's always turn it off."""
    import onnx
    import onnxruntime as ort

    from asr_onnx.model.qdq import dequantize_weights
    from asr_onnx.quantize import QuantRecipe, prepare, quantize

    proto = onnx.load(str(ROOT / "sample_models" / "resnet20_bn.onnx"))
    calib, _, train = data_sets(proto)
    x = next(train.take(1000, 7).batches(1000))["input"]
    job, _ = repair(proto, calib, "2:4", args.threads)
    base = prepare(job.output)

    def run(model, optimize=True, disabled=()):
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled))
        return session.run(None, {"input": x})[0]

    want = run(base)
    rows = []
    for weights in ("full", "reduced"):
        model = quantize(base, calib, QuantRecipe("MinMax", weights))
        fake, _ = dequantize_weights(model)
        found = {"integer kernels": run(model), "optimisations off": run(model, optimize=False),
                 "float form, WeightBiasQuantization on": run(fake),
                 "float form, WeightBiasQuantization off": run(fake, disabled=["WeightBiasQuantization"])}
        rows.append({"weights": weights} | {k: round(float(np.linalg.norm(v - want) / np.linalg.norm(want)), 5)
                                           for k, v in found.items()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- the PP-OCR classifier


def paddle(path: str, args) -> dict:
    import sys
    import tempfile

    from asr_onnx import Repair, evaluate, load_model
    from asr_onnx.calib import input_specs, load_calib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_graphs import images

    dense = load_model(path)
    specs = input_specs(dense)
    with tempfile.TemporaryDirectory() as folder:
        sets = {}
        for name, n, seed in (("calib", CALIB, 1), ("eval", 256, 2)):
            np.save(Path(folder) / f"{name}.npy", images("cls", n, seed))
            sets[name] = load_calib(Path(folder) / f"{name}.npy", specs)
        job = Repair(dense, device="cpu", progress=False, threads=args.threads).prune(0.0, "2:4")
        job.run(sets["calib"], "bn", reconstruct="ls", seed=SEED)
        sparse = job.output
        shipped, plain, corrected, entry, int8_s = int8_pair(sparse, sets["calib"], args.threads)
        scores = {k: evaluate(m, sets["eval"], reference=dense, device="cpu", progress=False)
                  for k, m in (("sparse_fp32", sparse), ("sparse_int8", plain), ("corrected", corrected),
                               ("shipped", shipped))}
    row = {"model": "ppocr_cls_mobilenetv3", "cell": "2:4", "calib": CALIB, "eval": 256,
           "err_vs_dense": {k: round(s["logit_rel_l2"], 5) for k, s in scores.items()},
           "agree_vs_dense": {k: s["agreement"] for k, s in scores.items()},
           "target": round(1.25 * scores["sparse_fp32"]["logit_rel_l2"] + 0.02, 5),
           "int8": {"calibration": entry["calibration"]["picked"], "correction": entry["correction"]["picked"]},
           "int8_s": round(int8_s, 1)}
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- markdown


def markdown(rows: list[dict]) -> str:
    """The accuracy and latency table, then the errors against the sparse FP32 model and the held-out choices."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = ["| model | cell | dense FP32 | dense INT8 | sparse FP32 | sparse INT8 (PTQ) | sparse INT8 corrected | "
             "ms b32: dense FP32 / dense INT8 / sparse FP32 / PTQ / corrected | speed-up of the shipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, ms = r["top1"], r["latency_ms_b32"]
        shipped = "corrected" if r["shipped"] == "corrected" else "PTQ"
        lines.append(f"| {r['model']} | {r['cell']} | {pct(t['dense_fp32'])} | {pct(t['dense_int8'])} | "
                     f"{pct(t['sparse_fp32'])} | {pct(t['sparse_int8'])} | {pct(t['corrected'])} | "
                     f"{' / '.join(f'{ms[k]:.1f}' for k in VARIANTS)} | "
                     f"{r['speedup_vs_dense_fp32'][r['shipped']]:.2f}x ({shipped}) |")
    lines += ["", "| model | cell | calibration, weights | layers left in float | held out (512): PTQ / corrected, "
              "agreement and logit error | verdict | test: PTQ / corrected against sparse FP32 | 2:4 Convs, float / int8 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pick = r["int8"]["calibration"]["picked"]
        held = r["int8"]["correction"]["candidates"]
        err, agree = r["err_vs_sparse_fp32"], r["agree_vs_sparse_fp32"]
        floats = (r["int8"].get("float_layers") or {}).get("picked", [])
        lines.append(f"| {r['model']} | {r['cell']} | {pick['calibration']}, {pick['weights']} | {len(floats)} | "
                     + " / ".join(f"{100 * c['agreement']:.1f}%, {c['logit_rel_l2']:.4f}" for c in held)
                     + f" | {r['int8']['correction']['verdict']} | "
                     f"{100 * agree['sparse_int8']:.2f}%, {err['sparse_int8']:.4f} / "
                     f"{100 * agree['corrected']:.2f}%, {err['corrected']:.4f} | "
                     f"{r['conv_24']['float']} / {r['conv_24']['int8']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="*", default=[], help="MODEL:CELL, CELL one of 2:4, 0.9, 0.9g, channels-F")
    parser.add_argument("--ablation", action="store_true", help="the correction's schedules on resnet20_bn 0.9")
    parser.add_argument("--paddle", help="the PP-OCR text-direction classifier's ONNX file")
    parser.add_argument("--kernels", action="store_true", help="onnxruntime's int8 kernels on this CPU, and "
                        "WeightBiasQuantization on a float-weight form")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", nargs="*", help="print the table of these JSON files and exit")
    args = parser.parse_args()
    if args.markdown:
        rows = [row for path in args.markdown for row in json.loads(Path(path).read_text()).get("rows", [])]
        print(markdown(rows))
        return
    rows, cache = [], {}
    for spec in args.cells:
        name, cell = spec.split(":", 1)
        rows.append(run_cell(name, cell, args, cache))
    result = {"rows": rows}
    if args.ablation:
        result["ablation"] = ablation(args)
    if args.paddle:
        result["paddle"] = paddle(args.paddle, args)
    if args.kernels:
        result["kernels"] = kernels(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
