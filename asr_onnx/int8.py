"""INT8 output: the repaired model quantized to QDQ form by onnxruntime's own static quantizer.

Weights are int8, one symmetric scale per output channel, so 0 is exactly code 0 and every pruned weight
stays zero (checked, with TensorRT's 2:4 pattern, on the integer codes before anything is written).
Activations are calibrated on the calibration set the repair used. What the quantizer is asked for
depends on where the model will run (``target``):

- ``cpu``: onnxruntime's CPU kernels: uint8 activations with a zero point (a Relu after a Conv is then
  the quantizer's clip), and full-range (127) or reduced-range (63) weights. Without AVX-512 VNNI, x86's
  8-bit dot product (AVX2 ``vpmaddubsw``) saturates its 16-bit pair sums with full-range weights; the
  held-out score, run in onnxruntime on this machine, finds out which one this CPU needs.
- ``tensorrt``: TensorRT's explicit quantization: symmetric int8 activations (zero point 0) and
  full-range weights, scored with the QDQ arithmetic emulated in float (onnxruntime without graph
  optimisations), which is what TensorRT computes up to its kernels' rounding.

The calibration method (MinMax, Percentile, Entropy) and, for the CPU, the weight range are chosen on
held-out calibration data: each candidate is calibrated on half of the set and scored against the float
repaired model on the other half (:func:`asr_onnx.select.pick`: top-1 agreement first, then logit error;
MinMax where they tie). So is the quantization correction of :mod:`asr_onnx.quantize_correct` ("bn": each
layer's per-channel mean and variance mapped back onto the float model's, folded into its bias and weight
scales), against plain post-training quantization, by the guard's rule (:func:`correction_verdict`).
The winner is then made with the whole set.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import AsrError, first_line
from .quantize_correct import CORRECTIONS, dequantize_weights, quantized_tensors

TARGETS = ("cpu", "tensorrt")
CALIBRATIONS = ("MinMax", "Percentile", "Entropy")
WEIGHT_RANGES = ("full", "reduced")
CALIB_BATCH = 64  # samples per calibration run
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis
ERROR_SAMPLES = 256  # calibration samples the per-layer output errors are measured on
CORRECTION_SAMPLES = 512  # samples the correction measures: its cost is one pass per depth of layers
CORRECTION_RULE = ("as the guard decides a repair: the correction is kept when it is better than plain PTQ past two "
                   "paired standard errors (top-1 agreement first, then each sample's squared error), or, within "
                   "noise, when its held-out error is lower")
RUNTIMES = {"cpu": "onnxruntime on the CPU (QDQ: integer kernels)",
            "tensorrt": "TensorRT (explicit quantization: trtexec --int8)"}


@dataclass(frozen=True)
class Recipe:
    """What onnxruntime's quantizer is asked for.

    Attributes:
        calibration: "MinMax", "Percentile" or "Entropy".
        weights: "full" (int8 codes up to 127) or "reduced" (up to 63: onnxruntime's ``reduce_range``).
        target: "cpu" or "tensorrt" (see the module docstring).
    """

    calibration: str = "MinMax"
    weights: str = "full"
    target: str = "cpu"

    def as_dict(self) -> dict:
        return {"calibration": self.calibration, "weights": self.weights}


def check_options(target: str, calibration: str, correction: str) -> None:
    """Refuses an unknown target, calibration method or correction.

    Raises:
        AsrError: one of them is not known.
    """
    if target not in TARGETS:
        raise AsrError(f"unknown int8 target {target!r}; choose one of {', '.join(TARGETS)}")
    if calibration != "auto" and calibration not in CALIBRATIONS:
        raise AsrError(f"unknown int8 calibration {calibration!r}; choose auto or one of {', '.join(CALIBRATIONS)}")
    if correction != "auto" and correction not in CORRECTIONS:
        raise AsrError(f"unknown int8 correction {correction!r}; choose auto or one of {', '.join(CORRECTIONS)}")


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` ready to quantize: every BatchNormalization that directly follows its layer folded
    into it (the quantized layer then computes the whole affine map), a zero bias for every Conv and Gemm
    that has none (onnxruntime quantizes it to int32, where a correction's shift can go), every node named
    (layers are matched by name between the float and the quantized model), and opset 13 at least (a
    per-channel DequantizeLinear's ``axis``; onnxruntime's quantizer writes it whatever the opset).

    Raises:
        AsrError: the model's opset is under 13 and onnx cannot convert it.
    """
    import onnx_graphsurgeon as gs

    from .graph import find_layers, find_sites, opset, to_graph, to_model
    from .recal import fold_bn

    if opset(model) < PER_CHANNEL_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        except Exception as e:  # noqa: BLE001 - the converter's errors are many kinds: one line
            raise AsrError(f"int8: per-channel QDQ needs opset {PER_CHANNEL_OPSET}, and converting opset "
                           f"{opset(model)} failed: {first_line(e)}") from None
    graph = to_graph(model)
    layers = find_layers(graph)
    for site in find_sites(graph, layers):
        if site.bn is not None and site.layer is not None:
            fold_bn(graph, site)
    for layer in layers:
        node = layer.node
        if layer.op in ("Conv", "Gemm") and (len(node.inputs) < 3 or not node.inputs[2].name):
            bias = gs.Constant(f"{layer.name}.asr_bias", np.zeros(layer.channels, layer.weight.values.dtype))
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            if layer.op == "Gemm":
                node.attrs["beta"] = 1.0
    graph.cleanup().toposort()
    taken = {node.name for node in graph.nodes}
    for index, node in enumerate(graph.nodes):
        if not node.name:
            node.name = _unique(f"{node.op}_{index}", taken)
    return to_model(graph, model)


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


class _Reader:
    """onnxruntime's CalibrationDataReader over a calibration set, one batch per item, read once in order.

    onnxruntime's strided calibration (``CalibStridedMinMax``) asks for consecutive ranges of items, so that
    only one batch's activations are held at a time (its histogram calibrators otherwise keep them all).
    """

    def __init__(self, calib, batch_size: int):
        self.count = -(-len(calib) // batch_size)
        self.batches = calib.batches(batch_size)
        self.left = 0

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self.left = end_index - start_index

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return next(self.batches, None)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints its progress (to the ``asr_onnx`` logger at INFO here) and logs warnings
    through the root logger, which would install a stderr handler: they are dropped while it runs."""
    import onnxruntime as ort

    from .runtime import LOG_SEVERITY

    ort.set_default_logger_severity(LOG_SEVERITY)
    root, handler = logging.getLogger(), logging.NullHandler()
    root.addHandler(handler)  # logging.warning() configures a stderr handler on a root logger without one
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logging.disable(disabled)
        root.removeHandler(handler)
        for line in printed.getvalue().splitlines():
            logging.getLogger("asr_onnx").info("onnxruntime quantizer: %s", line)


def quantize(model: onnx.ModelProto, calib, recipe: Recipe, *, batch_size: int = CALIB_BATCH,
             device: str = "cpu") -> onnx.ModelProto:
    """The QDQ model onnxruntime's ``quantize_static`` makes of a prepared float model (see :func:`prepare`).

    Per-channel symmetric int8 weights; activations uint8 with a zero point (target cpu) or symmetric
    int8 (target tensorrt), calibrated on ``calib`` with ``recipe.calibration``. The model is copied
    first: the quantizer rewrites the proto it is given (it saves it with external data).

    Raises:
        AsrError: the quantizer fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .runtime import providers

    tensorrt = recipe.target == "tensorrt"
    options = {"WeightSymmetric": True, "ActivationSymmetric": tensorrt, "CalibStridedMinMax": 1,
               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="asr-onnx-int8.") as folder, _quiet():
        path = Path(folder) / "int8.onnx"
        try:
            quantize_static(copy, path, _Reader(calib, min(batch_size, len(calib))), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=recipe.weights == "reduced",
                            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, recipe.calibration),
                            calibration_providers=providers(device), extra_options=options)
        except Exception as e:  # noqa: BLE001 - the quantizer's own errors are many kinds: one line
            raise AsrError(f"int8: onnxruntime's quantizer failed: {type(e).__name__}: {first_line(e)}") from None
        quantized = onnx.load(str(path))
    for key in ("producer_name", "producer_version", "doc_string"):
        setattr(quantized, key, getattr(model, key))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)  # the preprocessing the calibration data needs
    return quantized


# ---------------------------------------------------------------- checks and per-layer rows


def layer_rows(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto) -> list[dict]:
    """One row per prunable layer of the float model: where its weight went in the QDQ model.

    Each row: name, op, weight (the QDQ tensor the layer reads), quantized (False where the quantizer left
    the layer in float), zeros (of the float weight), zeros_kept (every one is the zero point's code),
    scale (min/max of the weight scales), nm_24 ("yes"/"no"/"n.a." on the integer codes, along the axis
    TensorRT checks), float_nm_24 (the same on the float weight).
    """
    from .graph import find_layers, to_graph
    from .sparsecore import reduction_axis

    tensors = quantized_tensors(qdq_model)
    nodes = {node.name: node for node in qdq_model.graph.node if node.name}
    rows = []
    for layer in find_layers(to_graph(float_model)):
        values = np.asarray(layer.weight.values)
        node = nodes.get(layer.name)
        tensor = tensors.get(node.input[1]) if node is not None and node.op_type == layer.op else None
        axis = reduction_axis(layer)
        row = {"name": layer.name, "op": layer.op, "weight": node.input[1] if node is not None else layer.weight.name,
               "quantized": tensor is not None, "zeros": int(values.size - np.count_nonzero(values)),
               "float_nm_24": _pattern(values, axis)}
        if tensor is None:
            row.update(zeros_kept=True, scale=None, nm_24=row["float_nm_24"])
        else:
            signed = tensor.signed()
            scale = np.asarray(tensor.scale, np.float64)
            row.update(zeros_kept=bool(signed.shape == values.shape and np.all(signed[values == 0] == 0)),
                       scale={"min": float(f"{scale.min():.6g}"), "max": float(f"{scale.max():.6g}")},
                       nm_24=_pattern(signed, axis))
        rows.append(row)
    return rows


def _pattern(weight: np.ndarray, axis: int | None) -> str:
    """"yes"/"no" for 2:4 along ``axis``; "n.a." without one or when its length is not a multiple of 4."""
    from .sparsecore import conforms_nm

    if axis is None or weight.shape[axis] % 4:
        return "n.a."
    return "yes" if conforms_nm(weight, 2, 4, axis) else "no"


def check_rows(rows: list[dict]) -> None:
    """The pre-write check: every zero of the float weights is the zero point's code, and every layer whose
    float weight follows 2:4 still does in its integer codes.

    Raises:
        AsrError: a zero or the 2:4 pattern was lost (naming the first layer).
    """
    for row in rows:
        if not row["zeros_kept"]:
            raise AsrError(f"int8: a zero weight of {row['name']} is not code 0 in the quantized model; "
                           "nothing was written")
        if row["float_nm_24"] == "yes" and row["nm_24"] != "yes":
            raise AsrError(f"int8: the 2:4 pattern of {row['name']} is lost in its int8 weights; nothing was written")


def runtime_of(model: onnx.ModelProto) -> str:
    """Which runtimes a QDQ model's form is for: TensorRT takes only int8 activations with zero point 0."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    zeros = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
             if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    if zeros and all(z.dtype == np.int8 and not z.any() for z in zeros):
        return "TensorRT (trtexec --int8) and onnxruntime"
    return "onnxruntime (its uint8 activations have zero points: TensorRT takes int8 ones at zero point 0)"


def sparse_rows(model: onnx.ModelProto) -> list[dict]:
    """:func:`asr_onnx.sparsecore.layer_rows` of a model; for a QDQ model, of its float form, with 2:4
    conformance read on the integer codes and ``precision`` "int8" for each layer whose weight is quantized."""
    from .sparsecore import conforms_nm, layer_rows

    fake, tensors = dequantize_weights(model)
    rows = layer_rows(fake)
    if not tensors:
        return rows
    for row in rows:
        tensor = tensors.get(row["weight"])
        row["precision"] = "int8" if tensor is not None else "float"
        if tensor is not None and row["nm_24"] != "n.a.":
            row["nm_24"] = "yes" if conforms_nm(tensor.signed(), 2, 4, row["axis_24"]) else "no"
    return rows


# ---------------------------------------------------------------- scoring on held-out data


def _outputs(model, data, *, batch_size: int, device: str, optimize: bool):
    """(samples, outputs) of each run over ``data``; ``optimize=False`` runs the QDQ arithmetic in float."""
    from .calib.specs import fixed_batch, input_specs
    from .runtime import make_session

    session = make_session(model, device, optimize=optimize)
    batch_size = fixed_batch(input_specs(model)) or batch_size
    for feed in data.batches(batch_size):
        yield len(next(iter(feed.values()))), session.run(None, feed)


def score(models: list, reference, data, *, target: str, device: str = "cpu", batch_size: int = 256) -> list[dict]:
    """Each model's per-sample agreement and squared output error against ``reference`` on ``data``.

    Target cpu runs each model as onnxruntime runs it (its integer kernels on this CPU); target tensorrt
    with graph optimisations off (the QDQ arithmetic in float). The reference runs once.
    """
    from .evaluation import agreement
    from .output_kinds import output_kinds

    kinds = output_kinds(reference)
    cached = list(_outputs(reference, data, batch_size=batch_size, device=device, optimize=True))
    return [agreement(_outputs(m, data, batch_size=batch_size, device=device, optimize=target == "cpu"), kinds,
                      reference=cached, per_sample=True) for m in models]


def _pick(names: list[dict], scored: list[dict], default: int = 0) -> tuple[int, list[dict]]:
    """:func:`asr_onnx.select.pick` over scored candidates (agreement None where top-1 means nothing).

    Returns:
        (the picked candidate's index, every candidate's name with its scores and "tied").
    """
    from .evaluation import logit_rel_l2
    from .select import pick

    no_top1 = scored[0]["matches"] is None
    matches = [np.zeros(len(s["err2"])) if no_top1 else s["matches"] for s in scored]
    rows = [name | {"agreement": None if no_top1 else float(s["matches"].mean()),
                    "logit_rel_l2": logit_rel_l2(s["err2"], s["ref2"])} for name, s in zip(names, scored)]
    picked = pick(rows, matches, [s["err2"] for s in scored], default=default)
    for row in rows:
        row["logit_rel_l2"] = float(f"{row['logit_rel_l2']:.6g}")
    return next(i for i, row in enumerate(rows) if row is picked), rows


def choose_recipe(base, fit, held, *, target: str, calibration: str, batch_size: int, device: str):
    """The recipe that scores best on ``held`` when calibrated on ``fit`` (see the module docstring).

    For the CPU, full and reduced weights are scored with MinMax first (or the given method), then the
    other methods with the better range.

    Returns:
        (the picked recipe, its model calibrated on ``fit``, every candidate's scores).
    """
    methods = CALIBRATIONS if calibration == "auto" else (calibration,)
    first = [Recipe(methods[0], weights, target) for weights in (WEIGHT_RANGES if target == "cpu" else ("full",))]
    candidates, models, scored = [], [], []

    def add(recipes):
        made = [quantize(base, fit, recipe, batch_size=batch_size, device=device) for recipe in recipes]
        candidates.extend(recipes)
        models.extend(made)
        scored.extend(score(made, base, held, target=target, device=device))

    add(first)
    best, _ = _pick([r.as_dict() for r in candidates], scored)
    add([Recipe(method, candidates[best].weights, target) for method in methods[1:]])
    index, rows = _pick([r.as_dict() for r in candidates], scored, default=best)
    return candidates[index], models[index], rows


def correction_verdict(scored: list[dict]) -> tuple[str, bool, list[dict]]:
    """Plain PTQ against the corrected model on held-out samples, decided as the guard decides a repair
    against pruning alone (:func:`asr_onnx.guard._verdict`): the correction is a repair of the quantization
    damage, kept when it is better past two paired standard errors (agreement first, then each sample's
    squared error), or, within noise, when its held-out error is lower.

    Args:
        scored: :func:`score` of [plain PTQ, corrected].

    Returns:
        (the verdict, whether the correction is kept, each candidate's scores).
    """
    from .evaluation import logit_rel_l2
    from .guard import _verdict

    plain, fixed = scored
    has_top1 = plain["matches"] is not None
    top1_gain = fixed["matches"] - plain["matches"] if has_top1 else np.zeros(1)
    verdict = _verdict(top1_gain, plain["err2"] - fixed["err2"])
    keep = verdict == "repair better" or (verdict == "tie" and fixed["err2"].sum() < plain["err2"].sum())
    rows = [{"correction": name, "agreement": float(s["matches"].mean()) if has_top1 else None,
             "logit_rel_l2": float(f"{logit_rel_l2(s['err2'], s['ref2']):.6g}")}
            for name, s in (("none", plain), ("bn", fixed))]
    return verdict.replace("repair", "correction").replace("pruning alone", "plain PTQ"), keep, rows


# ---------------------------------------------------------------- per-layer output errors


def layer_errors(reference, models: list, keys: list[str], data, *, device: str = "cpu",
                 batch_size: int = 64) -> list[dict]:
    """Relative L2 error of each model's tensors ``keys`` against the reference's same-named ones on ``data``.

    Every model is run with those tensors added as outputs (onnxruntime then computes their layers in
    float, from the dequantized weights, as :func:`asr_onnx.quantize_correct.correct_quantization`
    measures them).

    Returns:
        per model, key -> relative L2 error (rounded to 4 significant digits).
    """
    from onnx import TensorProto, helper

    from .runtime import make_session

    def exposed(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        have = {o.name for o in copy.graph.output}
        copy.graph.output.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in keys
                                 if k not in have)
        return make_session(copy, device)

    sessions = [exposed(m) for m in [reference] + list(models)]
    err2 = [dict.fromkeys(keys, 0.0) for _ in models]
    ref2 = dict.fromkeys(keys, 0.0)
    for feed in data.batches(batch_size):
        outs = [dict(zip(keys, s.run(keys, feed))) for s in sessions]
        for key in keys:
            want = outs[0][key].astype(np.float64)
            ref2[key] += float(np.sum(want**2))
            for i, got in enumerate(outs[1:]):
                err2[i][key] += float(np.sum((got[key].astype(np.float64) - want) ** 2))
    return [{k: float(f"{np.sqrt(e[k] / max(ref2[k], 1e-300)):.4g}") for k in keys} for e in err2]


# ---------------------------------------------------------------- the stage


def to_int8(model: onnx.ModelProto, calib, *, target: str = "cpu", calibration: str = "auto",
            correction: str = "auto", seed: int = 0, batch_size: int = CALIB_BATCH, device: str = "cpu",
            threads: int = 0, progress: bool = False, keep: list | None = None) -> tuple[onnx.ModelProto, dict]:
    """Quantizes a float model to QDQ (see the module docstring), checked before it is returned.

    Args:
        model: the float model (the repair's output); it is not modified.
        calib: the calibration set (needs ``folds`` for the held-out choices).
        target: "cpu" or "tensorrt". Defaults to "cpu".
        calibration: "auto" or one of CALIBRATIONS. Defaults to "auto".
        correction: "auto", "none" or "bn". Defaults to "auto".
        seed: the held-out split's seed. Defaults to 0.
        batch_size: samples per calibration and statistics run. Defaults to 64.
        device: where the calibration and the scores run. Defaults to "cpu" (the scores are of the CPU's kernels).
        threads: onnxruntime intra-op threads for the statistics. Defaults to 0.
        progress: progress bars. Defaults to False.
        keep: a list to append the plain post-training quantized model to, beside the one returned (for a
            benchmark of the correction). Defaults to None.

    Returns:
        (the QDQ model, the report's ``quantization`` entry).

    Raises:
        AsrError: an unknown option, a model that is quantized already, a zero or a 2:4 pattern lost in the
            integer weights, an output that is not finite, or the quantizer's failure.
    """
    from .quantize_correct import correct_quantization
    from .runtime import make_session

    check_options(target, calibration, correction)
    if quantized_tensors(model):
        raise AsrError("int8: the model is quantized already (QDQ weights); its repair keeps them int8 without --int8")
    base = prepare(model)
    fixed = _fixed_batch(base)
    batch_size = fixed or min(batch_size, len(calib))
    options = dict(batch_size=batch_size, device=device, threads=threads, progress=progress)
    fit, held = calib.folds(2, seed)[0]
    recipe, fit_model, calibration_rows = choose_recipe(base, fit, held, target=target, calibration=calibration,
                                                        batch_size=batch_size, device=device)
    correction_rows, verdict, picked_correction = None, None, correction
    if correction == "auto":
        fitted = correct_quantization(base, fit_model, _part(fit, seed), method="bn", **options)[0]
        verdict, keep_it, correction_rows = correction_verdict(score([fit_model, fitted], base, held, target=target,
                                                                     device=device))
        picked_correction = "bn" if keep_it else "none"
    plain = quantize(base, calib, recipe, batch_size=batch_size, device=device)
    if keep is not None:
        keep.append(plain)
    corrected, fix = correct_quantization(base, plain, _part(calib, seed), method=picked_correction, **options)
    rows = layer_rows(base, corrected)
    check_rows(rows)
    try:
        onnx.checker.check_model(corrected, full_check=True)
        make_session(corrected, "cpu")
    except AsrError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AsrError(f"int8: the quantized model fails onnx.checker: {first_line(e)}") from None
    sample = calib.take(ERROR_SAMPLES, seed) if hasattr(calib, "take") else calib
    final = score([plain, corrected] if corrected is not plain else [plain], base, sample, target=target,
                  device=device)
    for name, result in zip(("ptq", "corrected"), final):
        if not np.isfinite(result["err2"]).all():
            raise AsrError(f"int8: the quantized model's output ({name}) is not finite on calibration data")
    twin_keys = _layer_keys(base, plain)
    errors = _layer_error_rows(base, plain, corrected, twin_keys, sample, device, batch_size)
    for row in rows:
        row.update(errors.get(row["name"], {}))
    entry = {
        "format": "QDQ",
        "target": target,
        "runtime": RUNTIMES[target],
        "weights": {"type": "int8", "scales": "per output channel", "symmetric": True,
                    "range": 63 if recipe.weights == "reduced" else 127},
        "activations": {"type": "int8" if target == "tensorrt" else "uint8", "scales": "per tensor",
                        "symmetric": target == "tensorrt"},
        "calibration": {"picked": recipe.as_dict(), "fit": len(fit), "held_out": len(held),
                        "candidates": calibration_rows},
        "correction": {"picked": picked_correction, "candidates": correction_rows, "verdict": verdict,
                       "rule": CORRECTION_RULE if verdict else None, "sites": fix.sites},
        "output": {"samples": final[0]["samples"],
                   "ptq": _summary(final[0]),
                   "corrected": _summary(final[1]) if len(final) > 1 else None},
        "layers": rows,
    }
    return corrected, entry


def _summary(result: dict) -> dict:
    return {"agreement": result["agreement"], "logit_rel_l2": float(f"{result['logit_rel_l2']:.6g}")}


def _part(calib, seed: int):
    """What the correction measures: a seeded CORRECTION_SAMPLES of a calib.CalibSet, in a random order (no
    batch of one class); any other set as it is."""
    return calib.take(CORRECTION_SAMPLES, seed).shuffled(seed) if hasattr(calib, "shuffled") else calib


def _fixed_batch(model) -> int | None:
    from .calib.specs import fixed_batch, input_specs

    return fixed_batch(input_specs(model))


def _layer_keys(base, plain) -> dict[str, str]:
    """Float layer name -> the quantized model's output tensor of that layer (as the twin names it)."""
    from .quantize_correct import dequantize_weights, float_twin

    fake, _ = dequantize_weights(plain)
    _, matched = float_twin(base, fake)
    outputs = {node.output[0]: node.name for node in fake.graph.node}
    return {outputs[key]: key for key in matched if key in outputs}


def _layer_error_rows(base, plain, corrected, keys: dict, data, device: str, batch_size: int) -> dict:
    """Layer name -> {"rel_l2_ptq", "rel_l2_corrected"}: each layer's output error against the float model."""
    from .quantize_correct import dequantize_weights, float_twin

    if not keys:
        return {}
    fakes = [dequantize_weights(m)[0] for m in (plain, corrected)]
    twin, _ = float_twin(base, fakes[0])
    names = sorted(keys.values())
    ptq, fixed = layer_errors(twin, fakes, names, data, device=device, batch_size=batch_size)
    by_tensor = {tensor: layer for layer, tensor in keys.items()}
    return {by_tensor[k]: {"rel_l2_ptq": ptq[k], "rel_l2_corrected": fixed[k]} for k in names}


# ---------------------------------------------------------------- the terminal summary


def summary_lines(entry: dict) -> list[str]:
    """A few lines for the terminal summary: what the output is quantized for, how, and what it costs."""
    if entry.get("input") == "quantized":  # a QDQ input, pruned and repaired in float, quantized again
        if entry["unchanged"]:
            return ["int8: the quantized input model, unchanged"]
        total = {k: sum(t[k] for t in entry["tensors"]) for k in ("kept", "rescaled", "rounded", "new_scale")}
        return [f"int8 (QDQ input, quantized again): weight channels {total['kept']} as they were, "
                f"{total['rescaled']} rescaled (codes kept),",
                f"  {total['rounded']} rounded at their old scale, {total['new_scale']} with a new scale"]
    weights, acts, picked = entry["weights"], entry["activations"], entry["calibration"]["picked"]
    lines = [f"int8 QDQ for {entry['runtime']}",
             f"  weights int8 per channel (up to {weights['range']}), activations {acts['type']}; calibration "
             f"{picked['calibration']}, correction {entry['correction']['picked']}",
             f"  (chosen on {entry['calibration']['held_out']} held-out calibration samples)"]
    out = entry["output"]

    def score(s):
        agreement = "-" if s["agreement"] is None else f"{100 * s['agreement']:.1f}%"
        return f"{agreement} / {s['logit_rel_l2']:.3g}"

    lines.append(f"  against float on {out['samples']} calibration samples (top-1 agreement / rel err):")
    text = f"    PTQ {score(out['ptq'])}"
    if out["corrected"] is not None:
        text += f", corrected {score(out['corrected'])}"
    lines.append(text)
    sparse = [row for row in entry["layers"] if row["float_nm_24"] == "yes"]
    if sparse:
        kept = sum(row["nm_24"] == "yes" for row in sparse)
        lines.append(f"  2:4 in the int8 weights: {kept} of the {len(sparse)} 2:4 layers")
    floats = [row["name"] for row in entry["layers"] if not row["quantized"]]
    if floats:
        lines.append(f"  left in float by the quantizer: {', '.join(floats[:3])}" + (" ..." if len(floats) > 3 else ""))
    return lines
