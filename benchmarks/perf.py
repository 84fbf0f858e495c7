"""Performance benchmark of asr-onnx (issue 5): repair versus one plain onnxruntime pass.

For each model it measures, in fresh subprocesses and alternating:

* plain:  one onnxruntime inference pass of the dense model over the calibration set (session from the
          model file, batches sliced from the memory-mapped .npy), with the same batch size, threads and
          provider as the repair;
* repair: ``Repair(model).prune(0.9).measure(calib).correct(method).fold().save(out)``, calibration set
          opened with ``asr_onnx.calib.load_calib`` over the same .npy file, stage by stage;
* torch:  a PyTorch eager reference of the same repair on the same network and data (global magnitude
          pruning of Conv/Linear weights to 90%, a dense statistics pass with forward hooks, a train-mode BN
          recalibration pass with momentum=None plus per-channel variances for ASR, gains, save).

Each run reports wall time (total, from the first line of the subprocess, imports included, and by stage)
and peak memory: VmHWM (peak resident set, which includes the touched pages of the memory-mapped data) and
the peak of RssAnon sampled every 5 ms (anonymous memory only: model, activations, statistics).
Figures are medians over ``--runs`` runs; ratios are median(repair) / median(plain).

It also runs: a growth check (repair at several calibration-set sizes), ``asr-onnx --help`` wall time,
and global-magnitude pruning time on the 25.6M-parameter ResNet-50.

Examples:
    python benchmarks/perf.py                                       # everything, defaults below
    python benchmarks/perf.py --models resnet20_bn --samples 256 --runs 1 --no-growth --no-host
    python benchmarks/perf.py --models resnet50_224_bn --samples 256 --runs 3

Models: a name from sample_models/ (resnet50s_bn, resnet50s, resnet20_bn, ...), or resnet50_224_bn /
resnet50_224 (exported on first use by benchmarks/make_resnet50.py into the cache folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLES = ROOT / "sample_models"
R50 = ("resnet50_224_bn", "resnet50_224")


# ------------------------------------------------------------------------------------------- memory


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


class PeakSampler:
    """Samples RssAnon every ``interval`` seconds on a daemon thread; VmHWM comes from the kernel."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_anon, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))

    def result(self) -> dict:
        import resource

        status = _status()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"vmhwm_mb": status["VmHWM"] / 1024, "peak_anon_mb": self.peak_anon / 1024,
                "ru_maxrss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


# Stage times come from the repair's own report (``timings_s``), so nothing of the library is patched and a
# rename cannot silently break a figure. The only variant is "asis", the library as committed (the first
# landing's patched variants are in git history, commit 2124b00 and before).


# ------------------------------------------------------------------------------------------- children


def child_plain(args, t0: float) -> dict:
    import numpy as np
    import onnxruntime as ort

    t_import = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = args.threads
    wanted = ["CPUExecutionProvider"] if args.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(args.model, options, providers=wanted)
    t_session = time.perf_counter()
    data = np.load(args.data, mmap_mode="r")
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    for start in range(0, len(data), args.batch_size):
        session.run(outputs, {name: np.ascontiguousarray(data[start : start + args.batch_size])})
    t_end = time.perf_counter()
    return {"total": t_end - t0, "stages": {"import": t_import - t0, "session": t_session - t_import,
                                            "run": t_end - t_session}, "samples": len(data)}


def child_repair(args, t0: float) -> dict:
    import numpy as np
    import onnxruntime as ort

    from asr_onnx.calib import load_calib
    from asr_onnx.pipeline.driver import Repair

    t_import = time.perf_counter()
    largest = {"elements": 0}
    run, copy_out = ort.InferenceSession.run, ort.IOBinding.copy_outputs_to_cpu

    def watched_run(self, *a, **k):  # the largest tensor that leaves a session, per batch (onnxruntime's API)
        values = run(self, *a, **k)
        largest["elements"] = max([largest["elements"]] + [int(np.size(v)) for v in values])
        return values

    def watched_copy(self):  # the same, for runs fed through IO binding (CUDA)
        values = copy_out(self)
        largest["elements"] = max([largest["elements"]] + [int(np.size(v)) for v in values])
        return values

    ort.InferenceSession.run, ort.IOBinding.copy_outputs_to_cpu = watched_run, watched_copy
    job = Repair(args.model, device=args.device, batch_size=args.batch_size, progress=False, threads=args.threads)
    t_load = time.perf_counter()
    calib = load_calib(args.data, job.specs)
    t_calib = time.perf_counter()
    job.prune(args.sparsity, allocation=args.allocation)
    if args.reconstruct != "none":  # issue 13: the least-squares refit, its Gram and solve times in the stages
        job.reconstruct(calib, args.reconstruct, samples=args.refit_samples)
    job.measure(calib).correct(args.method).fold()
    with tempfile.TemporaryDirectory(prefix="asr-perf.") as folder:
        job.save(Path(folder) / "out.onnx")
        t_end = time.perf_counter()
    report = job.report()  # the library's own stage timings, and what each site measured
    stages = {"import": t_import - t0, "load": t_load - t_import, "calib_open": t_calib - t_load}
    stages.update(report["timings_s"])
    sites = report["sites"]
    return {"total": t_end - t0, "stages": stages, "samples": len(calib), "largest_output": largest["elements"],
            "max_channels": max(site["channels"] for site in sites), "sites": len(sites),
            "dense_sites": sum("dense_var" in site for site in sites)}


def child_torch(args, t0: float) -> dict:
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    t_import = time.perf_counter()
    model = _torch_model(args.torch_name)
    model.eval()
    t_load = time.perf_counter()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    prunable = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        # global magnitude pruning of every Conv/Linear weight, as asr-onnx's "global" pattern
        scores = torch.cat([m.weight.detach().abs().flatten() for m in prunable])
        k = round(args.sparsity * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k else scores.min() - 1
        masks = [m.weight.abs() > threshold for m in prunable]
        t_prune = time.perf_counter()

        current = {}

        def hook(module, inputs):  # per-channel mean and centred sum of squares of the BN input
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            m2 = (x - mean[None, :, None, None]).pow(2).sum(dim=(0, 2, 3))
            current.setdefault(module, []).append((x.numel() / x.shape[1], mean.double(), m2.double()))

        handles = [bn.register_forward_pre_hook(hook) for bn in bns]
        data = np.load(args.data, mmap_mode="r")

        def run_pass():
            for start in range(0, len(data), args.batch_size):
                model(torch.from_numpy(np.ascontiguousarray(data[start : start + args.batch_size])))

        run_pass()  # dense statistics
        dense = {m: _merged_var(v) for m, v in current.items()}  # a virtual site's reference (none in these nets)
        t_dense = time.perf_counter()

        current.clear()
        for m, mask in zip(prunable, masks):
            m.weight.mul_(mask)
        reference = {bn: bn.running_var.double().clone() for bn in bns}  # a BN site's reference variance
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the whole set
        model.train()
        run_pass()  # pruned statistics and BN recalibration at once
        model.eval()
        pruned = {m: _merged_var(v) for m, v in current.items()}
        t_pruned = time.perf_counter()

        for h in handles:
            h.remove()
        for bn in bns:  # ASR as asr_onnx.correct.gains.asr_gain: the full gain, shrunk where the variance collapsed
            ref, rec = reference[bn], pruned[bn]
            full = torch.sqrt((ref + bn.eps) / (rec + bn.eps))
            shrink = rec / (rec + max(float(rec.median()), bn.eps))
            bn.weight.mul_((shrink * full + (1 - shrink)).float())
        t_correct = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asr-perf.") as folder:
        torch.save(model.state_dict(), Path(folder) / "out.pt")
        t_end = time.perf_counter()
    stages = {"import": t_import - t0, "load": t_load - t_import, "prune": t_prune - t_load,
              "measure_dense": t_dense - t_prune, "measure_pruned": t_pruned - t_dense,
              "correct": t_correct - t_pruned, "save": t_end - t_correct}
    return {"total": t_end - t0, "stages": stages, "samples": len(data), "sites": len(dense)}


def _merged_var(batches):
    """Chan's merge of per-batch (count, mean, m2), as asr_onnx.measure.stats.merge_all; unbiased variance."""
    count, mean, m2 = batches[0]
    for n, bmean, bm2 in batches[1:]:
        total = count + n
        delta = bmean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + bm2 + delta**2 * (count * n / total)
        count = total
    return m2 / max(count - 1, 1)


def _torch_model(name: str):
    """The torch network behind a benchmark model: trained weights where sample_models has them."""
    import torch

    if name in R50:
        sys.path.insert(0, str(HERE))
        import make_resnet50

        model = make_resnet50.ResNet50()
        state = Path(os.environ["ASR_PERF_CACHE"]) / "resnet50_224.pt"
        model.load_state_dict(torch.load(state, map_location="cpu"))
        return model
    sys.path.insert(0, str(SAMPLES))
    import train

    base = name.removesuffix("_bn")
    if (SAMPLES / f"{base}.pt").exists():
        return train.load_trained(base)
    return train.build_model(base)  # untrained: same architecture and cost


def child_prune(args, t0: float) -> dict:
    """Host work: global_masks over the model's prunable weights, and the whole Repair.prune stage."""
    import numpy as np

    from asr_onnx.model.graph import find_layers, to_graph
    from asr_onnx.pipeline.driver import Repair
    from asr_onnx.prune.masks import global_masks

    job = Repair(args.model, device="cpu", progress=False)
    weights = [layer.weight.values for layer in find_layers(to_graph(job.dense))]
    masks_s, stage_s = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        global_masks(weights, args.sparsity)
        masks_s.append(time.perf_counter() - start)
    for _ in range(args.repeat):
        fresh = Repair(job.dense, device="cpu", progress=False)
        fresh.prune(args.sparsity)
        stage_s.append(fresh.timings["prune"])
    return {"params": int(sum(np.size(w) for w in weights)), "global_masks": masks_s, "prune_stage": stage_s}


CHILDREN = {"plain": child_plain, "repair": child_repair, "torch": child_torch, "prune": child_prune}


def child_main(args):
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        result = CHILDREN[args.one](args, t0)
    result.update(sampler.result())
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------- parent


def spawn(kind: str, args, model: str, data: str | None = None, torch_name: str | None = None,
          variant: str = "asis", **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", kind, "--model", model,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--sparsity", str(args.sparsity),
           "--method", args.method, "--variant", variant, "--device", args.device, "--reconstruct", args.reconstruct,
           "--allocation", args.allocation, "--refit-samples", str(args.refit_samples)]
    if data:
        cmd += ["--data", data]
    if torch_name:
        cmd += ["--torch-name", torch_name]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, ASR_PERF_CACHE=str(args.cache), OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{kind} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    result["process_wall"] = wall
    return result


def model_path(name: str, args) -> Path:
    if name in R50:
        sys.path.insert(0, str(HERE))
        import make_resnet50

        return Path(make_resnet50.make(args.cache)[name])
    path = SAMPLES / f"{name}.onnx"
    if not path.exists():
        raise SystemExit(f"no model {path}")
    return path


def input_shape(path: Path) -> tuple:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    return tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])


def data_file(shape: tuple, count: int, args) -> Path:
    """``count`` random float32 samples of ``shape`` in one .npy (cached), written in chunks."""
    import numpy as np

    path = Path(args.cache) / f"calib_{'x'.join(map(str, shape))}_{count}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        tmp = path.with_suffix(".tmp.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, *shape))
        for start in range(0, count, 64):
            stop = min(count, start + 64)
            array[start:stop] = rng.standard_normal((stop - start, *shape), dtype=np.float32)
        array.flush()
        del array
        os.replace(tmp, path)
    return path


def warm(*paths: Path):
    """Reads files once so that every measured run finds them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def median(values):
    return statistics.median(values) if values else float("nan")


def bench_model(name: str, args) -> dict:
    path = model_path(name, args)
    count = args.samples_224 if name in R50 else args.samples
    data = data_file(input_shape(path), count, args)
    warm(path, data)
    kinds = ["plain"] + [f"repair:{v}" for v in args.variants] + ([] if args.no_torch else ["torch"])
    runs = {kind: [] for kind in kinds}
    for i in range(args.runs):
        for kind in kinds:
            if kind == "torch" and i >= (args.runs if args.torch_runs is None else args.torch_runs):
                continue
            child, _, variant = kind.partition(":")
            result = spawn(child, args, str(path), str(data), torch_name=name, variant=variant or "asis")
            runs[kind].append(result)
            mem = f"VmHWM {result['vmhwm_mb']:.0f} MB, anon {result['peak_anon_mb']:.0f} MB, cpu {result['cpu_s']:.1f} s"
            print(f"  [{name} run {i + 1}/{args.runs}] {kind:26s} {result['total']:7.2f} s  {mem}", flush=True)
    return {"name": name, "path": str(path), "samples": count, "runs": runs}


def bench_growth(args) -> dict:
    path = model_path(args.growth_model, args)
    shape = input_shape(path)
    out = []
    for count in args.growth:
        data = data_file(shape, count, args)
        warm(path, data)
        for _ in range(args.growth_runs):
            for kind in ("plain", "repair"):
                result = spawn(kind, args, str(path), str(data), variant=args.variants[0])
                out.append({"kind": kind, "samples": count, **result})
                print(f"  [growth {args.growth_model} n={count}] {kind:6s} {result['total']:7.2f} s  "
                      f"VmHWM {result['vmhwm_mb']:.0f} MB", flush=True)
    return {"model": args.growth_model, "points": out}


def bench_help(args) -> list[float]:
    exe = Path(sys.executable).with_name("asr-onnx")
    cmd = [str(exe) if exe.exists() else "asr-onnx", "--help"]
    times = []
    for _ in range(args.help_runs + 1):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first run warms the page cache


def bench_host(args) -> dict:
    path = model_path(args.host_model, args)
    return spawn("prune", args, str(path), repeat=args.host_runs)


# ------------------------------------------------------------------------------------------- report


STAGES = ("import", "load", "calib_open", "prune", "measure_dense", "measure_pruned", "correct", "fold", "save")


def _join(results, key="total"):
    return ", ".join(f"{r[key]:.2f}" for r in results)


def _stage_median(results, stage):
    return median([r["stages"].get(stage, 0.0) for r in results])


def machine() -> dict:
    import onnxruntime

    info = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "cores": os.cpu_count()}
    try:
        import onnx
        import torch

        info.update(onnx=onnx.__version__, torch=torch.__version__)
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:  # the GPU, where there is one
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False, timeout=30).stdout.strip()
        if smi:
            info["gpu"] = smi
    except (OSError, subprocess.SubprocessError):
        pass
    with open("/proc/meminfo") as f:
        info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    info["loadavg_at_start"] = os.getloadavg()
    return info


def _model_report(bench: dict) -> list[str]:
    runs = bench["runs"]
    plain, torch_ = runs["plain"], runs.get("torch", [])
    repairs = [(k.partition(":")[2], v) for k, v in runs.items() if k.startswith("repair")]
    cols = [("plain ORT", plain)] + [(f"repair ({v})", r) for v, r in repairs] + ([("torch eager ref", torch_)]
                                                                                  if torch_ else [])

    def med(results, key):
        return median([r[key] for r in results])

    def row(label, fn, fmt="{:.2f}", ratio=True):
        cells = []
        base = fn(plain)
        for name, results in cols:
            value = fn(results)
            cell = fmt.format(value)
            if ratio and name != "plain ORT":
                cell += f" ({value / base:.2f}x)"
            cells.append(cell)
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [f"### {bench['name']} ({bench['samples']} samples)", "",
             "| median of runs | " + " | ".join(name for name, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
             row("wall time, s (x plain)", lambda r: med(r, "total")),
             row("wall time without imports, s", lambda r: med(r, "total") - _stage_median(r, "import")),
             row("CPU time (user+sys), s", lambda r: med(r, "cpu_s")),
             row("peak RSS (VmHWM), MB", lambda r: med(r, "vmhwm_mb"), "{:.0f}"),
             row("peak anonymous RSS, MB", lambda r: med(r, "peak_anon_mb"), "{:.0f}"),
             "| all runs, wall s | " + " | ".join(_join(r) for _, r in cols) + " |",
             "| all runs, VmHWM MB | " + " | ".join(", ".join(f"{x['vmhwm_mb']:.0f}" for x in r) for _, r in cols) + " |",
             "", "| stage, s (median) | " + " | ".join(name for name, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    plain_map = {"import": "import", "load": "session", "measure_dense": "run"}
    for stage in STAGES:
        cells = []
        for _name, results in cols:
            key = plain_map.get(stage) if results is plain else stage
            present = key is not None and any(key in r["stages"] for r in results)
            cells.append(f"{_stage_median(results, key):.2f}" if present else "")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    for variant, results in repairs:
        r0 = results[0]
        lines.append(f"repair ({variant}): the largest tensor out of any session per batch had "
                     f"{r0['largest_output']} elements (largest per-channel vector: {r0['max_channels']} channels; "
                     f"{r0['sites']} sites in the pruned pass, {r0.get('dense_sites', r0['sites'])} in the dense pass).")
    lines += ["", "Plain: the 'load' row is session creation and the 'measure_dense' row the inference loop.", ""]
    return lines


def report(results: dict, args) -> str:
    lines = []
    m = results["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    machine_line = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM{gpu}; Python {m['python']}, "
                    f"onnxruntime {m['onnxruntime']}, onnx {m.get('onnx')}, torch {m.get('torch')}; "
                    f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.")
    torch_runs = f", PyTorch reference {args.torch_runs} run(s)" if args.torch_runs is not None else ""
    provider = results.get("provider", "CPUExecutionProvider")
    settings = (f"Settings: batch {args.batch_size}, {args.threads} intra-op threads, {provider}, "
                f"sparsity {args.sparsity}, method {args.method}, {args.runs} runs each (medians){torch_runs}.")
    lines += [machine_line, settings, ""]
    for bench in results["models"]:
        lines += _model_report(bench)
    if results.get("growth"):
        g = results["growth"]
        header = ("| samples | plain, s | repair, s | repair s/sample, ms | plain VmHWM, MB | repair VmHWM, MB "
                  "| repair anon peak, MB |")
        lines += [f"### Growth: {g['model']} (repair {args.variants[0]})", "", header, "|---|---|---|---|---|---|---|"]
        counts = sorted({p["samples"] for p in g["points"]})
        xs, ys = [], []
        for n in counts:
            pl = [p for p in g["points"] if p["samples"] == n and p["kind"] == "plain"]
            rp = [p for p in g["points"] if p["samples"] == n and p["kind"] == "repair"]
            t = median([p["total"] for p in rp])
            xs.append(n)
            ys.append(t)
            tp, hp = median([p["total"] for p in pl]), median([p["vmhwm_mb"] for p in pl])
            hr, ar = median([p["vmhwm_mb"] for p in rp]), median([p["peak_anon_mb"] for p in rp])
            lines.append(f"| {n} | {tp:.2f} | {t:.2f} | {1000 * t / n:.2f} | {hp:.0f} | {hr:.0f} | {ar:.0f} |")
        if len(xs) >= 2:
            import numpy as np

            slope, intercept = np.polyfit(xs, ys, 1)
            fit = np.polyval([slope, intercept], xs)
            r2 = 1 - np.sum((np.array(ys) - fit) ** 2) / max(np.sum((np.array(ys) - np.mean(ys)) ** 2), 1e-12)
            lines += ["", f"Linear fit: repair = {intercept:.2f} s + {1000 * slope:.2f} ms x samples (R^2 = {r2:.4f})."]
        lines.append("")
    if results.get("help"):
        h = results["help"]
        lines += [f"`asr-onnx --help`: median {median(h):.3f} s over {len(h)} runs ({', '.join(f'{x:.3f}' for x in h)}).",
                  ""]
    if results.get("host"):
        h = results["host"]
        host_line = (f"Host work on {args.host_model} ({h['params'] / 1e6:.1f}M prunable parameters): "
                     f"global_masks median {median(h['global_masks']):.2f} s "
                     f"({', '.join(f'{x:.2f}' for x in h['global_masks'])}); whole Repair.prune stage median "
                     f"{median(h['prune_stage']):.2f} s ({', '.join(f'{x:.2f}' for x in h['prune_stage'])}).")
        lines += [host_line, ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50s_bn,resnet50s,resnet50_224_bn",
                   help="comma-separated model names (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (default: %(default)s)")
    p.add_argument("--samples-224", type=int, default=1024, help="calibration samples for the 224x224 ResNet-50")
    p.add_argument("--runs", type=int, default=3, help="runs of each kind per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ORT and torch (default: 2)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="provider of both the plain pass and the repair (default: %(default)s)")
    p.add_argument("--method", default="asr")
    p.add_argument("--reconstruct", default="none", choices=["none", "ls"], help="the repair's --reconstruct")
    p.add_argument("--refit-samples", type=int, default=0, help="the repair's --refit-samples (0: all)")
    p.add_argument("--allocation", default="global", choices=["global", "lamp", "uniform"],
                   help="the repair's --allocation")
    p.add_argument("--variants", default="asis",
                   help="repair variants; only asis (the library as committed) remains (default: %(default)s)")
    p.add_argument("--variant", default="asis", help=argparse.SUPPRESS)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference")
    p.add_argument("--torch-runs", type=int, help="runs of the PyTorch reference (default: --runs)")
    p.add_argument("--growth", default="256,512,1024", help="calibration sizes of the growth check ('' to skip)")
    p.add_argument("--growth-model", default="resnet50s_bn")
    p.add_argument("--growth-runs", type=int, default=1)
    p.add_argument("--no-growth", action="store_true")
    p.add_argument("--help-runs", type=int, default=5)
    p.add_argument("--host-model", default="resnet50_224", help="model of the pruning-time check")
    p.add_argument("--host-runs", type=int, default=3)
    p.add_argument("--no-host", action="store_true", help="skip the --help and pruning-time checks")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "asr-onnx-bench"),
                   help="folder for exported models and calibration data (default: %(default)s)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--markdown", help="also write the report here")
    # child mode
    p.add_argument("--one", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--torch-name", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v != "asis" for v in args.variants):
        p.error("--variants: only asis remains (the first landing's candidate fixes are in the library)")
    args.growth = [int(x) for x in args.growth.split(",") if x.strip()] if not args.no_growth else []
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return child_main(args)
    os.makedirs(args.cache, exist_ok=True)
    started = time.perf_counter()
    from asr_onnx.model.session import providers

    results = {"machine": machine(), "provider": providers(args.device)[0],
               "args": {k: v for k, v in vars(args).items() if k != "one"}, "models": []}
    print(f"machine: {results['machine']}", flush=True)
    if not args.no_host:
        results["help"] = bench_help(args)
        print(f"  asr-onnx --help: {', '.join(f'{x:.3f}' for x in results['help'])} s", flush=True)
        results["host"] = bench_host(args)
        print(f"  host prune: {results['host']}", flush=True)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        results["models"].append(bench_model(name, args))
        print("\n" + "\n".join(_model_report(results["models"][-1])), flush=True)
        if args.json:  # partial results survive an interrupted run
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.growth:
        results["growth"] = bench_growth(args)
    results["load_at_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - started
    text = report(results, args)
    print("\n" + text)
    print(f"elapsed {results['elapsed_s']:.0f} s; load average at end {results['load_at_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
