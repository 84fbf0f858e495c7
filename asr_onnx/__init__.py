"""asr-onnx: one-shot pruning and training-free repair of ONNX CNNs.

The public surface is small and lazy, so that ``import asr_onnx`` stays cheap:
:func:`repair` and :class:`Repair` (the pipeline), :func:`load_calib` (calibration data),
:func:`evaluate` (accuracy and agreement), :func:`bench` (measured speed) and :class:`AsrError`.
"""

from .errors import AsrError

__version__ = "0.1.0"
__all__ = ["AsrError", "Repair", "repair", "load_calib", "evaluate", "bench", "__version__"]


def __getattr__(name):
    if name in ("Repair", "repair"):
        from . import api

        return getattr(api, name)
    if name == "load_calib":
        from .calib import load_calib

        return load_calib
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name == "bench":
        from .timing import bench

        return bench
    raise AttributeError(name)
