"""Verification: evaluation per output kind, detection scoring, the verdict, comparison with tolerances, timing,
and float16 deployment.

The package's face (imported on first use, so that importing one module of it stays cheap): :func:`evaluate`,
:func:`judge` and :class:`Verdict` (usable, degraded or broken), :func:`decode` and :func:`detection_scores`
(a detection head's boxes, and F1 against a reference's).
"""

# public name -> the module that holds it
_LAZY = {
    "evaluate": "asr_onnx.verify.evaluation",
    "judge": "asr_onnx.verify.verdict",
    "Verdict": "asr_onnx.verify.verdict",
    "decode": "asr_onnx.verify.detection",
    "detection_scores": "asr_onnx.verify.detection",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
