"""onnxruntime's static quantizer on a prepared float model: what it is asked for, and the call itself.

Weights are int8, one symmetric scale per output channel, so 0 is exactly code 0 and every pruned weight
stays zero. What else the quantizer is asked for depends on where the model will run (``target``):

- ``cpu``: onnxruntime's CPU kernels: uint8 activations with a zero point (a Relu after a Conv is then
  the quantizer's clip), and full-range (127) or reduced-range (63) weights. Without AVX-512 VNNI, x86's
  8-bit dot product (AVX2 ``vpmaddubsw``) saturates its 16-bit pair sums with full-range weights; the
  held-out score (:mod:`asr_onnx.quantize.choose`), run in onnxruntime on this machine, finds out which
  one this CPU needs.
- ``tensorrt``: TensorRT's explicit quantization: symmetric int8 activations (zero point 0) and
  full-range weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from asr_onnx.errors import AsrError, first_line

TARGETS = ("cpu", "tensorrt")
CALIBRATIONS = ("MinMax", "Percentile", "Entropy")
WEIGHT_RANGES = ("full", "reduced")
CORRECTIONS = ("none", "bn")
CALIB_BATCH = 64  # samples per calibration run
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis


@dataclass(frozen=True)
class QuantRecipe:
    """What onnxruntime's quantizer is asked for.

    Attributes:
        calibration: "MinMax", "Percentile" or "Entropy".
        weights: "full" (int8 codes up to 127) or "reduced" (up to 63: onnxruntime's ``reduce_range``).
        target: "cpu" or "tensorrt" (see the module docstring).
        float_nodes: nodes the quantizer leaves in float (onnxruntime's ``nodes_to_exclude``), see
            :func:`asr_onnx.quantize.choose.choose_float_layers`. Defaults to none.
    """

    calibration: str = "MinMax"
    weights: str = "full"
    target: str = "cpu"
    float_nodes: tuple = ()

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

    from asr_onnx.correct.recal import fold_bn, set_bias
    from asr_onnx.model.graph import find_layers, find_sites, opset, to_graph, to_model
    from asr_onnx.model.qdq import unique_name

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
            set_bias(layer, gs.Constant(f"{layer.name}.asr_bias", np.zeros(layer.channels, layer.weight.values.dtype)))
    graph.cleanup().toposort()
    taken = {node.name for node in graph.nodes}
    for index, node in enumerate(graph.nodes):
        if not node.name:
            node.name = unique_name(f"{node.op}_{index}", taken)
    return to_model(graph, model)


class _Reader:
    """onnxruntime's CalibrationDataReader over a calibration set, one batch per item, read once in order
    (through :func:`asr_onnx.model.session.batches`: a fixed-batch model skips the last partial batch).

    onnxruntime's strided calibration (``CalibStridedMinMax``) asks for consecutive ranges of items, so that
    only one batch's activations are held at a time (its histogram calibrators otherwise keep them all).
    """

    def __init__(self, calib, batch_size: int, fixed: int | None):
        from asr_onnx.model.session import batches

        self.count = len(calib) // fixed if fixed else -(-len(calib) // batch_size)
        self.feeds = (feed for _, feed in batches(calib, batch_size, fixed=fixed))
        self.left = 0

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self.left = end_index - start_index

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return next(self.feeds, None)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints its progress (to the ``asr_onnx`` logger at INFO here) and logs warnings
    through the root logger, which would install a stderr handler: they are dropped while it runs."""
    import onnxruntime as ort

    from asr_onnx.model.session import LOG_SEVERITY

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


def quantize(model: onnx.ModelProto, calib, recipe: QuantRecipe, *, batch_size: int = CALIB_BATCH,
             device: str = "cpu") -> onnx.ModelProto:
    """The QDQ model onnxruntime's ``quantize_static`` makes of a prepared float model (see :func:`prepare`).

    Per-channel symmetric int8 weights; activations uint8 with a zero point (target cpu) or symmetric
    int8 (target tensorrt), calibrated on ``calib`` with ``recipe.calibration``. The model is copied
    first: the quantizer rewrites the proto it is given (it saves it with external data).

    Raises:
        AsrError: the quantizer fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from asr_onnx.calib.specs import fixed_batch, input_specs
    from asr_onnx.model.session import providers
    from asr_onnx.tempdirs import temporary_folder

    tensorrt = recipe.target == "tensorrt"
    options = {"WeightSymmetric": True, "ActivationSymmetric": tensorrt, "CalibStridedMinMax": 1,
               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    fixed = fixed_batch(input_specs(model))
    reader = _Reader(calib, fixed or min(batch_size, len(calib)), fixed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with temporary_folder("int8") as folder, _quiet():
        path = Path(folder) / "int8.onnx"
        try:
            quantize_static(copy, path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=recipe.weights == "reduced",
                            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, recipe.calibration),
                            nodes_to_exclude=list(recipe.float_nodes), calibration_providers=providers(device),
                            extra_options=options)
        except Exception as e:  # noqa: BLE001 - the quantizer's own errors are many kinds: one line
            raise AsrError(f"int8: onnxruntime's quantizer failed: {type(e).__name__}: {first_line(e)}") from None
        quantized = onnx.load(str(path))
    for key in ("producer_name", "producer_version", "doc_string"):
        setattr(quantized, key, getattr(model, key))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)  # the preprocessing the calibration data needs
    return quantized
