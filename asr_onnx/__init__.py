"""asr-onnx: one-shot pruning and training-free repair of ONNX CNNs.

The public surface is small and lazy, so that ``import asr_onnx`` stays cheap:
:func:`repair` and :class:`Repair` (the pipeline), :func:`load_calib` (calibration data),
:func:`evaluate` (accuracy and agreement), :func:`bench` (measured speed), :func:`load_model`,
:func:`save_model`, :func:`write_report`, :func:`search` (the sparsest repair that keeps a target agreement)
and :class:`AsrError`.
"""

from asr_onnx.errors import AsrError

__version__ = "0.1.0"

# public name -> the module that holds it; imported on first use, so that ``import asr_onnx`` stays cheap
_LAZY = {
    "Repair": "asr_onnx.pipeline.driver",
    "repair": "asr_onnx.pipeline.driver",
    "load_calib": "asr_onnx.calib",
    "evaluate": "asr_onnx.verify.evaluation",
    "bench": "asr_onnx.verify.timing",
    "load_model": "asr_onnx.model.files",
    "save_model": "asr_onnx.model.files",
    "write_report": "asr_onnx.report.build",
    "search": "asr_onnx.pipeline.sparsity_search",
}
__all__ = ["AsrError", *_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
