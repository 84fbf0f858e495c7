"""CUDA against CPU: the same repair on both providers, where onnxruntime-gpu and a GPU are present.

For each sample model and method it runs ``Repair(device=...).prune(0.9).measure(calib).correct(method).fold()``
once on the CPU provider and once on the other device, with the bundled calibration images, and prints:
the provider each statistics session ran on, how many runs went through IO binding, the largest difference
of any live channel's pruned mean and variance (in units of its site's dense variance) and of any folded
weight, top-1 of both repaired models on the bundled test images, and how often the two repaired models
agree. CI has no GPU; this
script is the check of the CUDA path (statistics by the reduction graph, batches fed by IO binding).

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


DEAD = 1e-6  # a channel whose pruned variance is under this fraction of its site's dense variance has collapsed


def stat_diffs(dev: dict, cpu: dict, dense_var: dict) -> dict:
    """Largest mean and variance differences over live channels, in units of the site's dense variance.

    A channel that pruning collapsed holds float32 noise (variances of 1e-15 beside 0.1), which differs
    between any two kernels; those channels are counted, not compared.
    """
    mean_diff, var_diff, dead = 0.0, 0.0, 0
    for key, ref in cpu.items():
        scale = float(np.mean(dense_var[key])) + 1e-30
        live = ref.var >= DEAD * scale
        dead += int(np.sum(~live))
        if live.any():
            mean_diff = max(mean_diff, float(np.max(np.abs(dev[key].mean - ref.mean)[live])) / np.sqrt(scale))
            var_diff = max(var_diff, float(np.max(np.abs(dev[key].var - ref.var)[live])) / scale)
    return {"max_mean_diff": mean_diff, "max_var_diff": var_diff, "dead_channels": dead}


def weight_diff(dev: dict, cpu: dict) -> float:
    """Largest |difference| of any float weight, relative to the largest |weight| of its tensor."""
    return max(float(np.max(np.abs(dev[k] - w)) / (np.max(np.abs(w)) + 1e-30)) for k, w in cpu.items()
               if w.dtype.kind == "f" and w.size)


def repair(path, calib, method: str, device: str, sequential: bool) -> tuple:
    from asr_onnx.measure.stats import merge_all
    from asr_onnx.pipeline.driver import Repair

    start = time.perf_counter()
    job = Repair(path, device=device, progress=False).prune(0.9).measure(calib, sequential=sequential)
    job.correct(method).fold()
    seconds = time.perf_counter() - start
    stats = {key: merge_all(batches) for key, batches in job.measurement.pruned.items()}
    return job, stats, seconds


def weights(model) -> dict:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def check(name: str, method: str, device: str, sequential: bool) -> dict:
    import onnxruntime as ort

    from asr_onnx.calib import Preprocess, input_specs, load_calib, metadata
    from asr_onnx.model.files import load_model
    from asr_onnx.verify.evaluation import evaluate

    path = SAMPLES / f"{name}.onnx"
    proto = load_model(path)
    specs, preprocess = input_specs(proto), Preprocess.from_metadata(metadata(proto))
    calib = load_calib(SAMPLES / "data" / "calib", specs, preprocess)
    eval_data = load_calib(SAMPLES / "data" / "eval.npz", specs, preprocess)
    bound = {"runs": 0}
    run_bound = ort.InferenceSession.run_with_iobinding

    def counted(self, *a, **k):  # counts the runs fed through IO binding; the run itself is onnxruntime's
        bound["runs"] += 1
        return run_bound(self, *a, **k)

    cpu_job, cpu_stats, cpu_s = repair(path, calib, method, "cpu", sequential)
    ort.InferenceSession.run_with_iobinding = counted
    try:
        dev_job, dev_stats, dev_s = repair(path, calib, method, device, sequential)
    finally:
        ort.InferenceSession.run_with_iobinding = run_bound
    cpu_w, dev_w = weights(cpu_job.output), weights(dev_job.output)
    cpu_eval = evaluate(cpu_job.output, eval_data, reference=proto, device="cpu", progress=False)
    dev_eval = evaluate(dev_job.output, eval_data, reference=proto, device=device, progress=False)
    cross = evaluate(dev_job.output, eval_data, reference=cpu_job.output, device="cpu", progress=False)
    return {
        "model": name, "method": method, "sequential": sequential, "device": device,
        "provider": dev_job.measurement.provider, "cpu_provider": cpu_job.measurement.provider, "iobinding_runs": bound["runs"],
        "sites": len(cpu_stats), **stat_diffs(dev_stats, cpu_stats, {k: r.var for k, r in cpu_job.measurement.references.items()}),
        "max_weight_diff": weight_diff(dev_w, cpu_w),
        "cpu_top1": cpu_eval["top1"], "dev_top1": dev_eval["top1"], "cpu_dense_agreement": cpu_eval["agreement"],
        "cpu_vs_dev_agreement": cross["agreement"], "cpu_vs_dev_logit_rel_l2": cross["logit_rel_l2"],
        "cpu_s": cpu_s, "dev_s": dev_s,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (default: %(default)s)")
    p.add_argument("--models", default="resnet20_bn,resnet20,resnet50s_bn,resnet50s,mobilenetv2_bn,vgg_bn_bn")
    p.add_argument("--methods", default="bn,asr")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--no-tf32", action="store_true", help="CUDA sessions in full float32 (onnxruntime's use_tf32=0)")
    args = p.parse_args(argv)
    import onnxruntime as ort

    if args.no_tf32:
        init = ort.InferenceSession.__init__

        def fp32_init(self, model, options=None, providers=None, **kw):  # the provider's own option, set per session
            providers = [(name, {"use_tf32": "0"}) if name == "CUDAExecutionProvider" else name
                         for name in providers or []]
            init(self, model, options, providers=providers, **kw)

        ort.InferenceSession.__init__ = fp32_init

    print(f"onnxruntime {ort.__version__}: {ort.get_available_providers()}", flush=True)
    rows = []
    for name in args.models.split(","):
        for method in args.methods.split(","):
            for sequential in (False, True) if method == "bn" and name == "resnet20_bn" else (False,):
                row = check(name, method, args.device, sequential)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    header = ("| model | method | provider | IO-bound runs | max diff mean / var / weight | collapsed channels "
              "| top-1 cpu / dev | agreement cpu-dev | logit rel. L2 cpu-dev |")
    print("\n" + header + "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        seq = " seq" if r["sequential"] else ""
        diffs = f"{r['max_mean_diff']:.1e} / {r['max_var_diff']:.1e} / {r['max_weight_diff']:.1e}"
        top1 = f"{100 * r['cpu_top1']:.2f} / {100 * r['dev_top1']:.2f}"
        print(f"| {r['model']} | {r['method']}{seq} | {r['provider']} | {r['iobinding_runs']} | {diffs} | "
              f"{r['dead_channels']} | {top1} | {100 * r['cpu_vs_dev_agreement']:.2f}% | "
              f"{r['cpu_vs_dev_logit_rel_l2']:.1e} |")


if __name__ == "__main__":
    main()
