"""Measured onnxruntime speed of a model, against a reference model in the same run.

Both sessions are made first; each is then run ``warmup`` times (not timed), then the timed runs
alternate between the two models, the first model of each round swapping from one round to the next
(ABBAAB...), so that a slow drift of the machine (another job, the CPU's clock) falls on both alike.
Every run feeds the same seeded random batch. Figures are medians with the interquartile range.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import onnx

from asr_onnx.errors import AsrError, first_line

MODEL, REFERENCE, FLOAT = "model", "reference", "float"
FEED_SHARE = 4  # the random batch may take this fraction (1/4) of the memory available: onnxruntime's activations
# and the model's outputs need more beside it, usually several times the input of a CNN
CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def bench(model, reference=None, *, float_model=None, batch_size: int | None = None, threads: int = 0,
          device: str = "cpu", runs: int = 30, warmup: int = 5, seed: int = 0, input_shapes: dict | None = None) -> dict:
    """Median latency and throughput of ``model`` in onnxruntime, and of ``reference`` alternating with it.

    Args:
        model: the model to time (an onnx.ModelProto or a path).
        reference: a model with the same inputs (the dense one) to time alternately in the same run, or
            None. Defaults to None.
        float_model: a second reference, the float model an int8 ``model`` was quantized from (the sparse
            float32 one), timed alternately too, or None. Defaults to None.
        batch_size: samples per run, for a dynamic batch axis; a fixed batch must equal it. Defaults to None:
            the batch of ``input_shapes``, else 1.
        threads: onnxruntime intra-op threads; 0 lets onnxruntime choose. Defaults to 0.
        device: "cpu", "cuda" or "auto" (see runtime.providers). Defaults to "cpu".
        runs: timed runs per model. Defaults to 30.
        warmup: untimed runs per model before the first timed one. Defaults to 5.
        seed: seed of the random input batch. Defaults to 0.
        input_shapes: input name -> the shape to feed it (batch axis first), for inputs with axes that are
            not fixed, e.g. a detector's (N, 3, H, W); see :func:`parse_input_shapes`. Defaults to None.

    Returns:
        {"settings", "models": {"model": stats[, "reference": stats][, "float": stats]}, "schedule": the
        order of the timed runs, "speedup": reference median / model median (or None), "output_rel_l2":
        relative L2 distance of the model's outputs from the reference's on the timed batch (or None),
        "speedup_float" and "output_rel_l2_float": the same against ``float_model`` (with one), "trtexec"}.
        Each stats dict has "path", "provider", "precision" ("float32", "float16" or "int8 (QDQ)"), "runtime"
        (the runtimes its form is for), "latency_ms" {"median", "q1", "q3", "iqr", "min"}, "throughput"
        (samples/s at the median), "runs_ms" (every timed run).

    Raises:
        AsrError: a model that cannot be read or run, inputs that differ between the two models, a
            non-batch axis that is not fixed and not given, a given shape that does not fit its input, a fixed
            batch other than ``batch_size``, a count < 1, or a batch over a quarter of the available memory.
    """
    from asr_onnx.calib import input_specs
    from asr_onnx.model.files import load_model
    from asr_onnx.model.session import make_session, provider_of, runner

    batch_size = shapes_batch(input_shapes or {}, batch_size)
    if batch_size < 1 or runs < 1 or warmup < 0 or threads < 0:
        raise AsrError("bench needs batch_size >= 1, runs >= 1, warmup >= 0 and threads >= 0")
    protos, paths = {}, {}
    for key, value in ((MODEL, model), (REFERENCE, reference), (FLOAT, float_model)):
        if value is None:
            continue
        paths[key] = None if isinstance(value, onnx.ModelProto) else str(value)
        protos[key] = value if isinstance(value, onnx.ModelProto) else load_model(value)
    specs = input_specs(protos[MODEL])
    check_feed_size(specs, batch_size, shapes=input_shapes)
    feed = random_feed(specs, batch_size, seed, input_shapes)
    for key in (REFERENCE, FLOAT):
        if key in protos:
            _check_same_inputs(specs, input_specs(protos[key]))
    sessions = {key: make_session(proto, device=device, threads=threads) for key, proto in protos.items()}
    run_fns = {key: runner(session) for key, session in sessions.items()}
    names = {key: [o.name for o in session.get_outputs()] for key, session in sessions.items()}

    def run_once(key):
        try:
            return run_fns[key](names[key], feed)
        except Exception as e:  # a shape the graph rejects, a kernel failure: one line
            raise AsrError(f"onnxruntime cannot run the {key}: {type(e).__name__}: {first_line(e)}") from None

    outputs = {}
    for key in sessions:
        for _ in range(warmup):
            run_once(key)
    timings: dict[str, list[float]] = {key: [] for key in sessions}
    schedule = []
    for order in alternating_schedule(list(sessions), runs):
        for key in order:
            start = time.perf_counter()
            result = run_once(key)
            timings[key].append(1e3 * (time.perf_counter() - start))
            schedule.append(key)
            outputs.setdefault(key, result)
    stats = {key: {"path": paths[key], "provider": provider_of(sessions[key]), **precision_of(protos[key]),
                   **summarize(timings[key], batch_size)} for key in sessions}
    speedups, rel_l2 = {}, {}
    for key in (REFERENCE, FLOAT):
        if key in stats:
            speedups[key] = stats[key]["latency_ms"]["median"] / stats[MODEL]["latency_ms"]["median"]
            rel_l2[key] = output_rel_l2(outputs[MODEL], outputs[key])
    return {
        "settings": {"batch_size": batch_size, "threads": threads, "device": device, "runs": runs,
                     "warmup": warmup, "seed": seed, "onnxruntime": _ort_version()},
        "models": stats,
        "schedule": schedule,
        "speedup": speedups.get(REFERENCE),
        "output_rel_l2": rel_l2.get(REFERENCE),
        **({"speedup_float": speedups[FLOAT], "output_rel_l2_float": rel_l2[FLOAT]} if FLOAT in stats else {}),
        "trtexec": trtexec_command(protos[MODEL], paths[MODEL], feed),
    }


def precision_of(model: onnx.ModelProto) -> dict:
    """{"precision", "runtime"}: what a model computes in, and the runtimes its form is for."""
    from asr_onnx.model.qdq import quantized_tensors, runtime_of

    if quantized_tensors(model):
        return {"precision": "int8 (QDQ)", "runtime": runtime_of(model)}
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return {"precision": "float16" if half else "float32",
            "runtime": "any (TensorRT: --fp16)" if half else "any"}


def alternating_schedule(keys: list[str], runs: int) -> list[list[str]]:
    """``runs`` rounds over ``keys``, each round in the reverse order of the one before (AB, BA, AB...)."""
    return [keys if i % 2 == 0 else keys[::-1] for i in range(runs)]


def summarize(runs_ms: list[float], batch_size: int) -> dict:
    """Median, quartiles and minimum of the run times (ms), and the throughput at the median (samples/s)."""
    q1, median, q3 = (float(v) for v in np.percentile(runs_ms, [25, 50, 75]))
    return {"latency_ms": {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": float(min(runs_ms))},
            "throughput": batch_size / (median / 1e3), "runs_ms": [float(v) for v in runs_ms]}


def feed_shapes(specs, batch_size: int, given: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every input's batch. An input named in ``given`` takes that shape, which must keep every
    fixed axis; for the others a symbolic first axis takes ``batch_size``, a fixed one must equal it, and
    every other axis must be fixed.

    Raises:
        AsrError: a name in ``given`` that is no input, a scalar input, a fixed batch other than
            ``batch_size``, or a non-batch axis neither fixed nor given.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - {spec.name for spec in specs})
    if unknown:
        raise AsrError(f"--input-shapes names {', '.join(map(repr, unknown))}, not an input of the model "
                       f"(inputs: {', '.join(spec.name for spec in specs)})")
    shapes = {}
    for spec in specs:
        if not spec.shape:
            raise AsrError(f"input {spec.name!r} is a scalar; bench needs a batch axis")
        if spec.name in given:
            shapes[spec.name] = _given_shape(spec, given[spec.name])
            continue
        first, rest = spec.shape[0], spec.shape[1:]
        if isinstance(first, int) and first > 0 and first != batch_size:
            raise AsrError(f"input {spec.name!r} fixes a batch of {first}; pass --batch-size {first}")
        if any(not isinstance(d, int) or d < 1 for d in rest):
            raise AsrError(f"input {spec.name!r} has a non-batch axis that is not fixed {spec.describe()}; "
                           f"give every axis a size with --input-shapes {shape_example(spec, batch_size)}")
        shapes[spec.name] = (batch_size, *rest)
    return shapes


def check_feed_size(specs, batch_size: int, available: int | None = None, shapes: dict | None = None) -> int:
    """Refuses a batch that would take over 1/FEED_SHARE of the available memory, before it is allocated
    (a 3x100000x100000 input is 112 GiB a sample). Returns the batch's bytes.

    Args:
        specs: the model's inputs.
        batch_size: samples per run.
        available: bytes that can be allocated. Defaults to None: :func:`available_memory` (no bound where
            it is unknown).
        shapes: input name -> a shape given for it (``--input-shapes``). Defaults to None.

    Raises:
        AsrError: the batch is too large, or its shape cannot be filled (see :func:`feed_shapes`).
    """
    import math

    shapes = feed_shapes(specs, batch_size, shapes)
    # Python integers: no product of dims can overflow, however large
    size = sum(math.prod(shape) * spec.dtype.itemsize for spec, shape in zip(specs, shapes.values(), strict=True))
    available = available_memory() if available is None else available
    if available is not None and size * FEED_SHARE > available:
        shown = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())
        advice = "pass a smaller --batch-size" if batch_size > 1 else "one sample is too large to time here"
        raise AsrError(f"the random batch ({shown}) takes {_gib(size)}, over a quarter of the {_gib(available)} of "
                       f"memory available (onnxruntime needs several times the input beside it); {advice}")
    return size


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping: the kernel's MemAvailable, or less where the process's
    memory cgroup has less room left. None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path in CGROUP_LIMITS:
        try:
            with open(limit_path) as limit, open(usage_path) as usage:
                text = limit.read().strip()
                if text != "max":
                    found.append(max(int(text) - int(usage.read().strip()), 0))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _gib(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale / 8:
            return f"{size / scale:,.1f} {unit}"
    return f"{size} bytes"


def random_feed(specs, batch_size: int, seed: int = 0, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """A seeded standard-normal batch for every input (zeros for integer and boolean inputs), of the shapes
    of :func:`feed_shapes` (``shapes``: the given ones).
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for spec, shape in zip(specs, feed_shapes(specs, batch_size, shapes).values(), strict=True):
        if np.issubdtype(spec.dtype, np.floating):  # drawn in float32 where that holds it: no float64 copy
            drawn = np.float64 if spec.dtype.itemsize > 4 else np.float32
            feed[spec.name] = rng.standard_normal(shape, dtype=drawn).astype(spec.dtype, copy=False)
        else:
            feed[spec.name] = np.zeros(shape, spec.dtype)
    return feed


def shape_example(spec, batch_size: int = 1) -> str:
    """``name:[1,3,H,W]``: the --input-shapes entry for ``spec``, its unknown axes by name (H, W or ?)."""
    dims = [str(batch_size) if axis == 0 and not (isinstance(d, int) and d > 0) else
            str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?")
            for axis, d in enumerate(spec.shape)]
    return f"{spec.name}:[{','.join(dims)}]"


def _given_shape(spec, shape: tuple) -> tuple:
    if len(shape) != len(spec.shape):
        raise AsrError(f"--input-shapes gives {spec.name!r} {len(shape)} axes, but the input has "
                       f"{len(spec.shape)} {spec.describe()}")
    for axis, (given, dim) in enumerate(zip(shape, spec.shape)):
        if isinstance(dim, int) and dim > 0 and given != dim:
            raise AsrError(f"--input-shapes gives {spec.name!r} {given} on axis {axis}, which the input fixes at "
                           f"{dim} {spec.describe()}")
    return tuple(shape)


def shapes_batch(shapes: dict, batch_size: int | None) -> int:
    """The batch of a run: ``batch_size``, else the first axis the given shapes agree on, else 1.

    Raises:
        AsrError: the given shapes' first axes differ from each other or from ``batch_size``.
    """
    batches = {shape[0] for shape in shapes.values() if shape}
    if len(batches) > 1:
        raise AsrError(f"--input-shapes gives batches of {sorted(batches)}; the inputs of one run share a batch")
    if batch_size is None:
        return batches.pop() if batches else 1
    if batches and batches != {batch_size}:
        raise AsrError(f"--input-shapes gives a batch of {batches.pop()} but --batch-size is {batch_size}")
    return batch_size


def parse_input_shapes(values) -> dict[str, tuple[int, ...]]:
    """Input shapes as Polygraphy's ``--input-shapes`` writes them, ``name:[1,3,320,320]``, or as trtexec's
    ``--shapes``, ``name:1x3x320x320``; several in one value are separated by spaces or commas.

    The name is what comes before the last colon (TensorFlow names such as ``input:0`` keep theirs).

    Args:
        values: strings, each holding one or several entries.

    Raises:
        AsrError: an entry without a name or a shape, an axis that is not a positive integer, or a name
            given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in (part for value in values for part in _entries(str(value))):
        name, sep, text = entry.rpartition(":")
        if not sep or not name or not text:
            raise AsrError(f"--input-shapes entry {entry!r} is not NAME:[D,D,...] (e.g. images:[1,3,640,640])")
        dims = text[1:-1].split(",") if text.startswith("[") and text.endswith("]") else text.lower().split("x")
        try:
            shape = tuple(int(d) for d in dims)
        except ValueError:
            raise AsrError(f"--input-shapes entry {entry!r}: every axis needs a size, a positive integer") from None
        if not shape or min(shape) < 1:
            raise AsrError(f"--input-shapes entry {entry!r}: every axis needs a size, a positive integer")
        if name in shapes:
            raise AsrError(f"--input-shapes gives {name!r} twice")
        shapes[name] = shape
    return shapes


def _entries(text: str) -> list[str]:
    """``text`` cut at spaces and commas outside brackets."""
    entries, current, depth = [], "", 0
    for char in text:
        depth += (char == "[") - (char == "]")
        if depth == 0 and (char == "," or char.isspace()):
            entries.append(current)
            current = ""
        elif not char.isspace():
            current += char
    return [entry for entry in entries + [current] if entry]


def _check_same_inputs(model_specs, reference_specs) -> None:
    def text(specs):
        return ", ".join(f"{s.name} {s.dtype} {s.describe()}" for s in specs)

    def key(specs):
        return sorted((s.name, str(s.dtype), tuple(d if isinstance(d, int) else None for d in s.shape)) for s in specs)

    if key(model_specs) != key(reference_specs):
        raise AsrError(f"the model and the reference have different inputs: {text(model_specs)} against "
                       f"{text(reference_specs)}")


def output_rel_l2(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float | None:
    """||model - reference|| / ||reference|| over all outputs together; None when their shapes differ."""
    from asr_onnx.verify.scoring import logit_rel_l2

    if len(outputs) != len(reference) or any(a.shape != b.shape for a, b in zip(outputs, reference, strict=True)):
        return None
    err2 = [np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(outputs, reference, strict=True)]
    return logit_rel_l2(np.array(err2), sum(float(np.sum(b.astype(np.float64) ** 2)) for b in reference))


def trtexec_command(model: onnx.ModelProto, path: str | None, feed: dict) -> dict:
    """Where ``trtexec`` is (None when it is not on PATH), and the command line to time the model with it.

    ``--sparsity=enable`` is added when some layer's weights already follow TensorRT's 2:4 pattern
    (never ``force``, which would prune again without repair; for a QDQ model, read on its integer
    codes); ``--fp16`` because sparse tensor cores need reduced precision, and ``--int8`` for a QDQ model.
    """
    from asr_onnx.prune.sparsecore import layer_rows

    found = shutil.which("trtexec")
    shapes = ",".join(f"{name}:{'x'.join(str(d) for d in value.shape)}" for name, value in feed.items())
    rows = layer_rows(model)
    has_24 = any(row["nm_24"] == "yes" and row["eligible"] for row in rows)
    parts = ["trtexec", f"--onnx={path or 'MODEL.onnx'}", f"--shapes={shapes}", "--fp16"]
    if any(row.get("precision") == "int8" for row in rows):
        parts.append("--int8")
    if has_24:
        parts.append("--sparsity=enable")
    parts += ["--warmUp=500", "--iterations=100"]
    return {"found": found, "sparse_24": has_24, "command": " ".join(parts) if found else None}


def format_bench(result: dict) -> str:
    """The terminal summary of :func:`bench`: one line per model, the speed-up, and the trtexec line."""
    s = result["settings"]
    lines = [f"batch {s['batch_size']}, threads {s['threads'] or 'auto'}, {s['runs']} alternating runs per model "
             f"after {s['warmup']} warm-up runs, onnxruntime {s['onnxruntime']}"]
    for key, stats in result["models"].items():
        lat = stats["latency_ms"]
        lines.append(f"{key:9s} {lat['median']:9.3f} ms median (IQR {lat['q1']:.3f}-{lat['q3']:.3f})  "
                     f"{stats['throughput']:10.1f} samples/s  {stats['provider']}  {stats['precision']}  "
                     f"{stats['path'] or ''}".rstrip())
    for key, stats in result["models"].items():
        if stats["precision"] != "float32":
            lines.append(f"{key:9s} is {stats['precision']}, for {stats['runtime']}")
    if result["speedup"] is not None:
        lines.append(f"speed-up {result['speedup']:.2f}x (reference median / model median)")
    if result.get("speedup_float") is not None:
        lines.append(f"speed-up {result['speedup_float']:.2f}x against float (float median / model median)")
    trt = result["trtexec"]
    lines.append(f"TensorRT: {trt['command']}" if trt["found"] else "TensorRT: trtexec not found on PATH")
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
